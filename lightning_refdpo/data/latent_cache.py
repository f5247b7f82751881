"""A cache of VAE posteriors and text embeddings, so training skips the VAE and text encoder.

Only what does not change from step to step can be cached (METHOD.md section 5): the VAE posterior
``q(z | x)`` of each image and the text embedding of each caption. The cache stores the posterior's
mean and std, not a latent sample, so cached training draws ``z = mean + std * eps`` exactly as
uncached training does (``DiffusionDPOModule.sample_latents``); t, the noise and every model
prediction are still computed at each step.

Layout of a cache folder: one ``datasets`` Arrow folder per split (``train/``, ``validation/``) with
columns ``caption``, ``latents_mean_w``, ``latents_std_w``, ``latents_mean_l``, ``latents_std_l``,
``encoder_hidden_states``; ``empty_prompt.safetensors`` (the embedding of ``""`` used for caption
dropout) and ``cache.json`` (model id, resolution, dtype). Images are cropped at the centre and not
flipped (a cached image has one crop).
"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors.torch import load_file, save_file

from lightning_refdpo.data.preference import PreferenceCollator, PreferencePairs

LATENT_COLUMNS = ("latents_mean_w", "latents_std_w", "latents_mean_l", "latents_std_l")
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"


@torch.no_grad()
def encode_pairs(module: Any, pairs: PreferencePairs, batch_size: int) -> Iterator[dict[str, Any]]:
    """Rows of the cache for every decodable pair, encoded with the module's VAE and text encoder."""
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, collate_fn=PreferenceCollator())
    for batch in loader:
        if not batch["caption"]:
            continue
        pixels = batch["pixel_values"].to(module.device)
        mean, std = module.latent_distribution(torch.cat([pixels[:, :3], pixels[:, 3:]]))
        text = module.encode_prompts(batch["caption"])["encoder_hidden_states"]
        (mean_w, mean_l), (std_w, std_l) = mean.chunk(2), std.chunk(2)
        columns = {
            "latents_mean_w": mean_w,
            "latents_std_w": std_w,
            "latents_mean_l": mean_l,
            "latents_std_l": std_l,
        }
        for i, caption in enumerate(batch["caption"]):
            row = {k: v[i].float().cpu().numpy() for k, v in columns.items()}
            yield {"caption": caption, **row, "encoder_hidden_states": text[i].float().cpu().numpy()}


def write_latent_cache(
    module: Any, splits: dict[str, PreferencePairs], output: str | Path, batch_size: int = 8
) -> Path:
    """Encode each split of preference pairs and save the cache folder ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        rows = encode_pairs(module, pairs, batch_size)
        first = next(rows)
        features = datasets.Features(
            {
                "caption": datasets.Value("string"),
                **{k: datasets.Array3D(first[k].shape, "float32") for k in LATENT_COLUMNS},
                "encoder_hidden_states": datasets.Array2D(first["encoder_hidden_states"].shape, "float32"),
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
    save_file(
        {
            "encoder_hidden_states": module.encode_prompts([""])["encoder_hidden_states"][0]
            .float()
            .cpu()
            .contiguous()
        },
        str(output / EMPTY_PROMPT_FILE),
    )
    meta = {"model": module.hparams.pretrained_model_name_or_path, "splits": list(splits), "dtype": "float32"}
    (output / "cache.json").write_text(json.dumps(meta, indent=2))
    return output


def load_latent_split(cache: str | Path, split: str) -> datasets.Dataset:
    path = Path(cache) / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"latent cache {cache!r} has no split {split!r}; build it with `lightning-refdpo cache --config ... --output {cache}`"
        )
    return datasets.load_from_disk(str(path)).with_format("torch")


def load_empty_prompt(cache: str | Path) -> torch.Tensor:
    return load_file(str(Path(cache) / EMPTY_PROMPT_FILE))["encoder_hidden_states"]


@dataclass
class CachedPreferenceCollator:
    """Stacks cached pairs; caption dropout swaps in the cached empty-prompt embedding; attaches
    the training timesteps like :class:`PreferenceCollator`."""

    empty_prompt: torch.Tensor
    timestep_sampler: Any = None
    proportion_empty_prompts: float = 0.0

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            k: torch.stack([r[k] for r in rows]) for k in (*LATENT_COLUMNS, "encoder_hidden_states")
        }
        batch["caption"] = [r["caption"] for r in rows]
        for i in range(len(rows)):
            if random.random() < self.proportion_empty_prompts:
                batch["caption"][i] = ""
                batch["encoder_hidden_states"][i] = self.empty_prompt
        batch["num_skipped"] = 0
        if self.timestep_sampler is not None:
            batch["timesteps"] = self.timestep_sampler.sample(len(rows))
        return batch
