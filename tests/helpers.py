"""Test helpers shared by the module, callback and CLI tests."""

from __future__ import annotations

import torch

from lightning_refdpo import DiffusionDPOModule
from lightning_refdpo.metrics import RewardScore


def make_module(model_path: str, **kwargs) -> DiffusionDPOModule:
    kwargs = {"learning_rate": 1e-3, "scale_lr": False, **kwargs}
    return DiffusionDPOModule(pretrained_model_name_or_path=model_path, **kwargs)


def make_batch(batch_size: int = 2, resolution: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "caption": [f"prompt {i}" for i in range(batch_size)],
        "pixel_values": torch.rand(batch_size, 6, resolution, resolution, generator=g) * 2 - 1,
        "timesteps": torch.randint(0, 1000, (batch_size,), generator=g),
    }


def unet_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


class Brightness(RewardScore):
    """Mean pixel value: a reward whose value on any image is known, for the evaluation plumbing."""

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))
