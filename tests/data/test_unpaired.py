"""Unpaired labelled images (data.unpaired, for Diffusion-KTO): schema, labels and couples."""

import pytest
import torch

from lightning_refdpo.data import PreferenceCollator
from lightning_refdpo.data.cache_command import cache_latents
from tests.data.test_datamodule import datamodule, solid, write


def images(labels, colours=None) -> dict:
    colours = colours or ["white" if label == 1 else "black" for label in labels]
    return {
        "caption": [f"caption {i}" for i in range(len(labels))],
        "image": [solid(c) for c in colours],
        "label": list(labels),
    }


def test_couples_hold_one_image_of_each_kind_with_its_own_caption(tmp_path):
    labels = [1, 0, 1, 1, 0, 1, 1]  # 5 desirable (white), 2 undesirable (black)
    dm = datamodule(write(tmp_path, images(labels)), unpaired=True, random_flip=False, train_batch_size=3)
    dm.setup("fit")
    couples = dm.splits["train"]
    assert len(couples) == 5, "every image of the larger kind once an epoch"
    desirable = {f"caption {i}" for i, x in enumerate(labels) if x == 1}
    seen = []
    for i in range(len(couples)):
        couple = couples[i]
        assert couple["pixel_values"].shape == (6, 32, 32)
        assert torch.all(couple["pixel_values"][:3] == 1.0) and torch.all(couple["pixel_values"][3:] == -1.0)
        assert couple["caption"] in desirable and couple["caption_l"] not in desirable
        assert {"timestep", "noise_seed"} <= couple.keys()
        seen.append((couple["caption"], couple["caption_l"]))
    assert {c for c, _ in seen} == desirable
    assert {c for _, c in seen} == {"caption 1", "caption 4"}, "the smaller kind cycled"
    couples.set_epoch(1)
    assert [(couples[i]["caption"], couples[i]["caption_l"]) for i in range(5)] != seen, (
        "new couples each epoch"
    )
    batch = PreferenceCollator()([couples[i] for i in range(3)])
    assert len(batch["caption"]) == len(batch["caption_l"]) == 3 and batch["pixel_values"].shape == (
        3,
        6,
        32,
        32,
    )


def test_bool_labels_and_a_train_loader(tmp_path):
    dm = datamodule(write(tmp_path, images([True, False, True, False])), unpaired=True, train_batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 6, 32, 32) and len(batch["caption_l"]) == 2
    assert batch["timesteps"].shape == (2,)


@pytest.mark.parametrize("label", [0.5, 2, -1, float("nan")])
def test_a_label_other_than_1_or_0_is_refused_naming_its_row(tmp_path, label):
    path = write(tmp_path, images([1.0, label, 0.0], ["white"] * 3))
    with pytest.raises(
        ValueError,
        match=f"label of split 'train' must be 1 \\(desirable\\) or 0 .*\\(row 1: {float(label)}\\)",
    ):
        datamodule(path, unpaired=True).setup("fit")


def test_a_label_of_text_is_refused(tmp_path):
    with pytest.raises(ValueError, match="column label of split 'train' must be numeric \\(1 or 0\\)"):
        datamodule(write(tmp_path, images(["good", "bad"], ["white"] * 2)), unpaired=True).setup("fit")


@pytest.mark.parametrize(
    ("label", "missing"), [(1, "undesirable \\(label 0\\)"), (0, "desirable \\(label 1\\)")]
)
def test_a_split_of_one_kind_is_refused(tmp_path, label, missing):
    with pytest.raises(
        ValueError, match=f"split 'train' has no {missing} image: .*needs desirable and undesirable"
    ):
        datamodule(write(tmp_path, images([label] * 3)), unpaired=True).setup("fit")


def test_missing_columns_and_the_wrong_layout_say_which_option_to_set(tmp_path):
    pairs = write(
        tmp_path, {"caption": ["a"], "jpg_0": [solid("red")], "jpg_1": [solid("red")], "label_0": [1.0]}
    )
    with pytest.raises(ValueError, match="lacks column\\(s\\) image, label.*set data.unpaired: false"):
        datamodule(pairs, unpaired=True).setup("fit")
    unpaired = write(tmp_path, images([1, 0]), "images.parquet")
    with pytest.raises(
        ValueError, match="lacks column\\(s\\) jpg_0, jpg_1, label_0.*set data.unpaired: true"
    ):
        datamodule(unpaired).setup("fit")


@pytest.mark.parametrize(
    "option",
    [{"latent_cache": "cache"}, {"streaming": True}, {"latent_columns": ("a", "b"), "random_flip": False}],
)
def test_unpaired_refuses_what_cannot_couple(option):
    with pytest.raises(ValueError, match=f"data.unpaired .* data.{next(iter(option))}"):
        datamodule("train.parquet", unpaired=True, **option)


def test_unpaired_images_are_not_cached(tmp_path):
    dm = datamodule(write(tmp_path, images([1, 0])), unpaired=True)
    with pytest.raises(ValueError, match="data.unpaired images .* cannot be cached"):
        cache_latents(None, None, dm, str(tmp_path / "cache"))
