"""`run.py translate` and `run.py evaluate`: N lines in, N lines out, in order, whatever the input (fuzzed);
an output that cannot be written is one line and the input stays untouched."""
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq.checkpoint import load_checkpoint
from seq2seq.translator import Translator
from tests.conftest import ROOT, messages, run_limited, run_py

LINES = ["The big dog ate the red apple.", "", "   ", "Does the cat read the book?",
         "The big dog ate the red apple.", "Yesterday, the teacher did not wash the car.", "\t"]


@pytest.fixture(scope="module")
def translator(smoke_run):
    return Translator.from_checkpoint(smoke_run / "checkpoints" / "best.ckpt")


def test_translate_keeps_line_count_and_order(translator):
    out = translator.translate(LINES, beam_size=3, precision="32")
    assert len(out) == len(LINES)
    assert out[1:3] == ["", ""] and out[6] == ""
    assert out[0] and out[0] == out[4]  # the same line, wherever it is, same translation
    for precision in ("32", "int8"):  # int8 scales each row on its own, not by its batch
        batched = translator.translate(LINES, beam_size=3, precision=precision)
        alone = [translator.translate(line, beam_size=3, precision=precision) for line in LINES]  # a str in, a str out
        assert batched == alone
    assert len(translator.translate(LINES, beam_size=3)) == len(LINES)  # at the machine's own precision
    nbest = translator.translate_nbest(LINES, beam_size=3, nbest=2, precision="32")
    assert [hyps[0][0] for hyps in nbest] == out and len(nbest[0]) == 2 and nbest[0][0][1] >= nbest[0][1][1]


def test_a_line_that_is_not_a_str_is_a_type_error_naming_it(translator):
    """The Python API's bad input is one clear error naming the item, not an AttributeError from deep inside."""
    for call, error in [(lambda: translator.translate(["ok", 3]), "lines[1]: expected a str, got int"),
                        (lambda: translator.translate(None), "lines: expected a list of str, got NoneType"),
                        (lambda: translator.translate_nbest(["ok"], prefixes=[None]),
                         "prefixes[0]: expected a str, got NoneType"),
                        (lambda: translator.translate([b"bytes"], split=True), "lines[0]: expected a str, got bytes")]:
        with pytest.raises(TypeError) as e:
            call()
        assert str(e.value) == error


@pytest.mark.slow
def test_cli_stdin_to_stdout(smoke_run):
    text = "\n".join(LINES) + "\n"
    proc = run_py("translate", f"ckpt={smoke_run}/checkpoints/best.ckpt", "beam_size=2", input=text)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split("\n")) - 1 == len(LINES)


@pytest.mark.slow
def test_cli_split_translates_paragraphs_line_by_line(smoke_run, translator):
    paragraph = "The big dog ate the red apple. Does the cat read the book?"
    proc = run_py("translate", f"ckpt={smoke_run}/checkpoints/best.ckpt", "split=true", "beam_size=2",
                  "progress=false", input=f"{paragraph}\n\nThe big dog ate the red apple.\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split("\n")[:-1]
    parts = translator.translate(["The big dog ate the red apple.", "Does the cat read the book?"], beam_size=2)
    assert out == ["".join(parts), "", parts[0]]  # 3 lines in, 3 out; the demo corpus's target is Japanese
    proc = run_py("translate", f"ckpt={smoke_run}/checkpoints/best.ckpt", "split=true", "nbest=2", input="x\n")
    assert proc.returncode == 1 and "use nbest=1" in proc.stderr


@pytest.mark.slow
def test_cli_files_nbest_and_long_lines(smoke_run, tmp_path):
    (tmp_path / "in.en").write_text("The cat eats the fish.\n" + "the big dog " * 400 + "\n\n")
    proc = run_py("translate", f"ckpt={smoke_run}/checkpoints/best.ckpt", f"input={tmp_path}/in.en",
                  f"output={tmp_path}/out.ja", "nbest=3", "beam_size=3", "progress=false")
    assert proc.returncode == 0, proc.stderr
    assert "warning: line 2:" in proc.stderr and "truncated" in proc.stderr
    rows = [line.split(" ||| ") for line in (tmp_path / "out.ja").read_text().splitlines()]
    assert [r[0] for r in rows] == ["1", "1", "1", "2", "2", "2", "3"]  # an empty line: one empty translation
    assert rows[-1] == ["3", "", "0.0000"]
    scores = [float(r[2]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_cli_invalid_utf8_names_the_line_or_is_replaced(smoke_run, tmp_path):
    (tmp_path / "bad.en").write_bytes(b"The cat.\nbad \xff\xfe line\nThe dog.\n")
    proc = run_py("translate", f"ckpt={smoke_run}/checkpoints/best.ckpt", f"input={tmp_path}/bad.en")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}/bad.en:2: invalid UTF-8")
    proc = run_py("translate", f"ckpt={smoke_run}/checkpoints/best.ckpt", f"input={tmp_path}/bad.en",
                  "errors=replace")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3


@pytest.mark.slow
def test_cli_missing_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "translate", f"ckpt={tmp_path}/nope.ckpt"],
                          cwd=tmp_path, input="x\n", capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {tmp_path}/nope.ckpt: checkpoint not found"
    assert list(tmp_path.iterdir()) == []  # nothing left behind in the working directory


@pytest.mark.slow
def test_evaluate_on_files_and_on_the_corpus_test_split(smoke_run, tmp_path):
    ckpt = smoke_run / "checkpoints" / "best.ckpt"
    (tmp_path / "s.en").write_text("The cat eats the fish.\nThe dog reads the book.\n")
    (tmp_path / "r.ja").write_text("猫は魚を食べます。\n犬は本を読みます。\n")
    proc = run_py("evaluate", f"ckpt={ckpt}", f"src={tmp_path}/s.en", f"ref={tmp_path}/r.ja", "beam_size=2")
    assert proc.returncode == 0, proc.stderr
    hyp = smoke_run / "checkpoints" / "best.ckpt.s.hyp.ja"  # named after src=, beside the checkpoint
    assert len(hyp.read_text().splitlines()) == 2
    report = json.loads(hyp.with_name(hyp.name + ".json").read_text())
    assert report["sentences"] == 2 and "tok:ja-mecab" in report["bleu_signature"]
    assert f"BLEU {report['bleu']:.2f}" in proc.stdout
    proc = run_py("evaluate", f"ckpt={ckpt}", "beam_size=2", f"output={tmp_path}/test.ja")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "test.ja.json").read_text())["sentences"] == 200


