import json

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_refdpo import PreferenceDataModule
from lightning_refdpo.callbacks import ImplicitRewardByTimestep, PreferenceEvaluation
from lightning_refdpo.cli import run_cli
from lightning_refdpo.evaluation import image_grid, results_table
from lightning_refdpo.prompts import load_prompts
from tests.helpers import Brightness, make_module

PROMPTS = ["a red cat", "a blue dog"]


def trainer(tmp_path, callbacks, **kwargs):
    return Trainer(
        accelerator="cpu",
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        **kwargs,
    )


def datamodule(tiny_data):
    return PreferenceDataModule(
        dataset_name="parquet",
        data_files=tiny_data,
        resolution=32,
        num_workers=0,
        train_batch_size=2,
        val_batch_size=2,
    )


def evaluation(**kwargs):
    return PreferenceEvaluation(
        prompts=PROMPTS,
        scorers=[Brightness()],
        seeds=[0, 1],
        num_inference_steps=2,
        resolution=32,
        grid_size=4,
        **kwargs,
    )


@pytest.mark.parametrize("module_kwargs", [{}, {"lora_rank": 2}], ids=["full", "lora"])
def test_evaluation_before_training_ties_with_initial_model(tiny_model, tiny_data, tmp_path, module_kwargs):
    callback = evaluation()
    run = trainer(tmp_path, [callback])
    run.validate(make_module(tiny_model, **module_kwargs), datamodule(tiny_data))
    metrics = run.callback_metrics
    assert metrics["eval/Brightness"].item() == pytest.approx(metrics["eval/initial/Brightness"].item())
    assert metrics["eval/Brightness_win_rate"].item() == 0.5, "identical images are ties"
    assert len(callback.items) == 4 and callback.baseline_scores["Brightness"].shape == (4,)
    assert (callback.config.guidance_scale, callback.config.scheduler) == (7.5, "DDIMScheduler")


def test_evaluation_with_a_bfloat16_initial_model_in_32_bit_training(tiny_model, tiny_data, tmp_path):
    """The initial model is generated in the policy's dtype, as the policy; it stays bf16 after."""
    module = make_module(tiny_model, frozen_dtype="bfloat16")
    run = trainer(tmp_path, [evaluation()])
    run.validate(module, datamodule(tiny_data))
    assert 0.0 <= run.callback_metrics["eval/Brightness_win_rate"].item() <= 1.0
    assert next(module.reference.initial_model.parameters()).dtype == torch.bfloat16


def test_evaluation_during_training_logs_scores_win_rate_and_grid(tiny_model, tiny_data, tmp_path):
    callback = evaluation()
    run = trainer(tmp_path, [callback], max_steps=4, val_check_interval=2)
    module = make_module(tiny_model, learning_rate=0.05)
    run.fit(module, datamodule(tiny_data))
    baseline = callback.baseline_scores["Brightness"].clone()
    metrics = run.callback_metrics
    for key in ("eval/Brightness", "eval/Brightness_win_rate", "eval/initial/Brightness"):
        assert key in metrics
    assert metrics["eval/initial/Brightness"].item() == pytest.approx(baseline.mean().item())
    assert metrics["eval/Brightness"].item() != pytest.approx(baseline.mean().item()), (
        "training at lr 0.05 changes the images"
    )
    assert callback.last_step == 4
    grids = sorted((tmp_path / "lightning_logs" / "version_0" / "images").glob("*.png"))
    assert [g.name for g in grids] == ["eval_policy_vs_initial_step2.png", "eval_policy_vs_initial_step4.png"]
    assert torch.equal(callback.state_dict()["baseline_scores"]["Brightness"], baseline)


def test_win_rate_matches_scores(tiny_model, tiny_data, tmp_path):
    callback = evaluation()
    module = make_module(tiny_model)
    run = trainer(tmp_path, [callback])
    run.validate(module, datamodule(tiny_data))
    with torch.no_grad():
        for p in module.policy.parameters():
            p.mul_(1.05)
    metrics = callback.evaluate(run, module)
    policy_scores = callback.scorers["Brightness"].scores()
    expected = ((policy_scores > callback.baseline_scores["Brightness"]).float().mean()).item()
    assert metrics["eval/Brightness_win_rate"] == pytest.approx(expected)


def test_implicit_reward_by_timestep(tiny_model, tiny_data, tmp_path):
    callback = ImplicitRewardByTimestep(num_intervals=10)
    run = trainer(tmp_path, [callback], max_steps=2, val_check_interval=2)
    run.fit(make_module(tiny_model, learning_rate=0.01), datamodule(tiny_data))
    folder = tmp_path / "lightning_logs" / "version_0" / "implicit_reward"
    table = json.loads((folder / "step2.json").read_text())
    assert table["intervals"][0] == [0, 100] and table["intervals"][-1] == [900, 1000]
    assert len(table["mean_implicit_reward"]) == 10 and all(0 <= a <= 1 for a in table["implicit_accuracy"])
    assert any(r != 0 for r in table["mean_implicit_reward"]), (
        "after training the policy differs from the reference"
    )
    assert (folder / "step2.png").stat().st_size > 0
    assert "implicit_acc/t900-1000" in run.callback_metrics


def test_image_grid_layout():
    grid = image_grid(torch.rand(6, 3, 32, 32), [f"prompt {i}" for i in range(6)], columns=3)
    assert grid.size == (96, 2 * (32 + 28))


def test_prompt_files_and_unknown_names(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\na cat\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "x"}, "y", {"caption": "z"}]))
    assert load_prompts(str(tmp_path / "p.json"), limit=2) == ["x", "y"]
    with pytest.raises(ValueError, match="pickapic_v2_test, partiprompts, hpdv2"):
        load_prompts("drawbench")


def test_evaluate_command_writes_json_and_table(tiny_model, tiny_data, tmp_path):
    cli = run_cli(
        [
            "fit",
            "--config=configs/tiny.yaml",
            f"--model.init_args.pretrained_model_name_or_path={tiny_model}",
            f"--data.init_args.data_files={json.dumps(tiny_data)}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=4",
        ]
    )
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    results = run_cli(
        [
            "evaluate",
            ckpt,
            "--scorers",
            '[{"class_path": "tests.helpers.Brightness"}]',
            f"--prompt_sets=[{tmp_path / 'prompts.txt'}]",
            "--seeds=[0, 1]",
            "--num_inference_steps=2",
            "--resolution=32",
            "--device=cpu",
            f"--output={tmp_path / 'eval'}",
        ]
    ).result
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    entry = written["prompt_sets"][str(tmp_path / "prompts.txt")]
    assert entry["num_images"] == 4 and set(entry["scores"]["Brightness"]) == {
        "model_mean",
        "model_ci",
        "baseline_mean",
        "baseline_ci",
        "win_rate",
        "win_rate_ci",
    }
    assert written == json.loads(json.dumps(results))
    table = (tmp_path / "eval" / "results.md").read_text()
    assert table == results_table(written) and "| win rate vs baseline |" in table
