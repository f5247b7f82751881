"""Bad input during training: non-finite losses, undecodable images, empty and over-long captions.

Start-up checks (schema, ties, options, model ids) are tested next to their code: test_data.py,
test_module.py, test_reference_update.py, test_timesteps.py, test_cli.py.
"""

import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from lightning_refdpo.guard import NonFiniteLossError, UndecodablePairsError
from tests.data.test_datamodule import solid, write
from tests.helpers import fit_tiny, make_module


def nan_loss_in_batches(module, batches) -> None:
    """Make the loss NaN in the training batches numbered ``batches`` (0-based)."""
    step, calls = module.preference_step, []

    def preference_step(batch, *args, **kwargs):
        per_pair = step(batch, *args, **kwargs)
        if module.training:
            calls.append(len(calls))
            if calls[-1] in batches:
                per_pair.loss = per_pair.loss * float("nan")
        return per_pair

    module.preference_step = preference_step


def test_nonfinite_loss_step_is_skipped_and_counted(tiny_model, tiny_data):
    module = make_module(tiny_model, max_nonfinite_steps=2)
    nan_loss_in_batches(module, {1})
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = fit_tiny(module, tiny_data, max_steps=3)  # a skipped step counts as a step (no update)
    assert (
        trainer.global_step == 3
        and module.guard.nonfinite_steps == 1
        and module.guard.nonfinite_in_a_row == 0
    )
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(v).all() for v in module.policy.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())


def test_nonfinite_losses_in_a_row_stop_with_a_clear_error_and_a_checkpoint(tiny_model, tiny_data, tmp_path):
    module = make_module(tiny_model, max_nonfinite_steps=2)
    nan_loss_in_batches(module, {1, 2})
    with pytest.raises(NonFiniteLossError, match="NaN or infinite in 2 training steps in a row"):
        fit_tiny(
            module,
            tiny_data,
            max_steps=4,
            callbacks=[OnExceptionCheckpoint(tmp_path)],
            enable_checkpointing=True,
        )
    checkpoint = torch.load(tmp_path / "on_exception.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["nonfinite_steps"] == (2, 2)


def test_undecodable_images_are_skipped_counted_and_training_goes_on(tiny_model, tmp_path):
    good = solid("red")
    rows = {
        "caption": ["a", "b", "c", "d"],
        "jpg_0": [good, b"not an image", good, good[: len(good) // 2]],  # corrupt, truncated
        "jpg_1": [solid("blue")] * 4,
        "label_0": [1.0, 0.0, 1.0, 0.0],
    }
    module = make_module(tiny_model)
    with pytest.warns(UserWarning, match="2 of 4 training pairs could not be decoded"):
        trainer = fit_tiny(module, {"train": write(tmp_path, rows)}, max_steps=2, train_batch_size=4)
    assert trainer.global_step == 2  # one batch per epoch, two epochs
    assert trainer.callback_metrics["train/skipped_pairs"] == 2  # the epoch's sum


@pytest.mark.parametrize("num_bad", [3, 4])
def test_more_than_max_skipped_share_undecodable_stops_the_run(tiny_model, tmp_path, num_bad):
    good = solid("red")
    rows = {
        "caption": ["a", "b", "c", "d"],
        "jpg_0": [b"not an image"] * num_bad + [good] * (4 - num_bad),
        "jpg_1": [solid("blue")] * 4,
        "label_0": [1.0, 0.0, 1.0, 0.0],
    }
    with pytest.raises(UndecodablePairsError, match=f"{num_bad} of 4 training pairs could not be decoded"):
        fit_tiny(make_module(tiny_model), {"train": write(tmp_path, rows)}, max_steps=2, train_batch_size=4)


def test_empty_and_over_long_captions_are_truncated_like_the_tokenizer(tiny_model):
    module = make_module(tiny_model)
    long_caption = "a very long caption " * 100
    states = module.backbone.encode_prompts(["", long_caption, long_caption + "with a different end"])
    states = states["encoder_hidden_states"]
    assert (
        states.shape[:2] == (3, module.backbone.tokenizer.model_max_length) and torch.isfinite(states).all()
    )
    torch.testing.assert_close(states[1], states[2])  # only the first model_max_length tokens count
