"""Image grids with word-wrapped captions."""

import torch

from lightning_refdpo.evaluation import image_grid


def test_image_grid_layout():
    grid = image_grid(torch.rand(6, 3, 32, 32), [f"prompt {i}" for i in range(6)], columns=3)
    assert grid.size == (96, 2 * (32 + 28))
