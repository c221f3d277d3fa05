"""Token-budget batching, padding, and the binarized cache."""
import numpy as np
import pytest
import torch

from seq2seq import Seq2SeqError
from seq2seq.data import LengthOrderSampler, ParallelDataset, TokenArray, TokenBatchSampler, collate
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID


def sampler(sizes, max_tokens=64, shuffle=True, seed=0):
    return TokenBatchSampler(LengthOrderSampler(np.asarray(sizes), shuffle, seed), max_tokens)


def test_batches_respect_the_budget_and_cover_every_pair_once():
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 30, size=500)
    batches = list(sampler(sizes))
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) * sizes[b].max() <= 64 for b in batches)
    # bucketing: lengths within a batch are close, so padding is small
    padded = sum(len(b) * sizes[b].max() for b in batches)
    assert sizes.sum() / padded > 0.9


def test_shuffling_changes_with_epoch_and_is_reproducible():
    sizes = np.random.default_rng(0).integers(2, 30, size=300)
    s = sampler(sizes)
    first = list(s)
    s.sampler.set_epoch(1)
    second = list(s)
    assert first != second and len(first) == len(second) == len(s)
    s.sampler.set_epoch(0)
    assert list(s) == first
    assert list(sampler(sizes, shuffle=False)) == list(sampler(sizes, shuffle=False))


def test_pairs_of_one_size_are_ordered_by_their_sides_so_neither_pads_much():
    # a corpus whose sides differ in length (pairs of size 20 may be 20+3 or 3+20 tokens)
    rng = np.random.default_rng(0)
    src_len, tgt_len = rng.integers(1, 40, size=3000), rng.integers(1, 40, size=3000)
    dataset = ParallelDataset(*(TokenArray(np.zeros(n.sum(), np.int32), np.concatenate([[0], np.cumsum(n)]))
                                for n in (src_len, tgt_len)))

    def real_share(order_sampler):  # real tokens / padded tokens, each side padded to its own widest + 1
        batches = TokenBatchSampler(order_sampler, 256).batches()
        padded = sum(len(b) * (src_len[b].max() + tgt_len[b].max() + 2) for b in batches)
        return (src_len.sum() + tgt_len.sum() + 2 * len(src_len)) / padded, len(batches)

    by_size, by_sides = real_share(LengthOrderSampler(dataset.sizes, True, 0)), real_share(dataset.sampler(True, 0))
    assert by_sides[1] == by_size[1]  # the same batches by count: each still fits the budget by size
    assert by_size[0] < 0.8 < 0.9 < by_sides[0]


def greedy_batches(order: list[int], sizes, max_tokens: int) -> list[list[int]]:
    """The definition, one pair at a time: a batch ends before the pair that would overflow it."""
    batches, batch, width = [], [], 0
    for i in order:
        new_width = max(width, sizes[i])
        if batch and (len(batch) + 1) * new_width > max_tokens:
            batches.append(batch)
            batch, new_width = [], sizes[i]
        batch.append(i)
        width = new_width
    return batches + ([batch] if batch else [])


@pytest.mark.parametrize("seed, n, low, high, max_tokens", [(0, 1000, 2, 30, 64), (1, 5000, 1, 200, 4096),
                                                            (2, 1, 5, 6, 5), (3, 300, 1, 2, 7), (4, 2000, 3, 64, 64)])
def test_numpy_batching_equals_the_greedy_definition(seed, n, low, high, max_tokens):
    sizes = np.random.default_rng(seed).integers(low, high, size=n)
    s = sampler(sizes, max_tokens=max_tokens, shuffle=False)
    assert [b.tolist() for b in s.batches()] == greedy_batches(s.sampler.order().tolist(), sizes, max_tokens)
    assert len(s) == len(s.batches())


def test_budget_smaller_than_one_sentence_is_an_error():
    with pytest.raises(Seq2SeqError, match="max_tokens=8 is smaller than one sentence"):
        sampler([3, 12], max_tokens=8)


def test_collate_adds_eos_bos_and_pads_only_within_the_batch():
    batch = collate([(0, np.array([5, 6, 7]), np.array([8])), (1, np.array([9]), np.array([10, 11]))])
    assert batch["src"].tolist() == [[5, 6, 7, EOS_ID], [9, EOS_ID, PAD_ID, PAD_ID]]
    assert batch["tgt_in"].tolist() == [[BOS_ID, 8, PAD_ID], [BOS_ID, 10, 11]]
    assert batch["tgt_out"].tolist() == [[8, EOS_ID, PAD_ID], [10, 11, EOS_ID]]
    assert batch["n_tokens"] == 4 + 2 + 2 + 3
    flat = batch["tgt_out"].flatten()
    assert flat[batch["tgt_real"]].tolist() == flat[flat.ne(PAD_ID)].tolist()  # the real labels, in order


