"""ImplicitRewardByTimestep: the implicit reward and accuracy per timestep interval."""

import json

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
