"""Raw text in, natural text out, for a model trained on a pre-tokenized corpus (small_parallel_enja).

Such a corpus is lowercased and word-segmented, so the model has only ever seen "i like tea ." and
"私 は お茶 が 好き です 。". `model_form` turns what a user types into that form (English: lowercase
and the Moses tokenizer, sacremoses; Japanese: MeCab word segmentation with the IPA dictionary that
sacrebleu[ja] installs). `natural_form` turns the model's output back into text a reader expects
(English: Moses detokenizer, the sentence start and "I" capitalized; Japanese: no space between
Japanese characters, while a space between two Latin words stays).

small_parallel_enja was segmented with KyTea and the Stanford tokenizer, so MeCab and Moses match it
closely but not exactly; docs/results.md has the measured cost.
"""
import functools
import re

LATIN = r"A-Za-z0-9"  # full-width letters and digits are written without spaces in Japanese, like kanji
# a space goes unless both neighbours are (half-width) Latin: "私 は Tom です" -> "私はTomです", "New York" stays
JA_SPACE = re.compile(rf"(?<![{LATIN}]) | (?![{LATIN}])")
PRONOUN_I = re.compile(r"\bi\b(?!\.)")  # "i", "i'm", "i've"; not "i.e."
KEEP_WHOLE = [r"\d+:\d+"]  # times (10:30) stay one token, as in the Stanford tokenization of small_parallel_enja


@functools.cache
def moses(lang: str):
    from sacremoses import MosesDetokenizer, MosesTokenizer

    return MosesTokenizer(lang), MosesDetokenizer(lang)


@functools.cache
def mecab():
    import ipadic
    import MeCab

    return MeCab.Tagger(f"{ipadic.MECAB_ARGS} -Owakati")


def model_form(line: str, lang: str) -> str:
    """A raw sentence as the pre-tokenized corpus writes it: lowercased and space-separated words."""
    if not line.strip():
        return ""
    if lang == "ja":
        return " ".join(mecab().parse(line).split())
    tokenizer, _ = moses(lang)
    return " ".join(tokenizer.tokenize(line.lower(), escape=False, protected_patterns=KEEP_WHOLE))


def natural_form(line: str, lang: str) -> str:
    """The model's word-segmented, lowercased output as a reader expects it."""
    if lang == "ja":
        return JA_SPACE.sub("", line.strip())
    _, detokenizer = moses(lang)
    text = detokenizer.detokenize(line.split())
    if lang == "en":
        text = PRONOUN_I.sub("I", text)
    return capitalize_first(text)


@functools.cache
def segmenter(lang: str):
    import pysbd

    return pysbd.Segmenter(language=lang if lang in pysbd.languages.LANGUAGE_CODES else "en", clean=False)


def split_sentences(line: str, lang: str) -> list[str]:
    """The sentences of a line of running text (pysbd's rules: "Mr. Smith paid $3.50." is one sentence)."""
    return [s.strip() for s in segmenter(lang).segment(line) if s.strip()] if line.strip() else []


def join_sentences(sentences: list[str], lang: str) -> str:
    """Translated sentences back into one line: Japanese writes them without spaces."""
    return ("" if lang in ("ja", "zh") else " ").join(sentences)


def capitalize_first(text: str) -> str:
    for i, char in enumerate(text):
        if char.isalpha():
            return text[:i] + char.upper() + text[i + 1:]
    return text
