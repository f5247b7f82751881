"""ImplicitRewardByTimestep: the implicit reward and accuracy per timestep interval."""

import json
from types import SimpleNamespace

from lightning_refdpo.callbacks import ImplicitRewardByTimestep
from tests.helpers import logged_trainer, make_module, tiny_datamodule


def test_implicit_reward_by_timestep(tiny_model, tiny_data, tmp_path):
    callback = ImplicitRewardByTimestep(num_intervals=10)
    run = logged_trainer(tmp_path, [callback], max_steps=2, val_check_interval=2)
    run.fit(make_module(tiny_model, learning_rate=0.01), tiny_datamodule(tiny_data))
    folder = tmp_path / "lightning_logs" / "version_0" / "implicit_reward"
    table = json.loads((folder / "step2.json").read_text())
    assert table["intervals"][0] == [0, 100] and table["intervals"][-1] == [900, 1000]
    assert len(table["mean_implicit_reward"]) == 10 and all(0 <= a <= 1 for a in table["implicit_accuracy"])
    assert any(r != 0 for r in table["mean_implicit_reward"]), (
        "after training the policy differs from the reference"
    )
    assert (folder / "step2.png").stat().st_size > 0
    assert "implicit_acc/t900-1000" in run.callback_metrics


def test_every_n_steps_and_max_batches_bound_the_analyses(tiny_model, tiny_data, tmp_path):
    callback = ImplicitRewardByTimestep(num_intervals=2, every_n_steps=4, max_batches=1)
    run = logged_trainer(tmp_path, [callback], max_steps=6, val_check_interval=2, limit_val_batches=2)
    run.fit(make_module(tiny_model, learning_rate=0.01), tiny_datamodule(tiny_data))
    folder = tmp_path / "lightning_logs" / "version_0" / "implicit_reward"
    assert sorted(p.name for p in folder.glob("*.json")) == ["step2.json", "step6.json"], (
        "validations at steps 2, 4 and 6; step 4 is within 4 steps of step 2"
    )
    assert callback.count.tolist() == [2.0, 2.0], "one validation batch of 2 pairs per interval"

    resumed = ImplicitRewardByTimestep(every_n_steps=4)
    resumed.load_state_dict(callback.state_dict())
    resumed.on_validation_epoch_start(SimpleNamespace(global_step=8, sanity_checking=False), None)
    assert not resumed.active, "a resumed run counts from the last analysis before the checkpoint"
