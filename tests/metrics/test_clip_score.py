import importlib.metadata

import pytest
import torch

from lightning_refdpo.metrics import CLIPScore


@pytest.fixture(scope="module")
def clip_score(clip_dir: str) -> CLIPScore:
    return CLIPScore(model_name_or_path=clip_dir)


@pytest.fixture(scope="module")
def expected(clip_reference) -> torch.Tensor:
    cosine = (clip_reference.image_embeds * clip_reference.text_embeds).sum(-1)
    return 100 * cosine.clamp(min=0)


def test_matches_100_times_clamped_cosine(clip_score, expected, images, pil_images, prompts):
    clip_score.reset()
    clip_score.update(images[:3], prompts[:3])
    clip_score.update(pil_images[3], prompts[3])
    torch.testing.assert_close(clip_score.scores(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(clip_score.compute(), expected.mean(), atol=1e-4, rtol=0)


def test_float_input_scores_like_uint8(clip_score, expected, images, prompts):
    clip_score.reset()
    clip_score.update(images.float() / 255, prompts)
    torch.testing.assert_close(clip_score.scores(), expected, atol=1e-4, rtol=0)


def test_reward_model_is_frozen(clip_score):
    clip_score.train()
    assert not any(p.requires_grad for p in clip_score.parameters())
    assert not any(module.training for module in clip_score.modules())


def test_offline_error_names_the_argument():
    with pytest.raises(
        OSError, match=r"could not load CLIPScore CLIP model 'no-such/model'.*model_name_or_path="
    ):
        CLIPScore(model_name_or_path="no-such/model")


def test_name_carries_the_backbone(clip_score):
    assert clip_score.name == "CLIPScore-ViT-32-8", "the tiny CLIP: width 32, patch 8"


def test_image_processor_runs_on_pil(clip_dir, monkeypatch):
    """transformers 5 would pick the torchvision processor when torchvision is installed."""
    from transformers import AutoProcessor

    from lightning_refdpo.metrics._clip import PIL_BACKEND

    asked = []
    original = AutoProcessor.from_pretrained
    monkeypatch.setattr(
        AutoProcessor, "from_pretrained", lambda *a, **kw: asked.append(kw) or original(*a, **kw)
    )
    scorer = CLIPScore(model_name_or_path=clip_dir)
    assert asked and all(kw.items() >= PIL_BACKEND.items() for kw in asked)
    assert PIL_BACKEND in ({"backend": "pil"}, {"use_fast": False})
    assert "Pil" in type(scorer.clip.processor.image_processor).__name__ or PIL_BACKEND == {"use_fast": False}


@pytest.mark.skipif(
    torch.version.cuda is not None, reason="a CUDA torch: torchvision's wheels are built for it"
)
def test_no_torchvision_beside_a_cpu_torch():
    """The registry's torchvision does not import beside the CPU torch and breaks transformers'
    CLIPImageProcessor and open_clip: ``make install`` must leave it out."""
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("torchvision")
