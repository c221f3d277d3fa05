"""Ensembles (seq2seq/ensemble.py, `ckpt=[a.ckpt,b.ckpt]`): the members' log-probabilities averaged at each step."""
from dataclasses import replace

import pytest
import torch

from seq2seq.ensemble import Ensemble
from seq2seq.int8 import int8_copy
from seq2seq.model import Transformer
from seq2seq.search import SearchConfig, beam_search, search_batch
from tests.conftest import batch, run_py


def other_model(model: Transformer, seed: int, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(replace(model.cfg, **changes)).eval()


@pytest.mark.parametrize("beam_size", [1, 4])  # greedy search, beam search
def test_an_ensemble_of_one_model_searches_as_that_model(tiny_model, beam_size):
    src, _ = batch(tiny_model.cfg.vocab_size, B=4, S=9)
    search = SearchConfig(beam_size=beam_size, nbest=beam_size, max_len_b=12)
    alone = search_batch(tiny_model, src, search)
    together = search_batch(Ensemble([tiny_model]), src, search)
    assert [[h for h, _ in s] for s in together] == [[h for h, _ in s] for s in alone]
    assert [s for sentence in together for _, s in sentence] == pytest.approx(
        [s for sentence in alone for _, s in sentence], abs=1e-4)


def test_each_step_averages_the_members_log_probabilities(tiny_model):
    """Two members of different widths and depths, decoding a target step by step through the shared cache:
    at every position the ensemble's scores are the mean of what each member computes alone, uncached."""
    second = other_model(tiny_model, seed=1, d_model=48, n_heads=3, d_ff=96, n_dec_layers=2)
    ensemble = Ensemble([tiny_model, second])
    src, tgt_in = batch(tiny_model.cfg.vocab_size, B=3, S=8, T=6)
    mask = tiny_model.pad_mask(src)
    with torch.no_grad():
        mean = (tiny_model(src, tgt_in).log_softmax(-1) + second(src, tgt_in).log_softmax(-1)) / 2  # (B, T, V)
        memory, cache = ensemble.encode(src, mask), [{} for _ in ensemble.decoder_layers]
        steps = [ensemble.project(ensemble.decode_step(tgt_in[:, t:t + 1], memory, mask, cache)) for t in range(6)]
    torch.testing.assert_close(torch.stack(steps, dim=1), mean, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mean, tiny_model(src, tgt_in).log_softmax(-1), atol=1e-2)  # a real mix


def test_an_int8_ensemble_is_an_ensemble_of_int8_members(tiny_model):
    ensemble = int8_copy(Ensemble([tiny_model, other_model(tiny_model, seed=1)]))
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    src, _ = batch(tiny_model.cfg.vocab_size)
    assert len(beam_search(ensemble, src, tiny_model.pad_mask(src), SearchConfig(beam_size=2, max_len_b=5))) == 3


@pytest.mark.slow
def test_translate_with_an_ensemble_of_checkpoints(smoke_run, tmp_path, data_dir):
    from seq2seq.checkpoint import load_checkpoint, save_checkpoint
    from seq2seq.tokenizer import train_tokenizer

    best, last = (smoke_run / "checkpoints" / f"{name}.ckpt" for name in ("best", "last"))
    lines = (data_dir / "demo" / "test.en").read_text(encoding="utf-8").splitlines()[:30]
    (tmp_path / "in.en").write_text("\n".join(lines) + "\n")
    args = [f"input={tmp_path}/in.en", "precision=32", "progress=false"]
    one = run_py("translate", f"ckpt={best}", *args)
    ensemble_of_one = run_py("translate", f"ckpt=[{best}]", *args)
    two = run_py("translate", f"ckpt=[{best},{last}]", *args)
    two_int8 = run_py("translate", f"ckpt=[{best},{last}]", *args[:1], "precision=int8", "progress=false")
    assert one.returncode == ensemble_of_one.returncode == two.returncode == two_int8.returncode == 0, two.stderr
    assert ensemble_of_one.stdout == one.stdout
    assert len(two.stdout.splitlines()) == len(two_int8.stdout.splitlines()) == 30

    foreign = load_checkpoint(best)  # the same weights with another (valid) SentencePiece model
    other = train_tokenizer([f"line {i} of another corpus ." for i in range(300)], 300, tmp_path / "spm")
    foreign["seq2seq"]["spm_model"] = other.model_proto
    save_checkpoint(foreign, tmp_path / "foreign.ckpt")
    proc = run_py("translate", f"ckpt=[{best},{tmp_path}/foreign.ckpt]", *args)
    assert proc.returncode == 1
    assert f"{tmp_path}/foreign.ckpt: its tokenizer differs from {best}'s" in proc.stderr
    proc = run_py("visualize", f"ckpt=[{best},{last}]", "text=hello")
    assert proc.returncode == 1
    assert "expected one checkpoint (only translate, evaluate and serve take a list)" in proc.stderr
