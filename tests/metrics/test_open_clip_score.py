import pytest
import torch

from lightning_refdpo.metrics import HPSv2, OpenCLIPScore
from tests.metrics.conftest import StandInOpenCLIP


def cosine(pil_images, prompts, stand_in) -> torch.Tensor:
    model = StandInOpenCLIP()
    preprocess = stand_in.create_model_and_transforms("x")[2]
    image = model.encode_image(torch.stack([preprocess(i) for i in pil_images]), normalize=True)
    text = model.encode_text(stand_in.get_tokenizer("x")(prompts), normalize=True)
    return (image * text).sum(-1)


def test_open_clip_score_is_100_times_the_raw_cosine(stand_in_open_clip, images, pil_images, prompts):
    scorer = OpenCLIPScore()
    assert stand_in_open_clip.requested == [("ViT-H-14", "laion2B-s32B-b79K")]
    scorer.update(images, prompts)
    expected = 100 * cosine(pil_images, prompts, stand_in_open_clip)
    torch.testing.assert_close(scorer.scores(), expected.detach(), atol=1e-4, rtol=0)
    assert (expected < 0).any(), "no clamp at 0, unlike torchmetrics' CLIPScore"
    assert scorer.name == "CLIPScore-ViT-H-14"
    assert OpenCLIPScore(architecture="ViT-L-14", pretrained="openai").name == "CLIPScore-ViT-L-14"


def test_hpsv2_defaults_to_v2_0_and_reports_100_times_the_cosine(
    stand_in_open_clip, tmp_path, images, pil_images, prompts
):
    torch.save({"state_dict": StandInOpenCLIP().state_dict()}, tmp_path / "hps.pt")
    hps = HPSv2(checkpoint_path=str(tmp_path / "hps.pt"))
    assert hps.version == "v2.0" and hps.name == "HPSv2.0"
    assert HPSv2(version="v2.1", checkpoint_path=str(tmp_path / "hps.pt")).name == "HPSv2.1"
    hps.update(images, prompts)
    expected = 100 * cosine(pil_images, prompts, stand_in_open_clip)
    torch.testing.assert_close(hps.scores(), expected.detach(), atol=1e-4, rtol=0)


def test_missing_open_clip_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"OpenCLIPScore needs open_clip.*lightning-refdpo\[hpsv2\]"):
        OpenCLIPScore()
