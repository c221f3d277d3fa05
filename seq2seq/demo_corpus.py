"""The project's own English-Japanese demo corpus: a small template grammar with a known mapping.

It exercises what a translator must learn (SOV reordering, particles, tense and negation morphology,
questions, optional adverbials) in a vocabulary small enough to learn in a minute on a CPU.
Generated deterministically from a seed, so tests and `experiment=smoke` need no download.
"""
import random

SUBJECTS = [("cat", "猫"), ("dog", "犬"), ("bird", "鳥"), ("teacher", "先生"), ("student", "学生"),
            ("child", "子供"), ("doctor", "医者"), ("friend", "友達"), ("boy", "少年"), ("girl", "少女"),
            ("old man", "老人"), ("cook", "料理人")]
OBJECTS = [("apple", "りんご"), ("book", "本"), ("letter", "手紙"), ("car", "車"), ("song", "歌"),
           ("picture", "絵"), ("bread", "パン"), ("cake", "ケーキ"), ("fish", "魚"), ("newspaper", "新聞"),
           ("box", "箱"), ("umbrella", "傘")]
ADJECTIVES = [("big", "大きい"), ("small", "小さい"), ("red", "赤い"), ("new", "新しい"), ("old", "古い"),
              ("white", "白い"), ("beautiful", "美しい"), ("cheap", "安い")]
# (base, 3rd person, past, Japanese polite stem): stem + ます / ました / ません
VERBS = [("eat", "eats", "ate", "食べ"), ("read", "reads", "read", "読み"), ("write", "writes", "wrote", "書き"),
         ("buy", "buys", "bought", "買い"), ("see", "sees", "saw", "見"), ("make", "makes", "made", "作り"),
         ("wash", "washes", "washed", "洗い"), ("find", "finds", "found", "見つけ"),
         ("sell", "sells", "sold", "売り"), ("carry", "carries", "carried", "運び")]
PLACES = [("in the park", "公園で"), ("at school", "学校で"), ("at home", "家で"),
          ("in the kitchen", "台所で"), ("at the station", "駅で")]
TIMES = [("Today", "今日"), ("Yesterday", "昨日"), ("Every day", "毎日"), ("Tomorrow", "明日")]


def noun_phrase(rng: random.Random, nouns) -> tuple[str, str]:
    noun_en, noun_ja = rng.choice(nouns)
    if rng.random() < 0.5:
        adj_en, adj_ja = rng.choice(ADJECTIVES)
        return f"{adj_en} {noun_en}", adj_ja + noun_ja
    return noun_en, noun_ja


def sentence_pair(rng: random.Random) -> tuple[str, str]:
    """One (English, Japanese) pair: [time,] the S V the O [place] . / [time、]SはPlaceOをV。"""
    subj_en, subj_ja = noun_phrase(rng, SUBJECTS)
    obj_en, obj_ja = noun_phrase(rng, OBJECTS)
    base, third, past, stem = rng.choice(VERBS)
    form = rng.choice(["present", "past", "negative", "question"])
    place_en, place_ja = rng.choice(PLACES) if rng.random() < 0.4 else ("", "")
    time_en, time_ja = rng.choice(TIMES) if rng.random() < 0.4 else ("", "")

    tail_en = f" the {obj_en}" + (f" {place_en}" if place_en else "")
    if form == "present":
        en, verb_ja, end = f"the {subj_en} {third}{tail_en}.", stem + "ます", "。"
    elif form == "past":
        en, verb_ja, end = f"the {subj_en} {past}{tail_en}.", stem + "ました", "。"
    elif form == "negative":
        en, verb_ja, end = f"the {subj_en} does not {base}{tail_en}.", stem + "ません", "。"
    else:
        en, verb_ja, end = f"does the {subj_en} {base}{tail_en}?", stem + "ますか", "？"
    en = f"{time_en}, {en}" if time_en else en[0].upper() + en[1:]
    ja = (f"{time_ja}、" if time_ja else "") + f"{subj_ja}は{place_ja}{obj_ja}を{verb_ja}{end}"
    return en, ja


def generate_pairs(n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """`n` distinct pairs whose English side is not in `exclude` (so splits never share a sentence)."""
    rng = random.Random(seed)
    seen, pairs = set(exclude), []
    while len(pairs) < n:
        en, ja = sentence_pair(rng)
        if en not in seen:
            seen.add(en)
            pairs.append((en, ja))
    return pairs
