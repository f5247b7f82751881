"""``lightning-refdpo evaluate`` on the tiny model: symmetric comparisons, the paper's samplers,
streaming with a resumable index, bounded memory and several processes."""

import hashlib
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

from lightning_refdpo.cli import run_cli
from lightning_refdpo.evaluation import results_table
from lightning_refdpo.evaluation.generation import item_batches, load_pipeline, sampler_config
from lightning_refdpo.evaluation.report import summarize

PROMPTS = ["a red cat", "a blue dog", "a green tree"]


def untrained_checkpoint(
    tiny_model, tiny_data, root: Path, *overrides: str, module: str = "lightning_refdpo.DiffusionDPOModule"
) -> str:
    """A checkpoint of ``lightning-refdpo fit`` before any step: the base model."""
    cli = run_cli(
        [
            "fit",
            "--config=configs/tiny.yaml",
            f"--model.class_path={module}",
            f"--model.init_args.pretrained_model_name_or_path={tiny_model}",
            f"--data.init_args.data_files={json.dumps(tiny_data)}",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=0",
            "--trainer.limit_val_batches=0",
            *overrides,
        ]
    )
    cli.trainer.save_checkpoint(root / "untrained.ckpt")
    return str(root / "untrained.ckpt")


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tiny_data, tmp_path_factory) -> str:
    return untrained_checkpoint(tiny_model, tiny_data, tmp_path_factory.mktemp("untrained"))


