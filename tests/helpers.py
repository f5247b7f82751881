"""Test helpers shared by the module, callback and CLI tests."""

from __future__ import annotations

import torch

from lightning_refdpo import DiffusionDPOModule


def make_module(model_path: str, **kwargs) -> DiffusionDPOModule:
    return DiffusionDPOModule(
        pretrained_model_name_or_path=model_path, learning_rate=1e-3, scale_lr=False, **kwargs
    )


def make_batch(batch_size: int = 2, resolution: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "caption": [f"prompt {i}" for i in range(batch_size)],
        "pixel_values": torch.rand(batch_size, 6, resolution, resolution, generator=g) * 2 - 1,
        "timesteps": torch.randint(0, 1000, (batch_size,), generator=g),
    }


def unet_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}
