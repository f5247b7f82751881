"""Counter-based training randomness: every random draw of a training pair comes from its own seed.

Pair ``index`` in epoch ``e`` draws from ``torch.Generator().manual_seed(s)`` with
``s = SeedSequence([seed, e, index])`` (numpy's hash of an entropy tuple). Its draws therefore
depend on ``(seed, e, index)`` only: not on the data-loader worker that loads the pair, on
prefetching, on the batch it lands in or on a resume in the middle of an epoch. Under DDP each rank
loads different indices, so each rank gets different timesteps and noise, reproducibly, and a
global batch split over ranks draws exactly what one process with that batch draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

NOISE_SEED_HIGH = 2**62
LATENT_STREAM, NOISE_STREAM = 0, 1


def pair_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of pair ``index`` in ``epoch``: seeded by ``SeedSequence([seed, epoch, index])``."""
    return torch.Generator().manual_seed(hash_seed(seed, epoch, int(index)))


def pair_normal(noise_seeds: Sequence[int] | torch.Tensor, stream: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal draws of ``shape``, one per pair (stacked): pair ``i`` draws from the
    generator seeded by ``SeedSequence([noise_seeds[i], stream])``. The module uses stream
    ``LATENT_STREAM`` for the latent sample ``eps`` and ``NOISE_STREAM`` for the diffusion noise."""
    return torch.stack(
        [
            torch.randn(tuple(shape), generator=torch.Generator().manual_seed(hash_seed(int(seed), stream)))
            for seed in noise_seeds
        ]
    )


def hash_seed(*entropy: int) -> int:
    """A 64-bit seed of the integers ``entropy`` (``SeedSequence``): independent streams for
    different tuples."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])


@dataclass
class PairDraws:
    """The random draws of one training pair, in this order from :func:`pair_generator`:
    crop and flip (image pairs, by ``PairTransform``), caption dropout ``u < proportion_empty_prompts``
    with ``u ~ U[0, 1)``, the timestep ``t`` from ``timestep_sampler``, and ``noise_seed`` in
    ``[0, 2^62)`` for the model's per-pair noise (:func:`pair_normal`).

    ``epoch`` is set by the training sampler at the start of each epoch (``set_epoch``).
    """

    timestep_sampler: Any
    proportion_empty_prompts: float = 0.0
    seed: int = 0
    epoch: int = 0

    def generator(self, index: int) -> torch.Generator:
        return pair_generator(self.seed, self.epoch, index)

    def __call__(self, generator: torch.Generator) -> dict[str, Any]:
        drop_caption = bool(torch.rand((), generator=generator) < self.proportion_empty_prompts)
        timestep = self.timestep_sampler.sample(1, generator)[0]
        noise_seed = int(torch.randint(0, NOISE_SEED_HIGH, (), generator=generator))
        return {"drop_caption": drop_caption, "timestep": timestep, "noise_seed": noise_seed}
