import json
import sys

import pytest
import torch

from lightning_refdpo.metrics import HPSv2
from tests.helpers import not_installed

TINY_ARCHITECTURE = "hps-tiny-test"  # open_clip config named after its json file


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip", reason=not_installed("open_clip"))


@pytest.fixture(scope="module")
def checkpoint(open_clip, tmp_path_factory) -> str:
    """A tiny open_clip ViT registered as an architecture, saved the way HPS checkpoints are ({"state_dict": ...})."""
    folder = tmp_path_factory.mktemp("tiny-hps")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (folder / f"{TINY_ARCHITECTURE}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_ARCHITECTURE}.json")
    torch.manual_seed(5)
    model = open_clip.create_model(TINY_ARCHITECTURE)
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2_compressed.pt")
    return str(folder / "HPS_v2_compressed.pt")


@pytest.fixture(scope="module")
def hps(checkpoint) -> HPSv2:
    return HPSv2(checkpoint_path=checkpoint, architecture=TINY_ARCHITECTURE)


@pytest.fixture(scope="module")
def expected(open_clip, checkpoint, pil_images, prompts) -> torch.Tensor:
    """100 times ``hpsv2.score``: the diagonal of image_features @ text_features.T of the unit-norm open_clip features."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCHITECTURE)
    model.load_state_dict(torch.load(checkpoint)["state_dict"])
    tokenizer = open_clip.get_tokenizer(TINY_ARCHITECTURE)
    with torch.no_grad():
        image_features, text_features, _ = model.eval()(
            torch.stack([preprocess(image) for image in pil_images]), tokenizer(prompts)
        )
    return 100 * (image_features @ text_features.T).diagonal()


def test_matches_100_times_the_hpsv2_cosine(hps, expected, images, pil_images, prompts):
    hps.reset()
    hps.update(images[:2], prompts[:2])
    hps.update(pil_images[2:], prompts[2:])
    torch.testing.assert_close(hps.scores(), expected, atol=1e-2, rtol=0)
    torch.testing.assert_close(hps.compute(), expected.mean(), atol=1e-2, rtol=0)


def test_float_input_scores_like_uint8(hps, expected, images, prompts):
    hps.reset()
    hps.update(images.float() / 255, prompts)
    torch.testing.assert_close(hps.scores(), expected, atol=1e-2, rtol=0)


def test_reward_model_is_frozen(hps):
    hps.train()
    assert not any(p.requires_grad for p in hps.parameters())
    assert not any(module.training for module in hps.modules())


def test_offline_error_names_the_argument(open_clip):
    with pytest.raises(
        OSError, match=r"could not fetch HPS checkpoint 'HPS_v2_compressed.pt'.*checkpoint_path="
    ):
        HPSv2()


def test_unknown_version():
    with pytest.raises(ValueError, match="unknown HPS version 'v3'"):
        HPSv2(version="v3")


def test_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match=r"lightning-refdpo\[hpsv2\]"):
        HPSv2(checkpoint_path="unused.pt")
