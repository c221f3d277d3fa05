"""Corpus loading, cleaning and every bad-input error (one line naming the file, and line)."""
import http.server
import subprocess
import sys
import threading
from dataclasses import asdict, replace

import pytest

from seq2seq import Seq2SeqError
from seq2seq.corpora import (SMALL_ENJA_LINES, DataConfig, clean_corpus, clean_line, fetch,
                             load_corpus, read_parallel)
from tests.conftest import ROOT, write_small_enja_mirror


def data_cfg(corpus, directory, **kw) -> DataConfig:
    base = dict(corpus=corpus, dir=str(directory), src_lang="en", tgt_lang="ja", pretokenized=False,
                normalize=True, vocab_size=300, max_len=64, max_tokens=1024, num_workers=0, prepare_workers=1,
                dedup=True, segmentation="corpus", tokenizer_sample=500_000)
    return DataConfig(**{**base, **kw})


def test_clean_line_nfkc_and_whitespace():
    assert clean_line("  Ｈｅｌｌｏ\u3000 ｗｏｒｌｄ！\t", nfkc=True) == "Hello world!"
    assert clean_line("  Ｈｅｌｌｏ\u3000 ｗｏｒｌｄ！\t", nfkc=False) == "Ｈｅｌｌｏ ｗｏｒｌｄ！"


def test_clean_corpus_drops_empty_training_pairs_but_keeps_every_test_line():
    corpus = {"train": (["a", " ", "b"], ["x", "y", "\u3000"]), "valid": (["", "c"], ["z", ""]),
              "test": ([" "], ["w"])}
    cleaned = clean_corpus(corpus, nfkc=True)
    assert cleaned["train"] == (["a"], ["x"])
    assert cleaned["valid"] == (["", "c"], ["z", ""]) and cleaned["test"] == ([""], ["w"])


def test_mismatched_line_counts(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.ja").write_text("一\n")
    with pytest.raises(Seq2SeqError, match=r"a\.en has 2 lines but .*a\.ja has 1"):
        read_parallel(tmp_path / "a.en", tmp_path / "a.ja")


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "a.en").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    (tmp_path / "a.ja").write_text("一\n二\n三\n")
    with pytest.raises(Seq2SeqError, match=r"a\.en:3: invalid UTF-8"):
        read_parallel(tmp_path / "a.en", tmp_path / "a.ja")


def test_missing_file(tmp_path):
    (tmp_path / "a.en").write_text("x\n")
    with pytest.raises(Seq2SeqError, match=r"missing\.ja: cannot read"):
        read_parallel(tmp_path / "a.en", tmp_path / "missing.ja")


def test_files_corpus_requires_paths(tmp_path):
    with pytest.raises(Seq2SeqError, match="data.train_src is not set"):
        load_corpus(data_cfg("files", tmp_path))


def test_small_enja_fetches_from_a_file_url_mirror_and_swaps_direction(tmp_path):
    write_small_enja_mirror(tmp_path / "mirror")
    cfg = data_cfg("small_enja", tmp_path / "corpus", url=(tmp_path / "mirror").as_uri())
    corpus = load_corpus(cfg)
    assert {s: len(corpus[s][0]) for s in corpus} == SMALL_ENJA_LINES
    assert corpus["test"][0][1] == "sentence 1 ." and corpus["test"][1][1] == "文 1 。"
    assert (tmp_path / "corpus" / "train.ja").exists()
    jaen = load_corpus(replace(cfg, src_lang="ja", tgt_lang="en"))
    assert jaen["valid"][0][0] == "文 0 。"


def test_small_enja_fetch_failure_says_how_to_provide_the_files(tmp_path):
    cfg = data_cfg("small_enja", tmp_path / "corpus", url=(tmp_path / "nowhere").as_uri())
    with pytest.raises(Seq2SeqError, match="could not fetch .*experiment=smoke"):
        load_corpus(cfg)


