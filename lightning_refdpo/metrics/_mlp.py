"""The rating head shared by LAION's improved aesthetic predictor and ImageReward."""

from __future__ import annotations

import torch
from torch import nn


class RatingMLP(nn.Module):
    """``Linear`` layers ``input_size -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts 0.2, 0.2, 0.1 and no activation.

    The layout (``layers.0`` ... ``layers.7``) is the ``MLP`` of
    https://github.com/christophschuhmann/improved-aesthetic-predictor and of ImageReward
    (https://github.com/THUDM/ImageReward), so their state dicts load as they are.
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)
