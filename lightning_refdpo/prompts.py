"""Evaluation prompt sets, by name or from a local file.

| name | source | prompts |
| --- | --- | --- |
| ``pickapic_v2_test`` | ``load_dataset("yuvalkirstain/pickapic_v2", split="test_unique")``, column ``caption`` | 500 |
| ``partiprompts`` | ``load_dataset("nateraw/parti-prompts", split="train")``, column ``Prompt`` | 1632 |
| ``hpdv2`` (or ``hpdv2/<style>``) | dataset repo ``zhwang/HPDv2``, files ``benchmark/{anime,concept-art,paintings,photo}.json`` (as the ``hpsv2`` package reads them) | 3200 (800 a style) |

A path ending in ``.txt`` holds one prompt per line; ``.json`` a list of strings or of objects with a
``prompt`` or ``caption`` field.
"""

from __future__ import annotations

import json
from pathlib import Path

DATASET_PROMPT_SETS = {
    "pickapic_v2_test": ("yuvalkirstain/pickapic_v2", "test_unique", "caption"),
    "partiprompts": ("nateraw/parti-prompts", "train", "Prompt"),
}
HPDV2_REPO = "zhwang/HPDv2"
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def load_prompts(source: str, limit: int | None = None) -> list[str]:
    """Prompts of a named set or a local file, unique and in their original order."""
    if source in DATASET_PROMPT_SETS:
        prompts = _dataset_prompts(*DATASET_PROMPT_SETS[source])
    elif source == "hpdv2" or source.startswith("hpdv2/"):
        prompts = _hpdv2_prompts(source.partition("/")[2] or None)
    elif Path(source).is_file():
        prompts = _file_prompts(Path(source))
    else:
        names = ", ".join([*DATASET_PROMPT_SETS, "hpdv2", *(f"hpdv2/{s}" for s in HPDV2_STYLES)])
        raise ValueError(f"unknown prompt set {source!r}: use one of {names}, or a .txt / .json file")
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    if not prompts:
        raise ValueError(f"prompt set {source!r} is empty")
    return prompts[:limit]


def load_prompt_groups(source: str, limit: int | None = None) -> dict[str, list[str]]:
    """The prompts of ``source`` in groups reported apart: HPDv2's four styles for ``hpdv2`` (the
    HPSv2 benchmark reports each style's mean and their average; ``limit`` applies to each style),
    else one group named ``source``."""
    if source == "hpdv2":
        return {style: load_prompts(f"hpdv2/{style}", limit) for style in HPDV2_STYLES}
    return {source: load_prompts(source, limit)}


def _dataset_prompts(path: str, split: str, column: str) -> list[str]:
    import datasets

    # Streaming reads the one split without downloading the (very large) image columns of the rest.
    rows = datasets.load_dataset(path, split=split, streaming=True).select_columns([column])
    return [row[column] for row in rows]


def _hpdv2_prompts(style: str | None) -> list[str]:
    from huggingface_hub import hf_hub_download

    styles = HPDV2_STYLES if style is None else (style,)
    if not set(styles) <= set(HPDV2_STYLES):
        raise ValueError(f"unknown HPDv2 style {style!r}: use one of {', '.join(HPDV2_STYLES)}")
    prompts: list[str] = []
    for name in styles:
        file = hf_hub_download(HPDV2_REPO, f"benchmark/{name}.json", repo_type="dataset")
        prompts += json.loads(Path(file).read_text())
    return prompts


def _file_prompts(path: Path) -> list[str]:
    if path.suffix == ".json":
        items = json.loads(path.read_text())
        return [
            item if isinstance(item, str) else item.get("prompt", item.get("caption", "")) for item in items
        ]
    return path.read_text().splitlines()
