"""Evaluation at scale: generate a batch, score it with every scorer, keep the scores, drop the pixels.

Items are generated in fixed batches (:func:`~lightning_refdpo.evaluation.generation.item_batches`:
batch ``k`` holds items ``k * B .. k * B + B - 1``). Each side of a comparison writes an index beside
its images, one JSON line per item (its position, prompt, seed, every score and, with
``save_images``, the PNG's name), flushed after every batch. A run started again over the same
folder skips the batches whose items are all in the index and generates every other batch whole, so
an interrupted evaluation resumes where it stopped and gives the images and scores of an
uninterrupted one. Under DDP rank ``r`` of ``w`` takes the batches ``r, r + w, ...`` and writes
``index-rank<r>.jsonl``; every index file of the folder counts as done.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lightning_refdpo.evaluation.generation import GenerationConfig, generate, item_batches
from lightning_refdpo.evaluation.scoring import score_batch
from lightning_refdpo.metrics import RewardScore, to_pil_images


def read_index(folder: Path, items: Sequence[tuple[str, int]], names: Sequence[str]) -> dict[int, dict]:
    """The records of ``folder``'s index files that match ``items`` (same prompt and seed at that
    position) and hold a score of every scorer in ``names``."""
    done = {}
    for path in sorted(folder.glob("index-rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption
                continue
            i = record.get("item")
            if (
                isinstance(i, int)
                and 0 <= i < len(items)
                and (record["prompt"], record["seed"]) == tuple(items[i])
                and set(names) <= set(record["scores"])
            ):
                done[i] = record
    return done


def stream_scores(
    pipeline: Any,
    items: Sequence[tuple[str, int]],
    scorers: dict[str, RewardScore],
    config: GenerationConfig,
    folder: str | Path,
    rank: int = 0,
    world_size: int = 1,
    save_images: bool = False,
    description: str = "",
) -> dict[int, dict]:
    """This rank's records (see :func:`read_index`), generating and scoring only the batches with an
    item not done.

    At most ``config.batch_size`` images are held at a time; a progress bar runs on rank 0.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = read_index(folder, items, list(scorers))
    records, todo = {}, []
    for batch in item_batches(len(items), config.batch_size, rank, world_size):
        if all(i in done for i in batch):
            records.update({i: done[i] for i in batch})
        else:
            todo.append(batch)
    with open(folder / f"index-rank{rank}.jsonl", "a") as index:
        for batch in tqdm(todo, desc=description, unit="batch", disable=rank != 0 or not todo):
            chosen = [items[i] for i in batch]
            images = generate(pipeline, chosen, config)
            scores = score_batch(scorers, images, [prompt for prompt, _ in chosen])
            for k, (i, (prompt, seed)) in enumerate(zip(batch, chosen, strict=True)):
                record = {"item": i, "prompt": prompt, "seed": seed}
                record["scores"] = {name: float(values[k]) for name, values in scores.items()}
                if save_images:
                    record["image"] = f"{i:06d}.png"
                    to_pil_images(images[k : k + 1])[0].save(folder / record["image"])
                records[i] = record
                index.write(json.dumps(record) + "\n")
            index.flush()
    return records
