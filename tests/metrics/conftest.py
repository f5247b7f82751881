"""Tiny, randomly initialized reward-model assets saved to disk, so scorers load them the way users load real ones."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """Four random uint8 images, not square and larger than the models' input, so resizing and cropping matter."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 3, 40, 52), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return ["a photo of a cat", "an oil painting of a lighthouse at dusk", "a red cube", "two dogs playing"]


@pytest.fixture(scope="session")
def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """The same images as PIL, the input the reference scorers take."""
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]


@pytest.fixture(scope="session")
def clip_reference(clip_dir: str, pil_images: list[Image.Image], prompts: list[str]):
    """``CLIPModel.forward`` on the PIL images and prompts, as the reference scorers call it."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=pil_images, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs)


class StandInOpenCLIP(torch.nn.Module):
    """An open_clip-like model: images and token ids to features (``encode_image``, ``encode_text``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.visual = torch.nn.Linear(3 * 8 * 8, 16)
        self.text = torch.nn.EmbeddingBag(256, 16)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(pixels.flatten(1))
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


@pytest.fixture
def stand_in_open_clip(monkeypatch: pytest.MonkeyPatch):
    """``open_clip`` replaced by a module of the same API over :class:`StandInOpenCLIP`: open_clip
    needs torchvision, which the CPU install leaves out (it does not import beside the CPU torch:
    ``tests.helpers.not_installed``); records the ``pretrained`` asked for."""
    import sys
    import types

    module = types.ModuleType("open_clip")
    module.requested = []

    def preprocess(image: Image.Image) -> torch.Tensor:
        array = torch.tensor(list(image.resize((8, 8)).getdata()), dtype=torch.float32)
        return array.T.reshape(3, 8, 8) / 255

    def create_model_and_transforms(architecture: str, pretrained: str | None = None):
        module.requested.append((architecture, pretrained))
        return StandInOpenCLIP(), None, preprocess

    def get_tokenizer(architecture: str):
        return lambda prompts: torch.tensor([[ord(c) % 256 for c in (p + " " * 8)[:8]] for p in prompts])

    module.create_model_and_transforms = create_model_and_transforms
    module.get_tokenizer = get_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return module
