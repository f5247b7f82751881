import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_refdpo.data import PairTransform, PreferenceCollator, PreferenceDataModule, PreferencePairs
from lightning_refdpo.data.draws import PairDraws
from lightning_refdpo.testing import encode_image
from lightning_refdpo.timesteps import DiscountedTimestepSampler, UniformTimestepSampler


def solid(colour, size=(40, 32)) -> bytes:
    return encode_image(Image.new("RGB", size, colour))


def write(tmp_path, rows, name="train.parquet") -> str:
    path = tmp_path / name
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return str(path)


def datamodule(path: str, **kwargs) -> PreferenceDataModule:
    kwargs = {
        "resolution": 32,
        "num_workers": 0,
        "validation_split": None,
        "proportion_empty_prompts": 0.0,
        **kwargs,
    }
    return PreferenceDataModule(dataset_name="parquet", data_files={"train": path}, **kwargs)


def test_winner_first_and_ties_dropped(tmp_path):
    white, black = solid("white"), solid("black")
    path = write(
        tmp_path,
        {
            "caption": ["a", "b", "tie"],
            "jpg_0": [white, black, white],
            "jpg_1": [black, white, black],
            "label_0": [1.0, 0.0, 0.5],
        },
    )
    dm = datamodule(path, train_batch_size=2, random_flip=False)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 2
    for i in range(2):
        pair = dm.splits["train"][i]
        assert pair["pixel_values"].shape == (6, 32, 32)
        assert torch.all(pair["pixel_values"][:3] == 1.0) and torch.all(pair["pixel_values"][3:] == -1.0)


def test_batches_carry_sampled_timesteps(tiny_data):
    dm = PreferenceDataModule(
        dataset_name="parquet",
        data_files=tiny_data,
        resolution=32,
        num_workers=0,
        train_batch_size=4,
        timestep_sampler=DiscountedTimestepSampler(1000, gamma=0.5, num_bins=10),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 6, 32, 32)
    assert batch["timesteps"].dtype == torch.long and batch["timesteps"].shape == (4,)
    assert "timesteps" not in next(iter(dm.val_dataloader()))


def columns(width: int, height: int = 32) -> Image.Image:
    """An image whose every column has its own grey level (5 * x)."""
    return Image.fromarray(np.tile(np.arange(width, dtype=np.uint8)[None, :, None] * 5, (height, 1, 3)))


def test_each_image_is_cropped_by_its_own_box():
    transform = PairTransform(resolution=32, random_crop=False, random_flip=False)
    landscape, square = columns(64), Image.new("RGB", (32, 32), "white")
    out = transform(landscape, square)
    assert torch.all(out["pixel_values"][3:] == 1.0), "the square loser is not padded by the winner's box"
    torch.testing.assert_close(out["pixel_values"][:3], transform(landscape, landscape)["pixel_values"][3:])
    out = transform(square, landscape)
    expected = torch.from_numpy(np.asarray(landscape.crop((16, 0, 48, 32)), dtype=np.float32) / 127.5 - 1)
    torch.testing.assert_close(out["pixel_values"][3:], expected.permute(2, 0, 1))
    assert out["original_size"].tolist() == [[32, 32], [32, 64]]
    assert out["crop_top_left"].tolist() == [[0, 0], [0, 16]]


def test_random_crops_are_drawn_per_image():
    transform = PairTransform(resolution=32, random_crop=True, random_flip=False)
    corners = [transform(columns(48), columns(48))["crop_top_left"] for _ in range(20)]
    assert any(c[0, 1] != c[1, 1] for c in corners)


@pytest.mark.parametrize("shared_flip", [False, True])
def test_flips_are_independent_unless_shared(shared_flip):
    transform = PairTransform(resolution=32, random_flip=True, shared_flip=shared_flip)
    image = columns(32)
    generator = torch.Generator().manual_seed(0)
    flips = []
    for _ in range(40):
        pixels = transform(image, image.copy(), generator)["pixel_values"]
        flips.append(tuple(bool(half[0, 0, 0] > half[0, 0, -1]) for half in (pixels[:3], pixels[3:])))
    mixed = sum(winner != loser for winner, loser in flips)
    assert (mixed == 0) if shared_flip else (5 < mixed < 35)
    assert 0 < sum(w for w, _ in flips) < 40


def test_max_train_samples_is_a_seeded_shuffle_of_the_strict_pairs(tmp_path):
    labels = [0.5, 1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 0.0, 1.0]
    rows = {
        "caption": [f"p{i}" for i in range(10)],
        "jpg_0": [solid("red")] * 10,
        "jpg_1": [solid("blue")] * 10,
        "label_0": labels,
    }
    path = write(tmp_path, rows)
    dm = datamodule(path, max_train_samples=4, seed=7)
    dm.setup("fit")
    kept = [dm.splits["train"].dataset[i]["caption"] for i in range(4)]
    strict = datasets.Dataset.from_dict(rows).filter(lambda row: row["label_0"] != 0.5)
    assert kept == strict.shuffle(seed=7).select(range(4))["caption"]
    assert kept != strict["caption"][:4]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    good = solid("red")
    path = write(
        tmp_path,
        {
            "caption": ["ok", "bad", "ok"],
            "jpg_0": [good, b"not an image", good],
            "jpg_1": [good, good, good],
            "label_0": [1.0, 1.0, 0.0],
        },
    )
    dm = datamodule(path, train_batch_size=3)
    dm.setup("fit")
    collate = PreferenceCollator()
    batch = collate([dm.splits["train"][i] for i in range(3)])
    assert batch["num_skipped"] == 1 and batch["pixel_values"].shape[0] == 2
    assert collate([None, None])["num_skipped"] == 2