@pytest.fixture(scope="module")
def base_with_safety_checker(tiny_model, tmp_path_factory) -> str:
    """The tiny base model saved as a pipeline with a safety checker that flags every image (black)."""
    folder = tmp_path_factory.mktemp("base_with_checker")
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(vision_config={**vision, "image_size": 32, "patch_size": 8}, projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine + 2 > 0: every image flagged
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline.register_modules(
        safety_checker=checker, feature_extractor=CLIPImageProcessor(size=32, crop_size=32)
    )
    pipeline.register_to_config(requires_safety_checker=True)
    pipeline.save_pretrained(folder)
    return str(folder)


def evaluate(model, output, *options, prompts=PROMPTS, root=None):
    text = "\n".join(prompts)
    # named by its content: runs of the same prompts name the same prompt set in their results
    prompt_file = Path(output).parent / f"prompts-{hashlib.sha1(text.encode()).hexdigest()[:8]}.txt"
    prompt_file.write_text(text)
    return run_cli(
        [
            "evaluate",
            model,
            "--scorers",
            '[{"class_path": "tests.helpers.Brightness"}]',
            f"--prompt_sets=[{prompt_file}]",
            "--seeds=[0, 1]",
            "--num_inference_steps=2",
            "--resolution=32",
            "--device=cpu",
            "--num_bootstrap=200",
            f"--output={output}",
            *options,
        ]
    ).result


def images_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_untrained_checkpoint_against_its_base_folder_is_bit_identical(
    checkpoint, base_with_safety_checker, tmp_path
):
    flagged = load_pipeline(base_with_safety_checker, "cpu")[0]
    out = flagged(["a red cat"], num_inference_steps=2, height=32, width=32, output_type="np")
    assert out.nsfw_content_detected == [True] and not out.images.any(), "its own checker blacks it out"

    results = evaluate(
        checkpoint, tmp_path / "eval", f"--baseline={base_with_safety_checker}", "--save_images=true"
    )
    runs = next((tmp_path / "eval" / "runs").iterdir())
    model_images, baseline_images = images_of(runs / "model"), images_of(runs / "baseline")
    assert len(model_images) == 6 and model_images == baseline_images
    for entry in results["prompt_sets"].values():
        assert all(figures["win_rate"] == 0.5 for figures in entry["scores"].values())
        assert all(figures["win_rate_ci"] == [0.5, 0.5] for figures in entry["scores"].values())


@pytest.mark.parametrize("safety_checker", [False, True], ids=["off", "on"])
def test_the_safety_checker_is_off_on_both_sides_or_on_for_both(
    checkpoint, base_with_safety_checker, tmp_path, safety_checker
):
    """The model pipeline has a checker that flags everything; the baseline (a checkpoint) has none."""
    results = evaluate(
        base_with_safety_checker,
        tmp_path / "eval",
        f"--baseline={checkpoint}",
        f"--safety_checker={str(safety_checker).lower()}",
        "--save_images=true",
    )
    runs = next((tmp_path / "eval" / "runs").iterdir())
    assert images_of(runs / "model") == images_of(runs / "baseline")
    brightness = next(iter(results["prompt_sets"].values()))["scores"]["Brightness"]
    assert (brightness["model_mean"] == 0.0) == safety_checker and brightness["win_rate"] == 0.5


def test_sdxl_checkpoint_against_its_base_folder_is_bit_identical(tiny_sdxl, tiny_data, tmp_path):
    ckpt = untrained_checkpoint(
        tiny_sdxl, tiny_data, tmp_path / "fit", module="lightning_refdpo.sdxl.StableDiffusionXLDPOModule"
    )
    results = evaluate(ckpt, tmp_path / "eval", f"--baseline={tiny_sdxl}", "--save_images=true")
    runs = next((tmp_path / "eval" / "runs").iterdir())
    assert len(images_of(runs / "model")) == 6 and images_of(runs / "model") == images_of(runs / "baseline")
    assert next(iter(results["prompt_sets"].values()))["scores"]["Brightness"]["win_rate"] == 0.5
    assert (
        results["generation"]["guidance_scale"] == 5.0
        and results["generation"]["scheduler"] == "DDPMScheduler"
    )


def test_hpdv2_is_reported_per_style(checkpoint, tmp_path, monkeypatch):
    from lightning_refdpo import prompts

    monkeypatch.setattr(prompts, "_hpdv2_prompts", lambda style: [f"{style} {i}" for i in range(3)])
    results = run_cli(
        [
            "evaluate",
            checkpoint,
            "--scorers",
            '[{"class_path": "tests.helpers.Brightness"}]',
            "--prompt_sets=[hpdv2]",
            "--max_prompts=1",
            "--seeds=[0]",
            "--num_inference_steps=1",
            "--resolution=32",
            "--device=cpu",
            "--num_bootstrap=10",
            f"--output={tmp_path / 'eval'}",
        ]
    ).result
    entry = results["prompt_sets"]["hpdv2"]
    assert entry["num_prompts"] == 4 and list(entry["styles"]) == list(prompts.HPDV2_STYLES)
    assert "| average |" in (tmp_path / "eval" / "results.md").read_text()


def test_evaluate_without_baseline_with_a_bfloat16_initial_model(tiny_model, tiny_data, tmp_path):
    """The shipped full fine-tuning configs keep the frozen UNets in bfloat16."""
    ckpt = untrained_checkpoint(
        tiny_model, tiny_data, tmp_path / "fit", "--model.init_args.frozen_dtype=bfloat16"
    )
    results = evaluate(ckpt, tmp_path / "eval")
    figures = next(iter(results["prompt_sets"].values()))["scores"]["Brightness"]
    assert 0.0 <= figures["win_rate"] <= 1.0 and np.isfinite(figures["baseline_mean"])


def test_each_family_gets_the_papers_sampler_and_results_record_it(
    tiny_model, tiny_sdxl, checkpoint, tmp_path
):
    sd15 = sampler_config(load_pipeline(tiny_model, "cpu")[0])
    assert (sd15.num_inference_steps, sd15.guidance_scale, sd15.scheduler) == (50, 7.5, "DDIMScheduler")
    sdxl = sampler_config(load_pipeline(tiny_sdxl, "cpu")[0], guidance_scale=None)
    assert (sdxl.num_inference_steps, sdxl.guidance_scale, sdxl.scheduler) == (50, 5.0, None)
    assert sampler_config(load_pipeline(tiny_model, "cpu")[0], scheduler="default").scheduler is None

    results = evaluate(checkpoint, tmp_path / "eval", "--guidance_scale=3.0")
    generation = results["generation"]
    assert generation["num_inference_steps"] == 2 and generation["guidance_scale"] == 3.0
    assert generation["scheduler"] == "DDIMScheduler" and generation["dtype"] == "float32"
    assert generation["safety_checker"] is False
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["generation"] == generation


def test_items_come_in_fixed_batches_that_processes_share_whole():
    one = item_batches(7, 3)
    assert one == [range(0, 3), range(3, 6), range(6, 7)]
    for world_size in (2, 3, 4):
        shards = [item_batches(7, 3, rank, world_size) for rank in range(world_size)]
        assert sorted((b for shard in shards for b in shard), key=lambda b: b.start) == one
    assert item_batches(7, 3, 1, 2) == [range(3, 6)] and item_batches(7, 3, 3, 4) == []


def written_files(folder: Path) -> dict[str, bytes]:
    """The images, ``results.json`` and ``results.md`` under ``folder``, by relative path."""
    paths = [*folder.rglob("*.png"), folder / "results.json", folder / "results.md"]
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(paths)}