@pytest.mark.slow
def test_evaluate_sweep_keeps_every_jobs_output(smoke_run, tmp_path):
    ckpt = smoke_run / "checkpoints" / "best.ckpt"
    (tmp_path / "dev.en").write_text("The cat eats the fish.\nThe dog reads the book.\n")
    (tmp_path / "dev.ja").write_text("猫は魚を食べます。\n犬は本を読みます。\n")
    proc = run_py("evaluate", "-m", f"ckpt={ckpt}", f"src={tmp_path}/dev.en", f"ref={tmp_path}/dev.ja",
                  "beam_size=2", "alpha=0.6,2.0", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr
    reports = [json.loads((tmp_path / "sweep" / str(job) / "best.ckpt.dev.hyp.ja.json").read_text())
               for job in (0, 1)]  # one per job: the second did not overwrite the first
    assert [r["search"]["alpha"] for r in reports] == [0.6, 2.0]
    assert all(len(open(r["hypotheses"]).read().splitlines()) == 2 for r in reports)
    assert not (smoke_run / "checkpoints" / "best.ckpt.dev.hyp.ja").exists()


@pytest.mark.slow
def test_average_checkpoints(smoke_run, tmp_path):
    best, last = smoke_run / "checkpoints" / "step000075.ckpt", smoke_run / "checkpoints" / "step000150.ckpt"
    proc = run_py("average", f"ckpts=[{best},{last}]", f"output={tmp_path}/avg.ckpt")
    assert proc.returncode == 0, proc.stderr
    a, b = load_checkpoint(best)["state_dict"], load_checkpoint(last)["state_dict"]
    avg = load_checkpoint(tmp_path / "avg.ckpt")["state_dict"]
    name = "model.embed.weight"
    torch.testing.assert_close(avg[name], (a[name] + b[name]) / 2)
    out = Translator.from_checkpoint(tmp_path / "avg.ckpt").translate(["The cat eats the fish."], beam_size=2)
    assert len(out) == 1 and out[0]


@pytest.mark.slow  # starts an interpreter
def test_the_inference_path_imports_no_lightning():
    """Translator, search, tokenizer, checkpoint loading and the samplers are what a service or a script
    imports: Lightning (seconds to import, and a training framework) stays out of them."""
    modules = "seq2seq.translator seq2seq.search seq2seq.tokenizer seq2seq.checkpoint seq2seq.data seq2seq.files"
    frameworks = {"lightning", "pytorch_lightning", "hydra"}
    code = (f"import sys\nfor m in {modules.split()!r}: __import__(m)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {frameworks!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def fuzz_translator(smoke_run):
    return Translator.from_checkpoint(smoke_run / "checkpoints" / "best.ckpt")


LINE = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.sampled_from(list("\u200b\u200d\ufeff\x00\x07\x1b\t \u3000😀👍🏽漢字かなカナabc<>/")),
            max_size=40),
    st.sampled_from(["", " ", "</s>", "<unk>", "<s>", "<pad>", "▁", "\u2028", "\x1c", "a" * 3000]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=12))
