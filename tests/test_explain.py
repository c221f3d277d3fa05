"""`seq2seq.explain`: each step of attention as the model computes it, and heads switched off and on."""
import math
import subprocess

import pytest
import torch

from seq2seq.explain import (KINDS, attention_module, attention_profiles, attention_steps, head_importance,
                             switched_off, top_predictions)

SRC, TGT = [5, 9, 12, 7, 30], [8, 11, 6, 40]


@pytest.fixture
def model(tiny_model):
    torch.manual_seed(0)
    for p in tiny_model.parameters():  # away from the initial weights, so that heads differ
        p.data.add_(0.05 * torch.randn_like(p))
    return tiny_model


@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_q_dot_k_over_sqrt_d_from_the_layers_own_projections(model, tokenizer, kind):
    steps = attention_steps(model, tokenizer, SRC, TGT, layer=0, head=1, kind=kind)
    module = attention_module(model, kind, 0)
    d_head = module.d_model // module.n_heads
    # by hand: the inputs the layer saw are not kept, so rebuild Q and K from the recorded projections' inputs
    record = {}
    module.record = record
    with torch.no_grad():
        src = torch.tensor([SRC + [3]])
        model(src, torch.tensor([[2] + TGT]))
    module.record = None
    q, k = record["query"][0, 1], record["key"][0, 1]
    by_hand = torch.stack([torch.stack([q[t] @ k[s] / math.sqrt(d_head) for s in range(k.size(0))])
                           for t in range(q.size(0))])
    torch.testing.assert_close(steps.scores, by_hand)
    T, S = steps.scores.shape
    assert steps.cells == T * S and len(steps.queries) == T and len(steps.keys) == S


def test_queries_and_keys_come_from_the_layers_own_projections_of_its_input(model, tokenizer):
    """The recorded query and key are W_Q and W_K applied to the (normalized) input of the layer."""
    module = attention_module(model, "encoder", 0)
    inputs = []
    hook = module.q_proj.register_forward_hook(lambda _m, i, _o: inputs.append(i[0]))
    record = {}
    module.record = record
    with torch.no_grad():
        model(torch.tensor([SRC + [3]]), torch.tensor([[2] + TGT]))
    module.record = None
    hook.remove()
    x = inputs[0]
    expected_q = module.split_heads(x @ module.q_proj.weight.T + module.q_proj.bias)
    W_K, b_K = module.kv_proj.weight[:module.d_model], module.kv_proj.bias[:module.d_model]
    torch.testing.assert_close(record["query"], expected_q)
    torch.testing.assert_close(record["key"], module.split_heads(x @ W_K.T + b_K))


def test_masked_cells_are_minus_infinity_before_softmax_and_exactly_zero_after(model, tokenizer):
    steps = attention_steps(model, tokenizer, SRC, TGT, layer=0, head=0, kind="decoder")
    future = torch.ones_like(steps.keep).triu(1)
    assert torch.equal(~steps.keep, future)  # the causal mask hides exactly the later positions
    assert torch.isneginf(steps.masked[future]).all() and torch.isfinite(steps.masked[~future]).all()
    assert torch.equal(steps.weights[future], torch.zeros(int(future.sum())))
    torch.testing.assert_close(steps.weights.sum(-1), torch.ones(steps.weights.size(0)))


def test_weights_times_values_is_the_context_and_the_heads_sum_to_the_update(model, tokenizer):
    module = attention_module(model, "cross", 0)
    parts = [attention_steps(model, tokenizer, SRC, TGT, layer=0, head=h, kind="cross") for h in range(module.n_heads)]
    for steps in parts:
        torch.testing.assert_close(steps.weights @ steps.values, steps.context)
    total = sum(steps.head_update for steps in parts) + module.out_proj.bias.detach()
    torch.testing.assert_close(total, parts[0].update)  # W_O over the concatenated heads = sum of per-head parts
    assert (parts[0].contributions >= 0).all() and parts[0].contributions.shape == parts[0].weights.shape


def test_switching_a_head_off_changes_the_logits_and_on_again_restores_them_exactly(model):
    src, tgt = torch.tensor([SRC + [3]]), torch.tensor([[2] + TGT])
    with torch.no_grad():
        before = model(src, tgt)
        with switched_off([attention_module(model, "cross", 0)], head=0):
            off = model(src, tgt)
        after = model(src, tgt)
    assert not torch.allclose(before, off)
    assert torch.equal(before, after)