def test_an_interrupted_evaluation_resumes_with_the_bytes_of_an_uninterrupted_one(
    checkpoint, tmp_path, monkeypatch
):
    """Fixed batches of 2 items: a run stopped in the model's third batch, its index cut while it
    wrote item 3 (items 0-2 and half a line), generates the batches [2, 3] and [4, 5] whole on
    resuming, then the baseline; images and results are those of one uninterrupted run, byte for
    byte (same process and thread count: the same computation)."""
    from lightning_refdpo.evaluation import streaming

    options = ("--batch_size=2", "--save_images=true")
    evaluate(checkpoint, tmp_path / "one", *options)
    original, generated = streaming.generate, []

    def stopped_at_third_batch(pipeline, items, config):
        if len(generated) == 2:
            raise KeyboardInterrupt
        generated.append(list(items))
        return original(pipeline, items, config)

    monkeypatch.setattr(streaming, "generate", stopped_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(checkpoint, tmp_path / "resumed", *options)
    index = next((tmp_path / "resumed" / "runs").iterdir()) / "model" / "index-rank0.jsonl"
    lines = index.read_text().splitlines()
    assert len(lines) == 4
    index.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed while writing item 3

    generated.clear()
    monkeypatch.setattr(
        streaming, "generate", lambda p, items, c: generated.append(list(items)) or original(p, items, c)
    )
    evaluate(checkpoint, tmp_path / "resumed", *options)
    items = [(prompt, seed) for prompt in PROMPTS for seed in (0, 1)]
    assert generated == [items[2:4], items[4:6], items[0:2], items[2:4], items[4:6]], (
        "the model's unfinished batches whole, then every baseline batch"
    )
    one, resumed = written_files(tmp_path / "one"), written_files(tmp_path / "resumed")
    assert len(one) == 2 * 6 + 2 and resumed == one
    with pytest.raises(ValueError, match="holds an evaluation with other settings"):
        evaluate(checkpoint, tmp_path / "resumed", "--batch_size=3", "--save_images=true")


def test_hpdv2_styles_and_their_average_with_bootstrap_intervals():
    rng = np.random.default_rng(0)
    styles = [s for s in ("anime", "concept-art", "paintings", "photo") for _ in range(50)]
    model = {"HPSv2.0": rng.normal(27, 1, 200)}
    baseline = {"HPSv2.0": model["HPSv2.0"] - 0.5 + rng.normal(0, 0.1, 200)}
    entry = summarize(model, baseline, styles, num_bootstrap=500)
    figures = entry["scores"]["HPSv2.0"]
    assert figures["model_ci"][0] < figures["model_mean"] < figures["model_ci"][1]
    assert figures["win_rate"] > 0.9 and figures["win_rate_ci"][1] <= 1.0
    assert list(entry["styles"]) == ["anime", "concept-art", "paintings", "photo"]
    photo = entry["styles"]["photo"]["HPSv2.0"]["model_mean"]
    assert photo == pytest.approx(model["HPSv2.0"][150:].mean())
    means = [entry["styles"][s]["HPSv2.0"]["model_mean"] for s in entry["styles"]]
    assert entry["style_average"]["HPSv2.0"]["model_mean"] == pytest.approx(np.mean(means))
    results = {
        "model": "m",
        "baseline": "b",
        "prompt_sets": {"hpdv2": {"num_prompts": 40, "num_images": 200, **entry}},
    }
    table = results_table(results)
    assert "| average |" in table and f"{figures['model_mean']:.4g} [{figures['model_ci'][0]:.4g}" in table


def peak_image_bytes(checkpoint: str, num_prompts: int, output: Path, monkeypatch) -> int:
    """The most bytes of generated images alive at once while evaluating ``num_prompts`` prompts."""
    from lightning_refdpo.evaluation import streaming

    live, peak = [0], [0]
    original = streaming.generate

    def tracked(pipeline, items, config):
        images = original(pipeline, items, config)
        live[0] += images.nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(images, lambda n=images.nbytes: live.__setitem__(0, live[0] - n))
        return images

    monkeypatch.setattr(streaming, "generate", tracked)
    prompts = [f"prompt {i}" for i in range(num_prompts)]
    evaluate(checkpoint, output, "--seeds=[0]", "--num_inference_steps=1", "--batch_size=8", prompts=prompts)
    return peak[0]


def test_peak_memory_does_not_grow_with_the_number_of_prompts(checkpoint, tmp_path, monkeypatch):
    """Images are generated, scored and dropped a batch at a time: 256 prompts hold no more image
    memory at once than 32 (two batches at most: the one scored and the one being generated)."""
    small = peak_image_bytes(checkpoint, 32, tmp_path / "small", monkeypatch)
    large = peak_image_bytes(checkpoint, 256, tmp_path / "large", monkeypatch)
    assert 0 < large == small <= 2 * 8 * 3 * 32 * 32 * 4


def test_two_processes_give_the_bytes_of_one(checkpoint, tmp_path):
    """Two ranks take the fixed batches [0, 1], [4, 5] and [2, 3] of the items and write the images
    and results of one process, byte for byte. The one process runs on one thread, as ``launch``
    gives each rank: another thread count rounds differently (measured: 2e-6 in a pixel)."""
    from tests.test_distributed import launch

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS))
    common = [
        "evaluate",
        checkpoint,
        "--scorers",
        '[{"class_path": "tests.helpers.Brightness"}]',
        f"--prompt_sets=[{prompt_file}]",
        "--seeds=[0, 1]",
        "--num_inference_steps=2",
        "--resolution=32",
        "--device=cpu",
        "--batch_size=2",
        "--num_bootstrap=200",
        "--save_images=true",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cli([*common, f"--output={tmp_path / 'one'}"])
    finally:
        torch.set_num_threads(threads)
    launch([*common, "--devices=2", f"--output={tmp_path / 'two'}"], 2, tmp_path)
    assert written_files(tmp_path / "two") == written_files(tmp_path / "one")
    runs = next((tmp_path / "two" / "runs").iterdir())
    for side in ("model", "baseline"):
        ranks = [
            sorted(json.loads(line)["item"] for line in (runs / side / f"index-rank{r}.jsonl").open())
            for r in (0, 1)
        ]
        assert ranks == [[0, 1, 4, 5], [2, 3]]
