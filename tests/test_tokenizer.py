"""SentencePiece round-trips (English, Japanese, full-width punctuation, emoji) and caching."""
import pytest

from seq2seq import Seq2SeqError

from seq2seq.corpora import clean_line
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

TEXTS = ["The big dog ate the red apple.", "昨日、大きい犬は公園でりんごを食べました。",
         "「こんにちは！」と彼は言った。（全角）", "I ❤️ 寿司 🍣 and emoji 😀👍🏽", "Ünïcödé café naïve — “quotes”",
         "数字 ０１２ and ½ ﬁ ligature", "한국어 and Ελληνικά and עברית"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_after_cleaning(tokenizer, text):
    """Every character survives (byte fallback): decode(encode(x)) == x for cleaned x."""
    for nfkc in (False, True):
        line = clean_line(text, nfkc)
        assert tokenizer.decode(tokenizer.encode([line])) == [line]


def test_one_thread_encodes_line_by_line_alike(tokenizer):
    """threads=1 encodes each string alone (no SentencePiece thread pool): the same ids as the batch call."""
    lines = [clean_line(text, False) for text in TEXTS] + ["", "the cat"]
    assert tokenizer.encode(lines, threads=1) == tokenizer.sp.encode(lines) == tokenizer.encode(lines)
    assert tokenizer.decode(tokenizer.sp.encode(lines)) == tokenizer.sp.decode(tokenizer.sp.encode(lines)) == lines


def test_special_ids_and_decode_stops_at_eos(tokenizer):
    ids = tokenizer.encode(["the cat"])[0]
    assert tokenizer.pad_id == PAD_ID == tokenizer.sp.pad_id()
    assert tokenizer.sp.bos_id() == BOS_ID and tokenizer.sp.eos_id() == EOS_ID
    assert tokenizer.decode([[BOS_ID] + ids + [EOS_ID] + ids + [PAD_ID]]) == ["the cat"]


def test_second_training_reuses_the_cache(demo_corpus, tmp_path):
    src, tgt = demo_corpus["train"]
    first = train_tokenizer(src[:500] + tgt[:500], 400, tmp_path)
    cached = list(tmp_path.glob("spm-*.model"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = train_tokenizer(src[:500] + tgt[:500], 400, tmp_path)
    assert second.model_proto == first.model_proto and cached[0].stat().st_mtime_ns == mtime
    train_tokenizer(src[:500] + tgt[:500], 420, tmp_path)  # another setting: another model
    assert len(list(tmp_path.glob("spm-*.model"))) == 2


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(Seq2SeqError, match=r"data\.vocab_size=100.*Vocabulary size is smaller"):
        train_tokenizer(["漢字とかなと English の文"] * 10, 100, tmp_path)
