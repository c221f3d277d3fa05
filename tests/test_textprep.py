"""Raw text to a pre-tokenized corpus's form and back (seq2seq/textprep.py), and the Translator using it."""
import re

import pytest

from seq2seq.checkpoint import TextInfo
from seq2seq.textprep import model_form, natural_form
from seq2seq.translator import Translator

ENGLISH = ["I like tea.", "I'm sure it's his book, isn't it?", 'He said "hello" to 3.5 people (really)!',
           "It costs $20, doesn't it?", "We can't go: it's 10:30 already.", "Is this yours or mine?"]
JAPANESE = ["私はお茶が好きです。", "「ＡＢＣ」は2024年に3.5%増えた！", "TomとMaryはNew Yorkに行った。",
            "彼は１０時に来ますか？", "えっ、本当？", "この本は1,000円です。"]
JA_CHAR = r"[\u3040-\u30ff\u4e00-\u9fff\u3000-\u303f\uff01-\uff0f]"


@pytest.mark.parametrize("sentence", ENGLISH)
def test_english_round_trip(sentence):
    tokenized = model_form(sentence, "en")
    assert tokenized == tokenized.lower() and tokenized.endswith((" .", " ?", " !"))  # as the corpus writes it
    assert natural_form(tokenized, "en") == sentence


@pytest.mark.parametrize("sentence", JAPANESE)
def test_japanese_round_trip(sentence):
    tokenized = model_form(sentence, "ja")
    assert " " in tokenized
    assert natural_form(tokenized, "ja") == sentence


def test_the_corpus_form_becomes_natural_text():
    """small_parallel_enja's own lines (Stanford tokens, KyTea words) read as people write."""
    assert natural_form("he didn 't care for swimming .", "en") == "He didn't care for swimming."
    assert natural_form("i 'm in the tennis club , you know .", "en") == "I'm in the tennis club, you know."
    assert natural_form("彼 ら は つい に それ が 真実 だ と 認め た 。", "ja") == "彼らはついにそれが真実だと認めた。"


def test_japanese_output_has_no_space_between_japanese_characters():
    out = natural_form("tom と mary は 東京 に 行 っ た 。 ｉ ｐ ｈ ｏ ｎ ｅ で も １ ０ 時", "ja")
    assert not re.search(rf"{JA_CHAR} | {JA_CHAR}", out)
    assert out.startswith("tomとmaryは東京に") and out.endswith("ｉｐｈｏｎｅでも１０時")


def test_a_space_between_latin_words_stays():
    assert natural_form("new york に 住 む", "ja") == "new yorkに住む"


def test_empty_lines_stay_empty():
    assert model_form("   ", "en") == "" and model_form("", "ja") == ""
    assert natural_form("", "en") == "" and natural_form("", "ja") == ""


class Words:
    """A stand-in tokenizer: the ids are the words (so what the model reads can be checked)."""

    vocab = {}

    def encode(self, lines):
        return [[self.vocab.setdefault(w, len(self.vocab) + 4) for w in line.split()] for line in lines]


def translator_for(pretokenized: bool) -> Translator:
    translator = Translator.__new__(Translator)
    translator.tokenizer = Words()
    translator.info = TextInfo("en", "ja", normalize=False, bleu_tokenize="none" if pretokenized else "ja-mecab",
                               data_config={"pretokenized": pretokenized})
    translator.pretokenized = pretokenized
    return translator


def test_a_pretokenized_model_reads_raw_text_in_its_corpus_form_and_writes_natural_text():
    translator = translator_for(pretokenized=True)
    assert translator.prepare(["I don't like tea.", "  "]) == ["i don 't like tea .", ""]
    assert translator.prepare(["i don 't like tea ."], pretokenized=True) == ["i don 't like tea ."]
    assert translator.finish("私 は お茶 が 好き で は な い 。") == "私はお茶が好きではない。"
    assert translator.finish("私 は", pretokenized=True) == "私 は"


def test_a_model_trained_on_raw_text_gets_the_text_as_it_is():
    translator = translator_for(pretokenized=False)
    assert translator.prepare(["I don't  like tea."]) == ["I don't like tea."]  # whitespace collapsed only
    assert translator.finish("私 は") == "私 は"


def test_a_target_sentence_is_prepared_in_the_target_language():
    prepared = translator_for(pretokenized=True).prepare(["私はお茶が好きです。"], side="tgt")
    assert prepared == ["私 は お茶 が 好き です 。"]


def test_evaluate_scores_with_the_tokenizer_that_matches_the_references():
    from seq2seq.evaluate import scores_of

    translator = translator_for(pretokenized=True)
    hyps, refs = ["私 は お茶 が 好き です 。"], ["私 は お茶 が 大好き です 。"]
    corpus_form = scores_of(hyps, refs, translator, pretokenized=True)  # the corpus's own segmented test split
    assert "tok:none" in corpus_form["bleu_signature"] and "tok:ja-mecab" in corpus_form["natural"]["bleu_signature"]
    natural = scores_of(["私はお茶が好きです。"], ["私はお茶が大好きです。"], translator, pretokenized=False)
    assert "tok:ja-mecab" in natural["bleu_signature"] and "natural" not in natural
    assert natural["bleu"] == pytest.approx(corpus_form["natural"]["bleu"])  # the same text, scored alike


def test_sentences_are_split_and_rejoined():
    from seq2seq.textprep import join_sentences, split_sentences

    assert split_sentences("Mr. Smith paid $3.50 for tea! Did he like it? Yes.", "en") == [
        "Mr. Smith paid $3.50 for tea!", "Did he like it?", "Yes."]
    assert split_sentences("私はお茶が好きです。「本当に？」と彼は言った。", "ja") == \
        ["私はお茶が好きです。", "「本当に？」と彼は言った。"]
    assert split_sentences("  ", "en") == []
    assert join_sentences(["私は学生です。", "はい。"], "ja") == "私は学生です。はい。"
    assert join_sentences(["I am a student.", "Yes."], "en") == "I am a student. Yes."


def test_split_translates_each_sentence_and_keeps_one_line_per_line():
    translator = translator_for(pretokenized=False)
    seen = []

    def translate_nbest(lines, *args, **kwargs):  # a stand-in model: "translates" by tagging
        seen.extend(lines)
        return [[(f"<{line}>", 0.0)] for line in lines]

    translator.translate_nbest = translate_nbest
    out = translator.translate(["One. Two! Three?", "", "Four."], split=True)
    assert seen == ["One.", "Two!", "Three?", "Four."]  # one batch, sentence by sentence
    assert out == ["<One.><Two!><Three?>", "", "<Four.>"]  # ja target: rejoined without spaces
