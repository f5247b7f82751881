"""A cache of VAE posteriors and text embeddings, so training skips the VAE and text encoder.

Only what does not change from step to step can be cached: the Diffusion-DPO loss (Wallace et al.
2024, Eq. 14) draws a new ``t`` and noise at every step (see docs/METHOD.md, "Implementation
notes"), so the cache holds the VAE posterior ``q(z | x)`` of each image and the text embedding of
each caption. It stores the posterior's mean and std, not a latent sample, so cached training draws
``z = mean + std * eps`` exactly as uncached training does (``Backbone.sample_latents``);
t, the noise and every model prediction are still computed at each step.

Layout of a cache folder: one ``datasets`` Arrow folder per split (``train/``, ``validation/``) with
columns ``caption``, ``latents_mean_w``, ``latents_std_w``, ``latents_mean_l``, ``latents_std_l``,
one column per output of the backbone's ``encode_prompts`` (``encoder_hidden_states``; SDXL adds the
pooled ``text_embeds``) and the ``(2, 2)`` ``original_size`` and ``crop_top_left`` of winner and
loser (SDXL's per-image micro-conditioning); ``empty_prompt.safetensors`` (the embeddings of
``""`` used for caption dropout) and ``cache.json`` (model and VAE ids, splits, dtype). Images
are cropped at the centre and not flipped (a cached image has one crop).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lightning_refdpo.data.draws import PairDraws
from lightning_refdpo.data.preference import (
    PreferenceCollator,
    PreferencePairs,
    stack_draws,
)

LATENT_COLUMNS = ("latents_mean_w", "latents_std_w", "latents_mean_l", "latents_std_l")
CROP_COLUMNS = ("original_size", "crop_top_left")
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"


@torch.no_grad()
def encode_pairs(backbone: Any, pairs: PreferencePairs, batch_size: int) -> Iterator[dict[str, Any]]:
    """Rows of the cache for every decodable pair, encoded with the VAE and text encoders of
    ``backbone`` (a ``lightning_refdpo.backbones.Backbone``)."""
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, collate_fn=PreferenceCollator())
    for batch in loader:
        if not batch["caption"]:
            continue
        pixels = batch["pixel_values"].to(backbone.device)
        mean, std = backbone.latent_distribution(torch.cat([pixels[:, :3], pixels[:, 3:]]))
        (mean_w, mean_l), (std_w, std_l) = mean.chunk(2), std.chunk(2)
        columns = {
            "latents_mean_w": mean_w,
            "latents_std_w": std_w,
            "latents_mean_l": mean_l,
            "latents_std_l": std_l,
            **backbone.encode_prompts(batch["caption"]),
        }
        for i, caption in enumerate(batch["caption"]):
            row = {k: v[i].float().cpu().numpy() for k, v in columns.items()}
            crop = {k: batch[k][i].numpy() for k in CROP_COLUMNS}
            yield {"caption": caption, **row, **crop}


def write_latent_cache(
    backbone: Any, splits: dict[str, PreferencePairs], output: str | Path, batch_size: int = 8
) -> Path:
    """Encode each split of preference pairs and save the cache folder ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        rows = encode_pairs(backbone, pairs, batch_size)
        first = next(rows)
        features = datasets.Features(
            {
                "caption": datasets.Value("string"),
                **{k: _feature(v) for k, v in first.items() if k != "caption"},
            }
        )

        def generate(first=first, rows=rows):
            yield first
            yield from rows

        # The generator holds the models, which datasets cannot hash: name the build explicitly.
        build = output / ".build"
        split = datasets.Dataset.from_generator(
            generate, features=features, cache_dir=str(build), fingerprint=uuid.uuid4().hex
        )
        split.save_to_disk(str(output / name))
        shutil.rmtree(build, ignore_errors=True)
    empty_prompt = {k: v[0].float().cpu().contiguous() for k, v in backbone.encode_prompts([""]).items()}
    save_file(empty_prompt, str(output / EMPTY_PROMPT_FILE))
    meta = {
        "model": backbone.pretrained_model_name_or_path,
        "vae": backbone.vae_name_or_path,
        "splits": list(splits),
        "dtype": "float32",
    }
    (output / "cache.json").write_text(json.dumps(meta, indent=2))
    return output


def _feature(value: np.ndarray) -> Any:
    """The ``datasets`` feature of one cell: a fixed-length sequence or a 2-D / 3-D array."""
    dtype = "float32" if value.dtype.kind == "f" else "int64"
    if value.ndim == 1:
        return datasets.Sequence(datasets.Value(dtype), length=len(value))
    return (datasets.Array2D if value.ndim == 2 else datasets.Array3D)(value.shape, dtype)


def load_latent_split(cache: str | Path, split: str) -> datasets.Dataset:
    path = Path(cache) / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"latent cache {cache!r} has no split {split!r}; build it with `lightning-refdpo cache --config ... --output {cache}`"
        )
    return datasets.load_from_disk(str(path)).with_format("torch")


def load_empty_prompt(cache: str | Path) -> dict[str, torch.Tensor]:
    """The cached text conditioning of ``""`` (``encoder_hidden_states``; SDXL: and ``text_embeds``)."""
    return load_file(str(Path(cache) / EMPTY_PROMPT_FILE))


class CachedPairs(torch.utils.data.Dataset):
    """Rows of a cached split; with ``draws`` (training) each row also carries the pair's caption
    dropout, ``t`` and noise seed, drawn like :class:`PreferencePairs` draws them."""

    def __init__(self, split: datasets.Dataset, draws: PairDraws | None = None) -> None:
        self.split = split
        self.draws = draws

    def __len__(self) -> int:
        return len(self.split)

    def set_epoch(self, epoch: int) -> None:
        if self.draws is not None:
            self.draws.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.split[index]
        return row if self.draws is None else {**row, **self.draws(self.draws.generator(index))}


@dataclass
class CachedPreferenceCollator:
    """Stacks cached pairs; caption dropout swaps in the cached empty-prompt embeddings; stacks
    the drawn timesteps and noise seeds like :class:`PreferenceCollator`."""

    empty_prompt: dict[str, torch.Tensor]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        columns = (*LATENT_COLUMNS, *self.empty_prompt, *(k for k in CROP_COLUMNS if k in rows[0]))
        batch: dict[str, Any] = {k: torch.stack([r[k] for r in rows]) for k in columns}
        batch["caption"] = [r["caption"] for r in rows]
        for i, row in enumerate(rows):
            if row.get("drop_caption"):
                batch["caption"][i] = ""
                for key, embedding in self.empty_prompt.items():
                    batch[key][i] = embedding
        return {**batch, "num_skipped": 0, **stack_draws(rows)}