def test_token_array_round_trip_is_memory_mapped(tmp_path):
    seqs = [[1, 2, 3], [], [4], list(range(100))]
    built = TokenArray.build(seqs, tmp_path / "train.src")
    loaded = TokenArray.load(tmp_path / "train.src")
    assert isinstance(loaded.tokens, np.memmap)
    assert [loaded[i].tolist() for i in range(4)] == seqs == [built[i].tolist() for i in range(4)]
    assert loaded.lengths.tolist() == [3, 0, 1, 100]


def test_datamodule_second_setup_reuses_the_cache(tiny_cfg):
    from seq2seq.corpora import DataConfig
    from seq2seq.datamodule import TranslationDataModule

    cfg = DataConfig(**tiny_cfg.data)
    first = TranslationDataModule(cfg, tiny_cfg.data_dir + "/cache", seed=0)
    first.setup()
    arrays = sorted((p.name, p.stat().st_mtime_ns) for p in (first.cache_dir).rglob("*.npy"))
    second = TranslationDataModule(cfg, tiny_cfg.data_dir + "/cache", seed=0)
    second.setup()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (first.cache_dir).rglob("*.npy")) == arrays
    assert second.tokenizer.model_proto == first.tokenizer.model_proto
    batch = next(iter(second.train_dataloader()))
    assert batch["src"].dtype == torch.long and batch["src"].numel() <= cfg.max_tokens
    assert len(second.datasets["test"]) == 200  # valid/test keep every line


def test_data_position_survives_a_restart(tiny_cfg):
    """The batches after a restored loader state are the ones an uninterrupted epoch would deal."""
    from seq2seq.corpora import DataConfig
    from seq2seq.datamodule import TranslationDataModule

    datamodule = TranslationDataModule(DataConfig(**tiny_cfg.data), tiny_cfg.data_dir + "/cache", seed=3)
    datamodule.setup()
    straight = datamodule.train_dataloader()
    straight.batch_sampler.sampler.set_epoch(2)
    expected = [batch["ids"].tolist() for batch in straight]
    first = datamodule.train_dataloader()
    first.batch_sampler.sampler.set_epoch(2)
    iterator = iter(first)
    for _ in range(7):
        next(iterator)
    state = first.state_dict()
    assert state == {"epoch": 2, "consumed": 7}
    resumed = datamodule.train_dataloader()  # a new process: epoch not set yet, as in Lightning's restart
    resumed.load_state_dict(state)
    assert [batch["ids"].tolist() for batch in resumed] == expected[7:]
    assert [batch["ids"].tolist() for batch in resumed] == expected  # the next epoch starts from the top


def test_a_bad_training_line_stops_the_preparation_and_leaves_no_half_built_cache(tmp_path):
    from seq2seq.corpora import DataConfig
    from seq2seq.datamodule import TranslationDataModule

    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.en").write_text("a cat .\nthe dog .\n")
        (tmp_path / f"{split}.ja").write_text("猫 。\n犬 。\n")
    (tmp_path / "train.ja").write_bytes("猫 。\n".encode() + b"\xff\n")
    files = {f"{split}_{side}": str(tmp_path / f"{split}.{lang}") for split in ("train", "valid", "test")
             for side, lang in (("src", "en"), ("tgt", "ja"))}
    cfg = DataConfig(corpus="files", dir=str(tmp_path), src_lang="en", tgt_lang="ja", pretokenized=True,
                     normalize=False, vocab_size=100, max_len=64, max_tokens=1024, num_workers=0, prepare_workers=1,
                     dedup=True,
                     segmentation="corpus", tokenizer_sample=1000, **files)
    with pytest.raises(Seq2SeqError, match=r"train\.ja:2: invalid UTF-8"):
        TranslationDataModule(cfg, tmp_path / "cache", seed=0).setup()
    assert not list((tmp_path / "cache").glob("files-*"))


def test_no_lines_give_no_batches():
    assert list(sampler(np.array([], dtype=np.int64))) == [] and len(sampler(np.array([], dtype=np.int64))) == 0


@pytest.mark.parametrize("shuffle", [True, False])
def test_under_ddp_each_rank_takes_every_other_batch(monkeypatch, shuffle):
    """Training: the same number of batches on each rank (the odd one out dropped). Validation: every
    batch on exactly one rank, so the dev set is decoded once in all, not once per rank."""
    import torch.distributed as dist

    sizes = np.random.default_rng(0).integers(2, 30, size=401)
    n = len(sampler(sizes, shuffle=shuffle).batches())
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        s = sampler(sizes, shuffle=shuffle)
        shares.append(list(s))
        assert len(s) == len(shares[-1])
    seen = [i for share in shares for batch in share for i in batch]
    if shuffle:
        assert len(shares[0]) == len(shares[1]) == n // 2 and len(seen) == len(set(seen)) <= 401
    else:
        assert sorted(seen) == list(range(401)) and len(shares[0]) + len(shares[1]) == n
    whole = TokenBatchSampler(LengthOrderSampler(sizes, shuffle, 0), 64, ranks=False)  # what a Translator uses
    assert len(whole) == n and sorted(i for batch in whole for i in batch) == list(range(401))