def test_fuzzed_lines_in_equal_lines_out(fuzz_translator, lines):
    lines = [line.replace("\n", " ") for line in lines]  # one line each, as read_input would split them
    out = fuzz_translator.translate_nbest(lines, beam_size=2, max_len_b=5)
    assert len(out) == len(lines)
    for line, hyps in zip(lines, out):
        assert len(hyps) == 1 and isinstance(hyps[0][0], str) and "\n" not in hyps[0][0]
        if not line.split():
            assert hyps[0][0] == ""


@pytest.mark.slow
def test_translate_output_that_cannot_be_written_is_one_line_and_the_input_is_untouched(smoke_run, tmp_path):
    ckpt = f"ckpt={smoke_run}/checkpoints/best.ckpt"
    source = tmp_path / "in.en"
    source.write_text("The cat eats the fish.\nThe dog reads the book.\n")
    before = source.read_bytes()
    (tmp_path / "a_file").write_text("")

    proc = run_py("translate", ckpt, f"input={source}", f"output={tmp_path}/a_file/out.ja")  # caught up front
    assert proc.returncode == 1
    assert proc.stderr.strip() == \
        f"error: {tmp_path}/a_file/out.ja: cannot write ({tmp_path}/a_file is not a directory)"

    proc = run_limited(["translate", ckpt, f"input={source}", f"output={tmp_path}/out.ja", "progress=false"], 10)
    assert proc.returncode == 1
    assert messages(proc.stderr) == [f"error: {tmp_path}/out.ja: cannot write (File too large)"]
    assert not (tmp_path / "out.ja").exists() and not (tmp_path / ".out.ja.tmp").exists()  # nothing half-written

    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "run.py", "translate", ckpt, f"input={source}", "progress=false"],
                              cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1
    assert messages(proc.stderr) == ["error: <stdout>: cannot write (No space left on device)"]

    proc = run_py("translate", ckpt, f"input={source}", f"output={source}")
    assert proc.returncode == 1 and "output= is the input file" in proc.stderr
    assert source.read_bytes() == before


class Numbered:
    """A stand-in translator for the streaming loop: each line's translation is its text reversed."""

    def __init__(self):
        self.chunks = []

    def translate_nbest(self, lines, search, pretokenized=False, prefixes=None, scores=True):
        self.chunks.append(len(lines))
        prefixes = prefixes or [""] * len(lines)
        return [[(p + line[::-1], 0.0), (p + line, -1.0)][:search.nbest] for line, p in zip(lines, prefixes)]


def test_the_stream_keeps_one_line_per_line_in_order_across_chunks():
    from seq2seq.search import SearchConfig
    from seq2seq.translate import translate_stream

    translator, lines = Numbered(), [f"line {i}" for i in range(7)] + [""]
    out = "".join(translate_stream(translator, iter(lines), SearchConfig(beam_size=2, nbest=1), chunk_lines=3))
    assert out.splitlines() == [line[::-1] for line in lines] and translator.chunks == [3, 3, 2]
    out = "".join(translate_stream(Numbered(), iter(lines), SearchConfig(beam_size=2, nbest=2), chunk_lines=3))
    numbers = [int(row.split(" ||| ")[0]) for row in out.splitlines()]
    assert numbers == [i for i in range(1, 9) for _ in range(2)]  # numbered across chunks, n-best per line


def test_the_stream_is_lazy_the_first_chunk_comes_before_the_rest_is_read():
    from seq2seq.search import SearchConfig
    from seq2seq.translate import translate_stream

    read = []

    def source():
        for i in range(10):
            read.append(i)
            yield f"x{i}"

    stream = translate_stream(Numbered(), source(), SearchConfig(beam_size=1), chunk_lines=2)
    assert next(stream) == "0x\n1x\n" and read == [0, 1]  # the third line is not even read yet


