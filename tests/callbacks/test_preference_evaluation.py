"""PreferenceEvaluation: generation, scores, win rates and image grids against the initial model."""

import pytest
import torch

from lightning_refdpo.callbacks import PreferenceEvaluation
from tests.helpers import Brightness, logged_trainer, make_module, tiny_datamodule

PROMPTS = ["a red cat", "a blue dog"]


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
    run = logged_trainer(tmp_path, [callback])
    run.validate(make_module(tiny_model, **module_kwargs), tiny_datamodule(tiny_data))
    metrics = run.callback_metrics
    assert metrics["eval/Brightness"].item() == pytest.approx(metrics["eval/initial/Brightness"].item())
    assert metrics["eval/Brightness_win_rate"].item() == 0.5, "identical images are ties"
    assert len(callback.items) == 4 and callback.baseline_scores["Brightness"].shape == (4,)
    assert (callback.config.guidance_scale, callback.config.scheduler) == (7.5, "DDIMScheduler")


def test_evaluation_with_a_bfloat16_initial_model_in_32_bit_training(tiny_model, tiny_data, tmp_path):
    """The initial model is generated in the policy's dtype, as the policy; it stays bf16 after."""
    module = make_module(tiny_model, frozen_dtype="bfloat16")
    run = logged_trainer(tmp_path, [evaluation()])
    run.validate(module, tiny_datamodule(tiny_data))
    assert 0.0 <= run.callback_metrics["eval/Brightness_win_rate"].item() <= 1.0
    assert next(module.reference.initial_model.parameters()).dtype == torch.bfloat16


def test_evaluation_during_training_logs_scores_win_rate_and_grid(tiny_model, tiny_data, tmp_path):
    callback = evaluation()
    run = logged_trainer(tmp_path, [callback], max_steps=4, val_check_interval=2)
    module = make_module(tiny_model, learning_rate=0.05)
    run.fit(module, tiny_datamodule(tiny_data))
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
    run = logged_trainer(tmp_path, [callback])
    run.validate(module, tiny_datamodule(tiny_data))
    with torch.no_grad():
        for p in module.policy.parameters():
            p.mul_(1.05)
    metrics = callback.evaluate(run, module)
    policy_scores = callback.scorers["Brightness"].scores()
    expected = ((policy_scores > callback.baseline_scores["Brightness"]).float().mean()).item()
    assert metrics["eval/Brightness_win_rate"] == pytest.approx(expected)