def test_head_importance_has_a_row_per_head_and_per_kind(model, tokenizer):
    labels, drops = head_importance(model, SRC, TGT)
    heads = model.cfg.n_heads * (model.cfg.n_enc_layers + 2 * model.cfg.n_dec_layers)
    assert len(labels) == heads + 3 and drops.shape == (heads + 3, len(TGT) + 1)
    assert labels[-1] == "all cross" and drops[labels.index("all cross")].abs().sum() > 0
    predictions = top_predictions(model, tokenizer, SRC, TGT, k=3)
    assert len(predictions) == len(TGT) + 1 and all(p[0][1] >= p[1][1] >= p[2][1] for p in predictions)


@pytest.mark.parametrize("kind", KINDS)
def test_head_profiles_are_read_from_the_same_weights_as_the_steps(model, tokenizer, kind):
    profile = attention_profiles(model, SRC, TGT)[f"{kind} L0 H1"]
    w = attention_steps(model, tokenizer, SRC, TGT, layer=0, head=1, kind=kind).weights  # (T, S)
    assert profile["peak"] == pytest.approx(float(w.max(-1).values.mean()), abs=1e-6)
    assert profile["marker"] == pytest.approx(float(w[:, 0 if kind == "decoder" else -1].mean()), abs=1e-6)
    assert 0 <= profile["entropy"] <= math.log(w.shape[1]) + 1e-5
    if kind == "cross":
        assert math.isnan(profile["self"]) and math.isnan(profile["previous"])
    else:
        assert profile["self"] == pytest.approx(float(w.diagonal().mean()), abs=1e-6)
        assert profile["previous"] == pytest.approx(float(w.diagonal(-1).mean()), abs=1e-6)


def test_a_layer_or_head_that_does_not_exist_is_named(model, tokenizer):
    with pytest.raises(ValueError, match="layer=9: this model's encoder has layers 0..0"):
        attention_steps(model, tokenizer, SRC, TGT, layer=9, head=0, kind="encoder")
    with pytest.raises(ValueError, match="head=7"):
        attention_steps(model, tokenizer, SRC, TGT, layer=0, head=7, kind="encoder")
    with pytest.raises(ValueError, match="kind=self"):
        attention_steps(model, tokenizer, SRC, TGT, layer=0, head=0, kind="self")


@pytest.mark.slow
def test_cli_writes_one_self_contained_page(smoke_run, tmp_path):
    from tests.conftest import run_py

    ckpt = f"ckpt={smoke_run}/checkpoints/best.ckpt"
    proc = run_py("explain", ckpt, "text=The big dog ate the red apple.", f"output={tmp_path}/ex", "kind=decoder",
                  "head=1")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "ex" / "explain.html").read_text(encoding="utf-8")
    assert "decoder, layer 0, head 1" in page and page.count("data:image/png;base64,") >= 8 and "http" not in page
    assert {"scores.png", "mask.png", "weights.png", "importance.png"} <= {p.name for p in (tmp_path / "ex").iterdir()}
    proc = run_py("explain", ckpt, "text=hello", "layer=7", f"output={tmp_path}/ex2")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: layer=7: this model's cross")


@pytest.mark.slow
def test_the_page_draws_its_grids_in_a_real_headless_browser(smoke_run, tmp_path):
    """Chromium (Debian's package; .ci/run installs it) renders explain.html offline to a screenshot. The
    heat maps' colours cover a good part of it, and the same page with its images taken out has none:
    what is seen is the grids, drawn by the browser from the page alone."""
    import re
    import shutil

    import numpy as np
    from PIL import Image

    from tests.conftest import run_py

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here: apt-get install chromium (.ci/run does)")
    proc = run_py("explain", f"ckpt={smoke_run}/checkpoints/best.ckpt", "text=The big dog ate the red apple.",
                  f"output={tmp_path}/ex", "kind=decoder")
    assert proc.returncode == 0, proc.stderr
    page = tmp_path / "ex" / "explain.html"
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'<img src="data:image/png;base64,[^"]*"', "<img", page.read_text(encoding="utf-8")),
                     encoding="utf-8")

    def coloured_share(html_file) -> float:
        shot = tmp_path / f"{html_file.stem}.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,2400", f"--screenshot={shot}", html_file.as_uri()],
                       capture_output=True, timeout=120, check=True)
        rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        saturation = rgb.max(-1) - rgb.min(-1)  # grey, black and white text: ~0; the colour maps: large
        return float((saturation > 40).mean())

    assert coloured_share(page) > 0.02 and coloured_share(blank) < 0.001