@pytest.mark.slow
def test_cli_streams_piped_input(smoke_run):
    """The first translations come out while stdin is still open."""
    proc = subprocess.Popen([sys.executable, "run.py", "translate", f"ckpt={smoke_run}/checkpoints/best.ckpt",
                             "chunk_lines=2", "beam_size=1", "progress=false"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdin.write("The cat eats the fish.\nThe big dog ate the red apple.\n")
    proc.stdin.flush()
    first = proc.stdout.readline()  # answered before more input exists
    proc.stdin.write("Does the cat read the book?\n")
    proc.stdin.close()
    rest = proc.stdout.read().splitlines()
    assert proc.wait(60) == 0 and first.strip() and len(rest) == 2


@pytest.mark.slow
def test_cli_on_a_terminal_answers_each_line_as_it_is_typed(smoke_run):
    import os
    import pty
    import select

    terminal, typed = pty.openpty()
    proc = subprocess.Popen([sys.executable, "run.py", "translate", f"ckpt={smoke_run}/checkpoints/best.ckpt",
                             "beam_size=1"], cwd=ROOT, stdin=typed, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        os.write(terminal, b"The cat eats the fish.\n")
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # the event: an answer, with the terminal open
        assert ready and proc.stdout.readline().strip()
    finally:
        proc.kill()
        os.close(terminal)
        os.close(typed)


def test_prefixes_are_read_alongside_the_lines_and_must_match_them():
    from seq2seq import Seq2SeqError
    from seq2seq.search import SearchConfig
    from seq2seq.translate import translate_stream

    search = SearchConfig(beam_size=1)
    out = "".join(translate_stream(Numbered(), ["ab", "cd", "ef"], search, 2, prefixes=["X", "", "Y"]))
    assert out.splitlines() == ["Xba", "dc", "Yfe"]
    with pytest.raises(Seq2SeqError, match="prefix= has 2 lines but the input has more"):
        "".join(translate_stream(Numbered(), ["ab", "cd", "ef"], search, 2, prefixes=["X", "Y"]))
    with pytest.raises(Seq2SeqError, match="prefix= has more lines than the input's 3"):
        "".join(translate_stream(Numbered(), ["ab", "cd", "ef"], search, 2, prefixes=["X", "Y", "Z", "W"]))


@pytest.mark.slow
def test_cli_prefix_file_forces_how_each_translation_begins(smoke_run, translator, tmp_path):
    (tmp_path / "in.en").write_text("The big dog ate the red apple.\nDoes the cat read the book?\n")
    free = translator.translate(["The big dog ate the red apple.", "Does the cat read the book?"], beam_size=3,
                                precision="32")
    (tmp_path / "prefix.ja").write_text("猫は\n\n")
    proc = run_py("translate", f"ckpt={smoke_run}/checkpoints/best.ckpt", f"input={tmp_path}/in.en",
                  f"prefix={tmp_path}/prefix.ja", "beam_size=3", "precision=32", "progress=false")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.startswith("猫は") and not free[0].startswith("猫は") and second == free[1]


@pytest.mark.parametrize("nbest", [1, 2])
def test_shards_joined_in_order_equal_the_single_process_output(tmp_path, nbest):
    """devices=N: rank r translates chunks r, r+N, ... into its shard; joining them gives the one-process text."""
    import io

    from seq2seq.search import SearchConfig
    from seq2seq.translate import merge_shards, translate_shard, translate_stream

    lines, search, world = [f"line {i}" for i in range(11)] + ["", "x\ry"], SearchConfig(beam_size=2, nbest=nbest), 3
    expected = "".join(translate_stream(Numbered(), lines, search, chunk_lines=2))
    paths, sizes = [tmp_path / f"{r}" for r in range(world)], []
    for rank, path in enumerate(paths):
        with open(path, "w", encoding="utf-8", newline="") as shard:
            sizes.append(translate_shard(Numbered(), lines, shard, search, 2, rank, world))
    assert [len(s) for s in sizes] == [3, 2, 2]  # 7 chunks dealt round the ranks
    out = io.StringIO()
    merge_shards(paths, sizes, out)
    assert out.getvalue() == expected and len(out.getvalue().split("\n")) == len(lines) * nbest + 1


@pytest.mark.slow
def test_cli_two_processes_write_what_one_writes(smoke_run, tmp_path):
    """`devices=2` on CPU: two processes (Lightning Fabric, gloo) each take every other chunk; the joined
    output equals one process's, line for line, and no shard is left behind."""
    src = tmp_path / "in.en"
    src.write_text("\n".join(["The cat eats the fish.", "The big dog ate the red apple.", "",
                              "Does the cat read the book?", "The bird sings."] * 3) + "\n")
    common = [sys.executable, "run.py", "translate", f"ckpt={smoke_run}/checkpoints/best.ckpt", f"input={src}",
              "chunk_lines=2", "precision=32", "device=cpu", "progress=false"]
    one = subprocess.run(common + [f"output={tmp_path / 'one.ja'}"], cwd=ROOT, capture_output=True, text=True)
    two = subprocess.run(common + [f"output={tmp_path / 'two.ja'}", "devices=2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "two.ja").read_text() == (tmp_path / "one.ja").read_text()
    assert len((tmp_path / "two.ja").read_text().splitlines()) == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.en", "one.ja", "two.ja"]
    bad = subprocess.run(common[:-1] + ["input=-", "devices=2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "give input=FILE, not stdin" in bad.stderr and "Traceback" not in bad.stderr
