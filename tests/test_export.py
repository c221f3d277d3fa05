"""`run.py export format=ctranslate2|huggingface` and `translate backend=ctranslate2`: the exported model
decodes as ours does."""
import pytest
import torch

from seq2seq import Seq2SeqError
from seq2seq.model import Transformer
from tests.conftest import run_py


def post_norm(model: Transformer) -> Transformer:
    from dataclasses import replace

    torch.manual_seed(0)
    return Transformer(replace(model.cfg, pre_norm=False, n_enc_layers=2, n_dec_layers=2)).eval()


def up_to_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def test_marian_computes_our_logits_and_greedy_output(tiny_model, tokenizer):
    from seq2seq.export import to_marian
    from seq2seq.search import SearchConfig, greedy_search
    from tests.conftest import batch

    model = post_norm(tiny_model)
    marian = to_marian(model, tokenizer)
    src, tgt = batch(tokenizer.vocab_size, B=4, S=9, T=7)
    src[:, -1] = tokenizer.eos_id
    src[1, 5:], src[1, 4] = tokenizer.pad_id, tokenizer.eos_id  # a shorter sentence, padded
    with torch.no_grad():
        theirs = marian(input_ids=src, attention_mask=src.ne(tokenizer.pad_id), decoder_input_ids=tgt).logits
        greedy = marian.generate(input_ids=src, attention_mask=src.ne(tokenizer.pad_id))
    torch.testing.assert_close(theirs, model(src, tgt), atol=1e-5, rtol=1e-5)
    ours, _ = greedy_search(model, src, model.pad_mask(src), SearchConfig(beam_size=1, max_len_b=500))
    assert up_to_eos(greedy[:, 1:].tolist(), tokenizer.eos_id) == up_to_eos(ours.tolist(), tokenizer.eos_id)
    assert max(len(r) for r in ours.tolist()) > 5  # the random model writes more than a word or two

    with pytest.raises(Seq2SeqError, match="pre-norm model: Hugging Face's MarianMTModel is post-norm only"):
        to_marian(tiny_model, tokenizer)


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
                for row in greedy_search(model, src, model.pad_mask(src), translator_search(max_len_b=64))[0].tolist()]
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
    cut = ["max_len_a=0", "max_len_b=3"]  # every line reaches the length limit: both stop after 3 tokens
    ours = run_py("translate", f"ckpt={ckpt}", "precision=32", "pretokenized=true", *args, *cut)
    theirs = run_py("translate", "backend=ctranslate2", f"ckpt={tmp_path}/ct2", "precision=32", "pretokenized=true",
                    *args, *cut)
    assert theirs.stdout == ours.stdout, theirs.stderr

    proc = run_py("translate", "backend=ctranslate2", f"ckpt={tmp_path}/ct2", "device=cpu", "precision=16",
                  input="a\n")  # a compute type CTranslate2 refuses here: one line, before any work
    assert proc.returncode == 1 and proc.stderr.startswith("error: precision=16 on cpu: CTranslate2: ") \
        and len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    proc = run_py("export", f"ckpt={ckpt}", "format=onnx", f"output={tmp_path}/x")
    assert proc.returncode == 1 and "format='onnx': expected one of ctranslate2" in proc.stderr
    proc = run_py("export", f"ckpt={ckpt}", f"output={tmp_path}/ct2")
    assert proc.returncode == 1 and "exists and is not empty" in proc.stderr


def translator_search(**settings):
    from seq2seq.search import SearchConfig

    return SearchConfig(beam_size=1, **settings)


@pytest.mark.slow
def test_post_norm_model_exports_to_huggingface_and_ctranslate2(tmp_path, data_dir):
    """A post-norm model trained by `run.py train`, exported through the command line to both formats: the
    MarianTokenizer gives our ids, and transformers' `generate` and CTranslate2 give our greedy output."""
    import ctranslate2
    from transformers import MarianMTModel, MarianTokenizer

    from seq2seq.search import SearchConfig, greedy_search
    from seq2seq.translator import Translator, pad_batch

    run = tmp_path / "run"
    proc = run_py("train", "experiment=smoke", "model.pre_norm=false", "trainer.max_steps=150",
                  "trainer.val_check_interval=150", "trainer.enable_progress_bar=false", f"data_dir={data_dir}",
                  f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    for fmt in ("huggingface", "ctranslate2"):
        proc = run_py("export", f"ckpt={ckpt}", f"format={fmt}", f"output={tmp_path}/{fmt}")
        assert proc.returncode == 0, proc.stderr

    translator = Translator.from_checkpoint(ckpt, device="cpu")
    tok = translator.tokenizer
    lines = translator.prepare((data_dir / "demo" / "test.en").read_text(encoding="utf-8").splitlines()[:100])
    ids = translator.encode(lines)
    src = pad_batch(ids)
    with translator.decoding(SearchConfig(beam_size=1, precision="32")) as model:
        ours = greedy_search(model, src, model.pad_mask(src), SearchConfig(beam_size=1, max_len_b=500))[0].tolist()

    hf_tok = MarianTokenizer.from_pretrained(tmp_path / "huggingface")
    hf_model = MarianMTModel.from_pretrained(tmp_path / "huggingface").eval()
    inputs = hf_tok(lines, return_tensors="pt", padding=True)
    assert inputs["input_ids"].tolist() == src.tolist()  # source pieces + eos, padded
    with torch.no_grad():
        theirs = hf_model.generate(**inputs)[:, 1:].tolist()  # without the start token
    assert up_to_eos(theirs, tok.eos_id) == up_to_eos(ours, tok.eos_id)  # token for token, all 100
    assert hf_tok.batch_decode(theirs, skip_special_tokens=True) == tok.decode(ours)

    ct2 = ctranslate2.Translator(str(tmp_path / "ctranslate2"), device="cpu", compute_type="float32")
    theirs = [r.hypotheses[0] for r in ct2.translate_batch([tok.pieces(s) + ["</s>"] for s in ids], beam_size=1,
                                                           max_decoding_length=128)]
    assert theirs == [tok.pieces(row[:row.index(tok.eos_id)]) for row in ours]