def test_caption_dropout():
    draws = PairDraws(UniformTimestepSampler(1000), proportion_empty_prompts=0.2, seed=3)
    pair = {
        "caption": "x",
        "pixel_values": torch.zeros(6, 8, 8),
        "original_size": torch.zeros(2),
        "crop_top_left": torch.zeros(2),
    }
    pairs = [{**pair, **draws(draws.generator(i))} for i in range(200)]
    captions = PreferenceCollator()(pairs)["caption"]
    assert 20 < captions.count("") < 60


def test_pair_draws_depend_on_seed_epoch_and_index_only():
    draws = PairDraws(UniformTimestepSampler(1000), proportion_empty_prompts=0.5, seed=3)
    first = [draws(draws.generator(i)) for i in range(8)]
    assert [draws(draws.generator(i)) for i in range(8)] == first
    draws.epoch = 1
    assert [draws(draws.generator(i)) for i in range(8)] != first
    assert len({d["noise_seed"] for d in first}) == 8


def test_missing_column_is_named(tmp_path):
    path = write(tmp_path, {"caption": ["a"], "jpg_0": [solid("red")], "label_0": [1.0]})
    with pytest.raises(ValueError, match="lacks column\\(s\\) jpg_1"):
        datamodule(path).setup("fit")


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_a_split_missing_a_column_names_the_split_its_file_and_the_column(tmp_path, streaming):
    """The training file lacks label_0, the validation file has it (datasets built both splits with
    the first one's columns and failed as "unreadable")."""
    red = solid("red")
    train = write(tmp_path, {"caption": ["a"], "jpg_0": [red], "jpg_1": [red]})
    validation = write(
        tmp_path, {"caption": ["a"], "jpg_0": [red], "jpg_1": [red], "label_0": [1.0]}, "validation.parquet"
    )
    files = {"train": train, "validation": validation}
    data = PreferenceDataModule(
        dataset_name="parquet", data_files=files, resolution=32, num_workers=0, streaming=streaming
    )
    expected = f"split 'train' \\({train}\\) lacks column\\(s\\) label_0; found caption, jpg_0, jpg_1"
    with pytest.raises(ValueError, match=expected):
        data.setup("fit")


def test_wrong_label_type_is_named(tmp_path):
    path = write(
        tmp_path, {"caption": ["a"], "jpg_0": [solid("red")], "jpg_1": [solid("red")], "label_0": ["yes"]}
    )
    with pytest.raises(ValueError, match="label_0 .* must be numeric"):
        datamodule(path).setup("fit")


@pytest.mark.parametrize("label", [0.7, 2.0, -1.0, float("nan")])
def test_labels_other_than_0_half_1_are_refused_with_their_rows(tmp_path, label):
    red = solid("red")
    rows = {"caption": ["a", "b", "c"], "jpg_0": [red] * 3, "jpg_1": [red] * 3, "label_0": [1.0, label, 0.0]}
    with pytest.raises(ValueError, match=f"label_0 of split 'train' must be 1 .* \\(row 1: {label}\\)"):
        datamodule(write(tmp_path, rows)).setup("fit")


def test_empty_and_zero_byte_parquet_name_the_split_and_file(tmp_path):
    empty = write(tmp_path, {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}, "empty.parquet")
    zero = tmp_path / "zero.parquet"
    zero.touch()
    for path in (empty, str(zero)):
        with pytest.raises(ValueError, match=f"split 'train' \\({path}\\) is empty or unreadable"):
            datamodule(path).setup("fit")


def test_all_ties_refused(tmp_path):
    path = write(
        tmp_path, {"caption": ["a"], "jpg_0": [solid("red")], "jpg_1": [solid("red")], "label_0": [0.5]}
    )
    with pytest.raises(ValueError, match="every pair .* is a tie"):
        datamodule(path).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resolution": 30}, "resolution"),
        ({"proportion_empty_prompts": 1.5}, "proportion_empty_prompts"),
        ({"train_batch_size": 0}, "train_batch_size"),
    ],
)
def test_invalid_options_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreferenceDataModule(**kwargs)


def test_image_cells_in_every_layout(tmp_path):
    from lightning_refdpo.data.preference import decode_image

    raw = solid("blue")
    file = tmp_path / "x.png"
    file.write_bytes(raw)
    for cell in (
        raw,
        {"bytes": raw, "path": None},
        {"bytes": None, "path": str(file)},
        str(file),
        Image.new("L", (4, 4)),
    ):
        assert decode_image(cell).mode == "RGB"


def test_pairs_dataset_len(tmp_path):
    path = write(
        tmp_path, {"caption": ["a"], "jpg_0": [solid("red")], "jpg_1": [solid("red")], "label_0": [1]}
    )
    assert (
        len(
            PreferencePairs(
                datasets.load_dataset("parquet", data_files=path, split="train"), PairTransform(32)
            )
        )
        == 1
    )
