"""`run.py export format=ctranslate2` and `translate backend=ctranslate2`: the exported model decodes as ours does."""
import pytest

from tests.conftest import run_py


@pytest.mark.slow
def test_ctranslate2_export_decodes_like_our_greedy_search(smoke_run, tmp_path, data_dir):
    import ctranslate2

    from seq2seq.search import greedy_search
    from seq2seq.translator import Translator, pad_batch

    ckpt = smoke_run / "checkpoints" / "best.ckpt"
    proc = run_py("export", f"ckpt={ckpt}", "format=ctranslate2", f"output={tmp_path}/ct2")
    assert proc.returncode == 0, proc.stderr
    assert {"model.bin", "spm.model"} <= {p.name for p in (tmp_path / "ct2").iterdir()}
    translator = Translator.from_checkpoint(ckpt, device="cpu")
    lines = (data_dir / "demo" / "test.en").read_text(encoding="utf-8").splitlines()[:100]
    ids = translator.encode(translator.prepare(lines))
    tok = translator.tokenizer
    src = pad_batch(ids)
    with translator.decoding(translator_search(precision="32")) as model:
        ours = [tok.pieces([i for i in row if i not in (tok.eos_id, tok.pad_id)])
                for row in greedy_search(model, src, model.pad_mask(src), translator_search(max_len_b=64)).tolist()]
    ct2 = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    theirs = [r.hypotheses[0] for r in ct2.translate_batch([tok.pieces(s) + ["</s>"] for s in ids], beam_size=1,
                                                           max_decoding_length=128)]
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same == len(lines), f"{same} of {len(lines)} identical"  # token for token

    # translate backend=ctranslate2: the same preparation and output as our own decoder (greedy, fp32)
    (tmp_path / "in.en").write_text("\n".join(lines[:20] + ["", "Two sentences. In one line."]) + "\n")
    args = [f"input={tmp_path}/in.en", "beam_size=1", "progress=false", "split=true"]
    ours = run_py("translate", f"ckpt={ckpt}", "precision=32", *args)
    theirs = run_py("translate", "backend=ctranslate2", f"ckpt={tmp_path}/ct2", "precision=32", *args)
    assert ours.returncode == theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == ours.stdout and len(theirs.stdout.splitlines()) == 22

    proc = run_py("export", f"ckpt={ckpt}", "format=onnx", f"output={tmp_path}/x")
    assert proc.returncode == 1 and "format='onnx': expected one of ctranslate2" in proc.stderr
    proc = run_py("export", f"ckpt={ckpt}", f"output={tmp_path}/ct2")
    assert proc.returncode == 1 and "exists and is not empty" in proc.stderr


def translator_search(**settings):
    from seq2seq.search import SearchConfig

    return SearchConfig(beam_size=1, **settings)
