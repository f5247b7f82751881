"""A programmatic preference reward for the toy world of :mod:`lightning_refdpo.toy.world`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from lightning_refdpo.metrics.base import RewardScore
from lightning_refdpo.toy.world import BACKGROUNDS, COLOURS, POSITIONS, parse_caption

# A triangle fills 1/2 of its box, but its apex pixels are only partly covered, which shortens the
# soft height: rendered triangles measure 0.53-0.60.
FILL_RATIO = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.56}
WEIGHTS = {"background": 0.05, "size": 0.3, "colour": 0.25, "shape": 0.2, "position": 0.1, "clean": 0.1}
SIZE_SCALE = (0.25, 0.5)
"""Object side, as a fraction of the image side, where the size part is 0 and where it reaches 1
(8 and 16 px at 32 px: the world's ``SIZE_RANGE``)."""
FOREGROUND_DISTANCE = 0.15


def ramp(error: torch.Tensor, full: float, zero: float) -> torch.Tensor:
    """1 for ``error <= full``, 0 for ``error >= zero``, linear in between."""
    return ((zero - error) / (zero - full)).clamp(0.0, 1.0)


def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RGB distance ``||x - y||_2 / sqrt(3)`` in ``[0, 1]`` along dim 1 (broadcast)."""
    return (x - y).norm(dim=1) / math.sqrt(3)


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of each boolean mask ``(N, H, W)`` (empty if none)."""
    n, h, w = mask.shape
    inside = mask.cpu().numpy()
    labels = np.where(inside, np.arange(1, h * w + 1).reshape(1, h, w), 0)
    while True:  # every pixel takes the largest label among its neighbours, until stable
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)))
        spread = labels.copy()
        for dy, dx in itertools.product(range(3), range(3)):
            np.maximum(spread, padded[:, dy : dy + h, dx : dx + w], out=spread)
        spread *= inside
        if np.array_equal(spread, labels):
            break
        labels = spread
    # numpy rather than torch: this loop of tiny ops is slow with several threads on a busy CPU
    offsets = (labels + (h * w + 1) * np.arange(n).reshape(n, 1, 1)).reshape(-1)
    counts = np.bincount(offsets, minlength=n * (h * w + 1)).reshape(n, h * w + 1)
    counts[:, 0] = 0
    largest = labels == counts.argmax(1).reshape(n, 1, 1)
    return torch.from_numpy(largest & inside).to(mask.device)


