"""A toy text-to-image world whose preferences are known exactly.

A scene is one shape (circle, square, triangle) of one colour at one of five positions on a plain
background, rendered at 32x32 px, with a caption that states all four attributes, e.g.
``"a red circle on the left, white background"``. The size (8-16 px, ``SIZE_RANGE``) and a +-1.5 px
offset are drawn at random but left out of the caption: the size is the world's global quality, which
no caption states and every image varies in, as aesthetics and detail vary in real data (ToyReward
prefers larger objects). The 3 x 5 x 5 x 3 = 225 attribute combinations are split
once, in a fixed shuffled order: every fifth combination is a test prompt (``TEST_PROMPTS``, 45,
where results are reported), every sixth of the rest a validation prompt (``VALIDATION_PROMPTS``, 30,
where guidance and hyperparameters are chosen), and the other 150 are for pretraining and preference
data (``TRAIN_PROMPTS``). Every single attribute value occurs in each split.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "pink": (230, 80, 200),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
# (x, y) of the shape's bounding-box centre as a fraction of the image side, and the phrase.
POSITIONS = {
    "left": ((0.3, 0.5), "on the left"),
    "right": ((0.7, 0.5), "on the right"),
    "top": ((0.5, 0.3), "at the top"),
    "bottom": ((0.5, 0.7), "at the bottom"),
    "centre": ((0.5, 0.5), "in the centre"),
}
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
SIZE_RANGE = (8.0, 16.0)
"""Side length in px of a scene's object, drawn uniformly (the largest still fits at every position)."""
MAX_OFFSET = 1.5
SUPERSAMPLING = 4


@dataclass(frozen=True)
class Prompt:
    """The four attributes a caption states."""

    shape: str
    colour: str
    position: str
    background: str


@dataclass(frozen=True)
class Scene(Prompt):
    """A prompt plus what the caption leaves out: side length and offset in px (at ``RESOLUTION``)."""

    size: float = 12.0
    dx: float = 0.0
    dy: float = 0.0


def caption(scene: Prompt) -> str:
    """``"a {colour} {shape} {position phrase}, {background} background"``."""
    phrase = POSITIONS[scene.position][1]
    return f"a {scene.colour} {scene.shape} {phrase}, {scene.background} background"


def parse_caption(text: str) -> Prompt:
    """The attributes named in ``text`` (any order, ``center`` and ``grey`` accepted).

    Raises ``ValueError`` when a caption does not name exactly one value of each attribute.
    """
    words = re.findall(r"[a-z]+", text.lower().replace("center", "centre").replace("grey", "gray"))

    def find(vocabulary, name: str, skip: tuple[str, ...] = ()) -> str:
        found = {w for w in words if w in vocabulary and w not in skip}
        if len(found) != 1:
            raise ValueError(f"caption {text!r} must name one {name} of {sorted(vocabulary)}, found {found}")
        return found.pop()

    background = re.search(r"([a-z]+)\s+background", text.lower().replace("grey", "gray"))
    if background is None or background.group(1) not in BACKGROUNDS:
        raise ValueError(f"caption {text!r} must end with '<{'|'.join(BACKGROUNDS)}> background'")
    return Prompt(
        shape=find(SHAPES, "shape"),
        colour=find(COLOURS, "colour"),
        position=find(POSITIONS, "position"),
        background=background.group(1),
    )


def sample_scene(
    rng: np.random.Generator, prompt: Prompt | None = None, size_range: tuple[float, float] = SIZE_RANGE
) -> Scene:
    """A random scene, or a random size (uniform in ``size_range``) and offset for the attributes of
    ``prompt``."""
    if prompt is None:
        prompt = Prompt(
            shape=str(rng.choice(SHAPES)),
            colour=str(rng.choice(list(COLOURS))),
            position=str(rng.choice(list(POSITIONS))),
            background=str(rng.choice(list(BACKGROUNDS))),
        )
    dx, dy = rng.uniform(-MAX_OFFSET, MAX_OFFSET, size=2)
    return Scene(
        prompt.shape,
        prompt.colour,
        prompt.position,
        prompt.background,
        size=float(rng.uniform(*size_range)),
        dx=float(dx),
        dy=float(dy),
    )


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """Draw the scene at ``SUPERSAMPLING`` times the resolution and box-filter it down (anti-aliasing).

    Sizes and offsets are in px at ``RESOLUTION`` and scale with ``resolution``.
    """
    scale = resolution / RESOLUTION * SUPERSAMPLING
    side = resolution * SUPERSAMPLING
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    (x, y), _ = POSITIONS[scene.position]
    cx, cy = x * side + scene.dx * scale, y * side + scene.dy * scale
    half = scene.size * scale / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def all_prompts() -> list[Prompt]:
    """Every attribute combination, in a fixed order."""
    return [Prompt(*values) for values in itertools.product(SHAPES, COLOURS, POSITIONS, BACKGROUNDS)]


def perturb(prompt: Prompt, rng: np.random.Generator, noise: dict[str, float]) -> Prompt:
    """``prompt`` with each attribute ``a`` replaced, with probability ``noise[a]``, by another value
    drawn uniformly (caption noise: pretraining on such captions gives a model that follows attribute
    ``a`` only partly)."""
    changed = {}
    for attribute, p in noise.items():
        if attribute not in ATTRIBUTES:
            raise ValueError(f"caption noise names {attribute!r}; choose from {sorted(ATTRIBUTES)}")
        if rng.random() < p:
            others = [v for v in ATTRIBUTES[attribute] if v != getattr(prompt, attribute)]
            changed[attribute] = str(rng.choice(others))
    return dataclasses.replace(prompt, **changed)


def _split(
    seed: int = 0, test_every: int = 5, validation_every: int = 6
) -> tuple[list[str], list[str], list[str]]:
    prompts = all_prompts()
    order = np.random.default_rng(seed).permutation(len(prompts)).tolist()
    test = set(order[::test_every])
    rest = [i for i in order if i not in test]
    validation = set(rest[::validation_every])

    def captions(indices) -> list[str]:
        return [caption(p) for i, p in enumerate(prompts) if i in indices]

    train = set(range(len(prompts))) - test - validation
    return captions(train), captions(validation), captions(test)


TRAIN_PROMPTS, VALIDATION_PROMPTS, TEST_PROMPTS = _split()
