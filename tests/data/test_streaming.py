"""Streaming the train split with ``datasets`` streaming, split across ranks."""

import datasets
import pytest

from lightning_refdpo.data.streaming import StreamingPreferencePairs
from tests.data.test_datamodule import datamodule, solid, write


@pytest.fixture
def stream(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # 5 s per exhausted stream
    labels = [1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0]  # two ties
    rows = {
        "caption": [f"p{i}" for i in range(10)],
        "jpg_0": [solid("red")] * 10,
        "jpg_1": [solid("blue")] * 10,
        "label_0": labels,
    }
    strict = sorted(f"p{i}" for i, label in enumerate(labels) if label != 0.5)
    dm = datamodule(write(tmp_path, rows), streaming=True, train_batch_size=2, shuffle_buffer_size=4)
    dm.setup("fit")
    return dm, strict


def test_streamed_batches_hold_every_strict_pair_once_with_its_draws(stream):
    dm, strict = stream
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(b["timesteps"].shape == (2,) for b in batches)
    assert sorted(c for b in batches for c in b["caption"]) == strict
    again = list(dm.train_dataloader())
    assert [b["caption"] for b in again] == [b["caption"] for b in batches]
    assert all((a["timesteps"] == b["timesteps"]).all() for a, b in zip(again, batches, strict=True))


def test_ranks_stream_disjoint_shares(stream):
    dm, strict = stream
    shares = [
        [
            pair["caption"]
            for pair in StreamingPreferencePairs(
                dm.load_split("train", streaming=True),
                dm.splits["train"].pairs,
                "train",
                seed=0,
                rank=r,
                world_size=2,
            )
        ]
        for r in (0, 1)
    ]
    assert shares[0] and shares[1] and sorted(shares[0] + shares[1]) == strict


def test_streamed_split_missing_a_column_is_named(tmp_path):
    dm = datamodule(
        write(tmp_path, {"caption": ["a"], "jpg_0": [solid("red")], "label_0": [1.0]}), streaming=True
    )
    with pytest.raises(ValueError, match="lacks column\\(s\\) jpg_1"):
        dm.setup("fit")


def test_streamed_max_train_samples_counts_pairs_after_ties(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    rows = {
        "caption": [f"p{i}" for i in range(6)],
        "jpg_0": [solid("red")] * 6,
        "jpg_1": [solid("blue")] * 6,
        "label_0": [0.5, 0.5, 1.0, 0.0, 1.0, 1.0],
    }
    dm = datamodule(write(tmp_path, rows), streaming=True, max_train_samples=3, train_batch_size=1)
    dm.setup("fit")
    assert sorted(c for b in dm.train_dataloader() for c in b["caption"]) == ["p2", "p3", "p4"]