class ToyReward(RewardScore):
    """How well an image shows its toy prompt, in ``[0, 1]`` (renders of the prompt score ~0.97+).

    With ``d(u, v) = ||u - v|| / sqrt(3)`` the RGB distance and ``ramp(e, a, b)`` equal to 1 for
    ``e <= a``, 0 for ``e >= b`` and linear in between, for an image ``x`` and the requested shape
    ``s``, colour ``c``, position ``p`` (a point in ``[0, 1]^2``) and background ``b``:

    * background colour ``b^ = median of the border pixels``; the object ``O`` is the largest
      8-connected set of pixels with ``d(x_i, b^) > 0.15``, its colour ``c^ = median of O`` and its
      coverage ``alpha_i = clip(<x_i - b^, c^ - b^> / ||c^ - b^||^2, 0, 1)`` on ``O`` (0 elsewhere);
    * ``background = ramp(d(b^, b), 0.05, 0.25)``;
    * ``presence = ramp(a, ...)`` of the object's area share ``a = |O| / (H W)``: 1 for
      ``0.03 <= a <= 0.4``, 0 below 0.005 and above 0.6 (no object, or noise everywhere);
    * ``colour = ramp(d(c^, c), 0.1, 0.25)``;
    * ``shape = ramp(|r - r_s|, 0.05, 0.2) * ramp(|log(w / h)|, 0.15, 0.5)`` with the soft width
      ``w = sum_x max_y alpha``, height ``h = sum_y max_x alpha``, fill ratio ``r = sum alpha / (w h)``
      and ``r_s`` 1 (square), pi / 4 (circle) or 0.56 (triangle: 1 / 2 less the partly covered apex);
    * ``size = clip((sqrt(w h / (H W)) - 0.25) / 0.25, 0, 1)``: the object's side (the soft width
      and height below) as a fraction of the image side, 0 at 1/4 and 1 from 1/2 on (8 and 16 px at
      32 px; renders measure within 0.25 px, a triangle ~0.6 px short for its partly covered
      apex). No caption states it and the world draws it at random for every scene, so it is the
      global quality that every image has more or less of;
    * ``position = ramp(||m - p||, 0.07, 0.15)`` with ``m`` the centroids of those column and row
      profiles, as a fraction of the image side;
    * ``clean = mean_i ramp(e_i, 0.05, 0.25)`` with ``e_i = min(d(x_i, b^), d(x_i, c^))`` on ``O`` and
      ``e_i = d(x_i, b^)`` elsewhere: stray marks, noise and blur lower it.

    ``score = 0.05 background + presence (0.3 size + 0.25 colour + 0.2 shape + 0.1 position + 0.1 clean)``.
    Two kinds of quality weigh about the same, as in human preference data: the global quality
    (size, 0.3) that varies on every image, and following the prompt where the base model is
    imperfect (colour and shape, 0.45); position, cleanliness and background, which the base model
    nearly always gets right, weigh little.
    Prompts must name all four attributes (see :func:`~lightning_refdpo.toy.world.parse_caption`).
    """

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.parts(images, prompts)["score"]

    def parts(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every part of the score (each ``(N,)`` in ``[0, 1]``) and ``score`` itself."""
        x = images.float().cpu()
        n, _, h, w = x.shape
        attributes = [parse_caption(p) for p in prompts]
        target_colour = _colours([COLOURS[a.colour] for a in attributes])
        target_background = _colours([BACKGROUNDS[a.background] for a in attributes])
        target_position = torch.tensor([POSITIONS[a.position][0] for a in attributes])
        target_fill = torch.tensor([FILL_RATIO[a.shape] for a in attributes])

        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
        background = border.median(dim=-1).values[..., None, None]
        obj = largest_component(distance(x, background) > FOREGROUND_DISTANCE)
        colour = x.masked_fill(~obj.unsqueeze(1), math.nan).flatten(2).nanmedian(dim=-1).values
        colour = torch.where(obj.flatten(1).any(1, keepdim=True), colour, background[..., 0, 0])[
            ..., None, None
        ]

        contrast = colour - background
        alpha = ((x - background) * contrast).sum(1) / (contrast.pow(2).sum(1) + 1e-8)
        alpha = alpha.clamp(0.0, 1.0) * obj
        columns, rows = alpha.amax(dim=1), alpha.amax(dim=2)
        width, height = columns.sum(-1), rows.sum(-1)
        fill = alpha.sum((1, 2)) / (width * height).clamp_min(1e-8)
        aspect = (width.clamp_min(1e-8) / height.clamp_min(1e-8)).log().abs()
        centre = torch.stack([_centroid(columns) / w, _centroid(rows) / h], dim=-1)
        area = obj.float().mean((1, 2))
        residual = torch.where(
            obj, torch.minimum(distance(x, background), distance(x, colour)), distance(x, background)
        )

        parts = {
            "background": ramp(distance(background[..., 0, 0], target_background), 0.05, 0.25),
            "presence": torch.minimum(ramp(-area, -0.03, -0.005), ramp(area, 0.4, 0.6)),
            "colour": ramp(distance(colour[..., 0, 0], target_colour), 0.1, 0.25),
            "shape": ramp((fill - target_fill).abs(), 0.05, 0.2) * ramp(aspect, 0.15, 0.5),
            "size": ramp(-(width * height / (h * w)).sqrt(), -SIZE_SCALE[1], -SIZE_SCALE[0]),
            "position": ramp((centre - target_position).norm(dim=-1), 0.07, 0.15),
            "clean": ramp(residual, 0.05, 0.25).mean((1, 2)),
        }
        gated = sum(WEIGHTS[k] * parts[k] for k in ("size", "colour", "shape", "position", "clean"))
        parts["score"] = WEIGHTS["background"] * parts["background"] + parts["presence"] * gated
        return {k: v.to(images.device) for k, v in parts.items()}


def _colours(rgb: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32) / 255.0


def _centroid(profile: torch.Tensor) -> torch.Tensor:
    """Centroid of a profile ``(N, L)`` over pixel centres ``0.5 .. L - 0.5`` (``L / 2`` if empty)."""
    positions = torch.arange(profile.shape[-1], dtype=torch.float32) + 0.5
    total = profile.sum(-1)
    return torch.where(
        total > 0, (profile * positions).sum(-1) / total.clamp_min(1e-8), profile.shape[-1] / 2
    )