def test_fetch_names_the_project_to_hosts_that_refuse_urllibs_agent(tmp_path):
    # a host like those that answer "Python-urllib/3.x" with 403 Forbidden
    class Host(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            refused = self.headers.get("User-Agent", "").startswith("Python-urllib")
            self.send_response(403 if refused else 200)
            self.end_headers()
            self.wfile.write(b"" if refused else "tea\tお茶\n".encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fetch(f"http://127.0.0.1:{server.server_port}/pairs.tsv", tmp_path / "pairs.tsv")
    finally:
        server.shutdown()
    assert (tmp_path / "pairs.tsv").read_text() == "tea\tお茶\n"


def test_small_enja_wrong_line_count(tmp_path):
    write_small_enja_mirror(tmp_path / "mirror", n_train=10)
    cfg = data_cfg("small_enja", tmp_path / "corpus", url=str(tmp_path / "mirror"))  # a plain path works too
    with pytest.raises(Seq2SeqError, match=r"train\.en has 10 lines, .* has 50000"):
        load_corpus(cfg)


def test_tatoeba_split_keeps_each_english_sentence_in_one_split(tmp_path):
    lines = []
    for i in range(400):
        lines += [f"Sentence {i}.\t文{i}です。\tCC-BY 2.0 (France) Attribution", f"Sentence {i}.\t文{i}だ。"]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    cfg = data_cfg("tatoeba", tmp_path, valid_percent=10, test_percent=10, columns=["en", "ja", "attribution"])
    corpus = load_corpus(cfg)
    english = {split: set(corpus[split][0]) for split in corpus}
    assert sum(len(corpus[s][0]) for s in corpus) == 800
    assert all(len(corpus[s][0]) > 0 for s in corpus)
    assert not (english["train"] & english["valid"] or english["train"] & english["test"]
                or english["valid"] & english["test"])
    assert load_corpus(cfg) == corpus  # deterministic
    jaen = load_corpus(replace(cfg, src_lang="ja", tgt_lang="en"))
    assert jaen["train"] == (corpus["train"][1], corpus["train"][0])


def test_tatoeba_line_without_tab(tmp_path):
    (tmp_path / "pairs.tsv").write_text("Hi.\tやあ。\nno tab here\n")
    with pytest.raises(Seq2SeqError, match=r"pairs\.tsv:2: 1 tab-separated column\(s\) where data.columns names 2"):
        load_corpus(data_cfg("tatoeba", tmp_path, valid_percent=5, test_percent=5, columns=["en", "ja"]))


def test_tsv_columns_scores_and_held_out_splits(tmp_path):
    """JParaCrawl's layout (domain, score, en, ja), gzip'd: low scores dropped, dev/test cut by hash of the
    English side, or taken from their own files; a bad score or a short line names file and line."""
    import gzip

    lines = [f"site{i}.jp\t{0.5 + (i % 10) / 20}\tSentence {i}.\t文{i}です。" for i in range(2000)]
    with gzip.open(tmp_path / "train.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    cfg = data_cfg("tsv", tmp_path / "out", train_tsv=str(tmp_path / "train.tsv.gz"),
                   columns=["domain", "score", "en", "ja"], min_score=0.7, valid_percent=5, test_percent=5)
    corpus = load_corpus(cfg)
    assert sum(len(corpus[s][0]) for s in corpus) == 1200  # scores 0.5 .. 0.95: 6 of every 10 reach 0.7
    assert 30 < len(corpus["valid"][0]) < 100 and 30 < len(corpus["test"][0]) < 100
    assert corpus["train"][0][0] == "Sentence 4." and corpus["train"][1][0] == "文4です。"
    assert not set(corpus["train"][0]) & (set(corpus["valid"][0]) | set(corpus["test"][0]))
    jaen = load_corpus(replace(cfg, src_lang="ja", tgt_lang="en"))
    assert jaen["test"] == (corpus["test"][1], corpus["test"][0])

    (tmp_path / "dev.tsv").write_text("x\t1\tDev one.\t開発。\n")
    (tmp_path / "test.tsv").write_text("x\t1\tTest one.\t試験。\n")
    own = load_corpus(replace(cfg, dir=str(tmp_path / "own"), valid_tsv=str(tmp_path / "dev.tsv"),
                              test_tsv=str(tmp_path / "test.tsv")))
    assert own["valid"] == (["Dev one."], ["開発。"]) and len(own["train"][0]) == 1200
    dev_only = load_corpus(replace(cfg, dir=str(tmp_path / "dev_only"), valid_tsv=str(tmp_path / "dev.tsv")))
    assert dev_only["valid"] == own["valid"] and dev_only["test"] == corpus["test"]  # only test is cut

    (tmp_path / "bad.tsv").write_text("x\t0.9\tA.\tあ。\nx\thigh\tB.\tい。\n")
    with pytest.raises(Seq2SeqError, match=r"bad\.tsv:2: score column: 'high' is not a number"):
        load_corpus(replace(cfg, dir=str(tmp_path / "bad"), train_tsv=str(tmp_path / "bad.tsv")))
    with pytest.raises(Seq2SeqError, match=r"data.columns=\['en', 'score'\]: no column holds ja"):
        load_corpus(replace(cfg, dir=str(tmp_path / "bad2"), columns=["en", "score"]))


def test_demo_corpus_splits_are_disjoint(demo_corpus):
    train, valid, test = (set(demo_corpus[s][0]) for s in ("train", "valid", "test"))
    assert len(train) == 6000 and len(valid) == 200 and len(test) == 200
    assert not (train & valid or train & test or valid & test)


@pytest.mark.slow
def test_run_py_reports_a_bad_corpus_in_one_line(tmp_path):
    (tmp_path / "t.en").write_text("a\nb\n")
    (tmp_path / "t.ja").write_bytes(b"\xe3\x81\x82\n\xff\n")
    paths = [f"data.{split}_{side}={tmp_path}/t.{lang}" for split in ("train", "valid", "test")
             for side, lang in (("src", "en"), ("tgt", "ja"))]
    proc = subprocess.run([sys.executable, "run.py", "train", "data=files", "model=tiny", "trainer=debug",
                           f"data_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", *paths],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path}/t.ja:2: invalid UTF-8 (invalid start byte at byte 0)"
    assert "Traceback" not in proc.stderr


def test_gzipped_files_are_read_as_they_are_and_a_torn_one_is_one_line(tmp_path):
    import gzip

    from seq2seq.files import read_lines

    with gzip.open(tmp_path / "a.en.gz", "wb") as f:
        f.write("one\ntwo\r\nthree\n".encode())
    assert read_lines(tmp_path / "a.en.gz") == ["one", "two", "three"]
    (tmp_path / "torn.gz").write_bytes((tmp_path / "a.en.gz").read_bytes()[:-12])
    with pytest.raises(Seq2SeqError, match=r"torn.gz: cannot read"):
        read_lines(tmp_path / "torn.gz")


def test_no_dev_or_test_sentence_is_trained_on(tmp_path):
    """The first pass over the training pairs keeps the first of duplicates and drops empty pairs and any
    pair with a dev/test side; the tokenizer's sample is the kept sources, then the kept targets."""
    from seq2seq.datamodule import scan_train

    train = [("a", "1"), ("b", "2"), ("a", "1"), ("c", "3"), ("d", " "), ("e", "5"), ("  f ", "6"), ("f", "6")]
    cfg = data_cfg("demo", tmp_path)
    keep, sample = scan_train(iter(train), cfg, held_src={"c"}, held_tgt={"5"})
    assert keep.tolist() == [True, True, False, False, False, False, True, False]  # "  f " cleans to "f"
    assert sample == ["a", "b", "f", "1", "2", "6"]
    keep, _ = scan_train(iter(train), replace(cfg, dedup=False), held_src={"c"}, held_tgt={"5"})
    assert keep.tolist() == [True, True, True, True, False, True, True, True]  # only the empty side goes
    with pytest.raises(Seq2SeqError, match="no pair left"):
        scan_train(iter([("c", "9")]), cfg, held_src={"c"}, held_tgt=set())


def test_the_arrays_are_the_same_on_any_number_of_preparation_processes(tmp_path):
    """data.prepare_workers: chunks prepared on 2 processes give the same keep mask, sample and token files,
    byte for byte, as one process (small chunks, so that there are many; duplicates across chunks)."""
    from seq2seq.datamodule import encode_train, scan_train
    from seq2seq.demo_corpus import generate_pairs
    from seq2seq.tokenizer import train_tokenizer

    pairs = generate_pairs(300, seed=1)
    pairs = pairs + pairs[:40] + [("  ", "x"), (pairs[5][0], "different")]  # duplicates, an empty side
    held = {pairs[7][0]}
    out = {}
    for workers in (1, 2):
        cfg = data_cfg("demo", tmp_path, prepare_workers=workers, tokenizer_sample=100, max_len=12)
        keep, sample = scan_train(iter(pairs), cfg, held_src=held, held_tgt=set(), chunk_pairs=17)
        tokenizer = train_tokenizer(sample, 500, tmp_path / "spm")
        (tmp_path / f"w{workers}").mkdir()
        dataset = encode_train(iter(pairs), keep, cfg, tokenizer, tmp_path / f"w{workers}", chunk_pairs=17)
        files = sorted((tmp_path / f"w{workers}").iterdir())
        out[workers] = keep.tolist(), sample, [(f.name, f.read_bytes()) for f in files], len(dataset)
    assert out[1] == out[2]
    keep, _, files, n = out[1]
    assert sum(keep) == 300 and len(files) == 4 and 0 < n < 300  # held out 1, a new pair 1; max_len=12 drops some


def test_the_tokenizer_sample_is_bounded_and_uniform(tmp_path):
    from seq2seq.datamodule import scan_train

    train = [(f"s{i}", f"t{i}") for i in range(1000)]
    keep, sample = scan_train(iter(train), data_cfg("demo", tmp_path, tokenizer_sample=100), set(), set())
    assert keep.all() and len(sample) == 200
    sources = [int(s[1:]) for s in sample[:100]]
    assert sources == sorted(sources) and [f"t{i}" for i in sources] == sample[100:]  # pairs, in corpus order
    assert 300 < sum(sources) / 100 < 700  # drawn from the whole corpus, not its head


def test_a_data_config_stored_by_an_older_version_still_loads(tmp_path):
    from dataclasses import asdict

    stored = asdict(data_cfg("demo", tmp_path))
    del stored["dedup"], stored["segmentation"]  # written before these existed: not applied
    stored["from_the_future"] = 1
    assert DataConfig.stored(stored).dedup is False and DataConfig.stored(stored).corpus == "demo"
    assert DataConfig.stored(stored).segmentation == "corpus"


def test_mecab_segmentation_resegments_the_japanese_side_of_every_split(tmp_path):
    """KyTea's words (small_parallel_enja) joined and cut again by MeCab, as translate cuts raw Japanese."""
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.en").write_text("who will arrive first ?\ntom likes tea .\n")
        (tmp_path / f"{split}.ja").write_text("誰 が 一番 に 着 く か 。\nトム は お 茶 が 好き だ 。\n")
    files = {f"{s}_{side}": str(tmp_path / f"{n}.{lang}") for s, n in (("train", "train"), ("valid", "dev"),
             ("test", "test")) for side, lang in (("src", "ja"), ("tgt", "en"))}
    cfg = data_cfg("files", tmp_path, pretokenized=True, src_lang="ja", tgt_lang="en", **files)
    assert load_corpus(cfg)["test"][0][0] == "誰 が 一番 に 着 く か 。"
    corpus = load_corpus(replace(cfg, segmentation="mecab"))
    for split in ("train", "valid", "test"):
        assert corpus[split][0] == ["誰 が 一番 に 着く か 。", "トム は お茶 が 好き だ 。"]
        assert corpus[split][1] == ["who will arrive first ?", "tom likes tea ."]  # English untouched
    from seq2seq.corpora import aligned_lines
    from seq2seq.datamodule import scan_train

    # training reads the raw lines and segments them in its preparation processes (here 2, a pair each)
    _, sample = scan_train(aligned_lines(tmp_path / "train.ja", tmp_path / "train.en"),
                           replace(cfg, segmentation="mecab", prepare_workers=2), set(), set(), chunk_pairs=1)
    assert sample == corpus["train"][0] + corpus["train"][1]
    with pytest.raises(ValueError, match="data.segmentation=mecab re-segments a pre-tokenized corpus"):
        replace(cfg, pretokenized=False, segmentation="mecab")
    with pytest.raises(ValueError, match="data.segmentation='kytea': expected corpus or mecab"):
        replace(cfg, segmentation="kytea")


def test_combined_corpus_makes_pretokenized_parts_raw_and_trains_on_no_dev_or_test_sentence(tmp_path):
    """data=combined: a raw part and a pre-tokenized, lowercased part become one raw corpus. The English of
    the second is truecased from the first's ("tom" -> "Tom"), its Japanese words joined; a pair whose side
    is a dev/test sentence of either part, written any way, is not trained on; dev/test are the first part's."""
    from seq2seq.corpora import corpus_files

    def part(name, lines, pretokenized):
        for split, (en, ja) in lines.items():
            (tmp_path / f"{name}.{split}.en").write_text("".join(s + "\n" for s in en), encoding="utf-8")
            (tmp_path / f"{name}.{split}.ja").write_text("".join(s + "\n" for s in ja), encoding="utf-8")
        return asdict(data_cfg("files", tmp_path, pretokenized=pretokenized, **{
            f"{split}_{side}": str(tmp_path / f"{name}.{split}.{lang}") for split in ("train", "valid", "test")
            for side, lang in (("src", "en"), ("tgt", "ja"))}))

    raw = part("raw", {"train": (["Tom likes tea.", "Tom is here."], ["トムはお茶が好きだ。", "トムはここにいる。"]),
                       "valid": (["I like tea."], ["私はお茶が好きです。"]), "test": (["Go."], ["行け。"])}, False)
    tok = part("tok", {"train": (["tom likes coffee .", "i like tea !", "she runs ."],
                                 ["トム は コーヒー が 好き だ 。", "お 茶 が 好き だ 。", "彼女 は 走る 。"]),
                       "valid": (["he swims ."], ["彼 は 泳ぐ 。"]), "test": (["tom is here ."], ["x"])}, True)
    cfg = data_cfg("combined", tmp_path / "combined", parts={"raw": raw, "tok": tok})
    files = corpus_files(cfg)
    read = lambda path: path.read_text(encoding="utf-8").splitlines()  # noqa: E731
    # "Tom is here." is tok's test
    assert read(files["train"][0]) == ["Tom likes tea.", "Tom likes coffee.", "She runs."]
    assert read(files["train"][1]) == ["トムはお茶が好きだ。", "トムはコーヒーが好きだ。", "彼女は走る。"]
    assert read(files["valid"][0]) == ["I like tea."] and read(files["test"][1]) == ["行け。"]
    assert corpus_files(cfg) == files  # the second time: from the stamp, nothing rewritten
    with pytest.raises(Seq2SeqError, match="data.parts is empty"):
        corpus_files(data_cfg("combined", tmp_path / "c2", parts={}))
