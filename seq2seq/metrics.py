"""Corpus BLEU and chrF through sacrebleu; the BLEU tokenization for each target is chosen here."""
from sacrebleu.metrics import BLEU, CHRF


def bleu_tokenize(tgt_lang: str, pretokenized: bool) -> str:
    """`none` for text already segmented (small_parallel_enja), MeCab for raw Japanese, 13a otherwise."""
    if pretokenized:
        return "none"
    return {"ja": "ja-mecab", "zh": "zh", "ko": "ko-mecab"}.get(tgt_lang, "13a")


def corpus_scores(hyps: list[str], refs: list[str], tokenize: str) -> dict:
    """BLEU and chrF of `hyps` against one reference each, with sacrebleu signatures."""
    # force: text segmented on purpose (tokenize=none) is not the mistake sacrebleu warns about
    bleu, chrf = BLEU(tokenize=tokenize, force=tokenize == "none"), CHRF()
    return {"bleu": bleu.corpus_score(hyps, [refs]).score, "chrf": chrf.corpus_score(hyps, [refs]).score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}
