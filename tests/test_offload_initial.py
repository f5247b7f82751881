"""``offload_initial``: the initial model of full fine-tuning kept in CPU memory, out of the module's
parameters, and brought to the policy's device for update events, validation and the evaluation
baseline, with the same numbers as when it stays beside the policy."""

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_refdpo import ReferenceModelUpdate
from tests.helpers import fit_tiny, make_module, tiny_datamodule, validate_with_evaluation


def initial_storages(module) -> list[int]:
    return [p.data_ptr() for p in module.reference.initial_model.parameters()]


def test_the_offloaded_initial_model_is_not_a_parameter_of_the_module(tiny_model):
    kept, offloaded = (make_module(tiny_model, offload_initial=flag) for flag in (False, True))
    initial = sum(p.numel() for p in offloaded.reference.initial_model.parameters())
    assert (
        sum(p.numel() for p in offloaded.parameters()) == sum(p.numel() for p in kept.parameters()) - initial
    )
    assert not any(k.startswith("reference.initial_model.") for k in offloaded.state_dict())
    assert offloaded.checkpoint_keys() == kept.checkpoint_keys()


def test_the_initial_model_comes_in_for_its_users_and_goes_back(tiny_model):
    """On CPU the move to the device is a no-op; a reference in another dtype than the initial
    model makes ``load_initial`` bring in a converted copy all the same, as it would on a GPU."""
    module = make_module(tiny_model, offload_initial=True, frozen_dtype="bfloat16")
    reference, on_host = module.reference, initial_storages(module)
    reference.model.float()  # the copy brought in follows the reference's dtype
    reference.load_initial(torch.device("cpu"))  # a validation epoch
    with reference.initial(module.policy) as initial:  # an event inside it: nested
        assert all(p.dtype == torch.float32 for p in initial.parameters())
        assert not set(initial_storages(module)) & set(on_host), "a copy was brought in"
    assert next(reference.initial_model.parameters()).dtype == torch.float32, "still in use"
    reference.unload_initial()
    assert initial_storages(module) == on_host, "back to the same CPU weights, not a copy"
    assert next(reference.initial_model.parameters()).dtype == torch.bfloat16


def test_offloading_changes_no_number(tiny_model, tiny_data):
    """Training with update events (the divergence reads the initial model), then validation (the
    margins against it): the same weights, decisions and margins with the initial model offloaded."""
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        module = make_module(tiny_model, offload_initial=offload, frozen_dtype="bfloat16", reward_scale=True)
        callback = ReferenceModelUpdate(every_n_steps=1, max_divergence=None, divergence_samples=2)
        fit_tiny(module, tiny_data, max_steps=2, callbacks=[callback])
        validation = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1)
        validation.validate(module, tiny_datamodule(tiny_data), verbose=False)
        results.append((module, callback.state_dict(), validation.callback_metrics["val/initial_margin"]))
    (kept, kept_state, kept_margin), (offloaded, offloaded_state, offloaded_margin) = results
    assert kept_state == offloaded_state and kept_state["num_updates"] == 2
    torch.testing.assert_close(offloaded_margin, kept_margin, rtol=0, atol=0)
    expected, got = kept.state_dict(), offloaded.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert offloaded.reference._initial_users == 0


def test_the_evaluation_baseline_uses_the_offloaded_initial_model(tiny_model, tiny_data, tmp_path):
    module = make_module(tiny_model, offload_initial=True)
    _, callback = validate_with_evaluation(module, tiny_data, tmp_path)
    assert callback.baseline_scores is not None and module.reference._initial_users == 0


@pytest.mark.parametrize(
    ("kwargs", "sharded", "match"),
    [({"lora_rank": 2}, False, "applies to full fine-tuning"), ({}, True, "FSDPStrategy")],
    ids=["lora", "fsdp"],
)
def test_offload_initial_refused_where_it_cannot_work(tiny_model, kwargs, sharded, match):
    with pytest.raises(ValueError, match=match):
        module = make_module(tiny_model, offload_initial=True, **kwargs)
        module.reference.check_sharding(module.policy, sharded)
