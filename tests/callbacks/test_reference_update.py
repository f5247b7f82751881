import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_refdpo import PreferenceDataModule, ReferenceModelUpdate, lora
from tests.helpers import make_module


class RecordReference(Callback):
    """After ReferenceModelUpdate in the callback list: snapshot policy and reference each step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.uses_lora:
            policy = lora.adapter_parameters(pl_module.policy, lora.POLICY)
            reference = lora.adapter_parameters(pl_module.policy, lora.REFERENCE)
        else:
            policy = dict(pl_module.policy.named_parameters())
            reference = dict(pl_module.reference.model.named_parameters())
        self.steps.append(
            {
                "step": trainer.global_step,
                "policy": {k: v.detach().clone() for k, v in policy.items()},
                "reference": {k: v.detach().clone() for k, v in reference.items()},
            }
        )


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def fit(model_path, data, callback, max_steps=6, divergence=None, **module_kwargs):
    record = RecordReference()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[callback, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    module = make_module(model_path, **module_kwargs)
    if divergence is not None:
        module.estimate_divergence = lambda *args, **kwargs: torch.tensor(divergence)
    dm = PreferenceDataModule(
        dataset_name="parquet", data_files=data, resolution=32, num_workers=0, train_batch_size=2
    )
    trainer.fit(module, dm)
    return module, record.steps


@pytest.mark.parametrize("module_kwargs", [{}, {"lora_rank": 2}], ids=["full", "lora"])
def test_reference_equals_policy_after_update_and_is_fixed_between(tiny_model, tiny_data, module_kwargs):
    callback = ReferenceModelUpdate(every_n_steps=2, max_divergence=None)
    _, steps = fit(tiny_model, tiny_data, callback, **module_kwargs)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    for prev, s in zip(steps, steps[1:], strict=False):
        if s["step"] % 2 == 0:
            assert same(s["reference"], s["policy"]), "reference must equal the policy right after an update"
        else:
            assert same(s["reference"], prev["reference"]), "reference must stay fixed between updates"
            assert not same(s["reference"], s["policy"])
    assert callback.num_updates == 3 and not callback.frozen and math.isfinite(callback.last_divergence)


def test_divergence_above_delta_freezes(tiny_model, tiny_data):
    callback = ReferenceModelUpdate(every_n_steps=2, max_divergence=0.005)
    module, steps = fit(tiny_model, tiny_data, callback, divergence=0.0051)
    assert callback.last_divergence == pytest.approx(0.0051) and callback.frozen and callback.num_updates == 0
    initial = {k: v for k, v in module.reference.initial_model.named_parameters()}
    for s in steps:
        assert same(s["reference"], initial), "a frozen reference never moves"
    assert callback.last_event_step == 2


def test_divergence_above_delta_reinits(tiny_model, tiny_data):
    callback = ReferenceModelUpdate(every_n_steps=2, max_divergence=0.005, on_exceed="reinit")
    module, steps = fit(tiny_model, tiny_data, callback, divergence=0.0051, lora_rank=2)
    assert not callback.frozen and callback.num_reinits == 3 and callback.num_updates == 0
    for s in steps:
        assert all(torch.count_nonzero(v) == 0 for k, v in s["reference"].items() if ".lora_B." in k)


def test_soft_update_is_kept_or_undone_by_the_cap(tiny_model, tiny_data):
    kept = ReferenceModelUpdate(every_n_steps=3, alpha=0.5, max_divergence=None)
    _, steps = fit(tiny_model, tiny_data, kept, max_steps=3)
    before, after = steps[1], steps[2]
    for k, ref in after["reference"].items():
        torch.testing.assert_close(ref, 0.5 * before["reference"][k] + 0.5 * after["policy"][k])
    undone = ReferenceModelUpdate(every_n_steps=3, alpha=0.5, max_divergence=0.005)
    _, steps = fit(tiny_model, tiny_data, undone, max_steps=3, divergence=1.0)
    assert undone.frozen and same(steps[2]["reference"], steps[1]["reference"])


def test_divergence_at_delta_updates(tiny_model, tiny_data):
    callback = ReferenceModelUpdate(every_n_steps=2, max_divergence=0.005)
    fit(tiny_model, tiny_data, callback, divergence=0.005)
    assert callback.num_updates == 3 and not callback.frozen


def test_lora_soft_update_refused_at_setup(tiny_model, tiny_data):
    with pytest.raises(ValueError, match="alpha=0.5 is a soft update"):
        fit(tiny_model, tiny_data, ReferenceModelUpdate(alpha=0.5), lora_rank=2)


def test_state_round_trip():
    callback = ReferenceModelUpdate(seed=3)
    callback.num_updates, callback.frozen, callback.last_divergence, callback.last_event_step = (
        4,
        True,
        0.01,
        128,
    )
    restored = ReferenceModelUpdate()
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == callback.state_dict()


def event_trainer(step: int = 0, rank: int = 0) -> SimpleNamespace:
    """What an update event reads of the trainer, for one process."""
    return SimpleNamespace(
        global_step=step, global_rank=rank, strategy=SimpleNamespace(reduce=lambda x, **_: x)
    )


def test_bf16_reference_measures_zero_divergence_before_training(tiny_model, tiny_data):
    # The shipped full fine-tuning settings: frozen copies in bf16, an fp32 policy.
    module = make_module(tiny_model, frozen_dtype="bfloat16")
    batch = next(iter(training_loader(tiny_data)))
    callback = ReferenceModelUpdate(every_n_steps=1, max_divergence=0.002, divergence_samples=4)
    callback.update(event_trainer(), module, batch)
    assert abs(callback.last_divergence) < 1e-6 and callback.num_updates == 1 and not callback.frozen
    policy_vs_initial = module.estimate_divergence(
        batch, 4, "policy", generator=torch.Generator().manual_seed(0)
    )
    assert abs(float(policy_vs_initial)) > 1e-6, (
        "across precisions the gap is not 0 (what the callback avoids)"
    )


def test_divergence_draws_follow_the_pair_not_the_rank(tiny_model, tiny_data):
    batch = next(iter(training_loader(tiny_data)))
    callback = ReferenceModelUpdate(seed=1)
    seeds = callback.sample_seeds(event_trainer(step=4), batch, 2)
    assert len(set(seeds)) == 2, "each winner draws its own t and noise"
    assert callback.sample_seeds(event_trainer(step=4, rank=1), batch, 2) == seeds
    assert callback.sample_seeds(event_trainer(step=8), batch, 2) != seeds
    no_pair_seeds = {k: v for k, v in batch.items() if k != "noise_seeds"}
    rank0, rank1 = (callback.sample_seeds(event_trainer(step=4, rank=r), no_pair_seeds, 2) for r in (0, 1))
    assert set(rank0).isdisjoint(rank1), "without pair seeds, ranks still draw differently"


def test_soft_update_of_a_16_bit_reference_refused(tiny_model, tiny_data):
    with pytest.raises(ValueError, match="16-bit rounding"):
        fit(tiny_model, tiny_data, ReferenceModelUpdate(alpha=0.5), frozen_dtype="bfloat16")


def training_loader(data):
    dm = PreferenceDataModule(
        dataset_name="parquet", data_files=data, resolution=32, num_workers=0, train_batch_size=4
    )
    dm.setup("fit")
    return dm.train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": -1}, "every_n_steps"),
        ({"alpha": 0.0}, "alpha"),
        ({"max_divergence": -0.1}, "max_divergence"),
        ({"max_divergence": math.nan}, "max_divergence"),
        ({"max_divergence": math.inf}, "max_divergence"),
        ({"on_exceed": "stop"}, "on_exceed"),
        ({"divergence_samples": 0}, "divergence_samples"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReferenceModelUpdate(**kwargs)


HARD_COPY_LAYOUTS = {
    "full-fp32": {},
    "full-bf16": {"frozen_dtype": "bfloat16"},
    "lora": {"lora_rank": 2},
}


def moved_policy(module_kwargs: dict, tiny_model: str):
    """A module whose policy has moved away from its reference (as after some training)."""
    module = make_module(tiny_model, **module_kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 1e-2)
    return module


def reference_weights(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.reference.reference_parameters(module.policy).items()}


@pytest.mark.parametrize("module_kwargs", HARD_COPY_LAYOUTS.values(), ids=HARD_COPY_LAYOUTS.keys())
def test_hard_copy_is_measured_on_the_policy_as_the_copy_would_be(tiny_model, tiny_data, module_kwargs):
    """``D`` of the hard-copy candidate measured without touching the reference equals ``D``
    measured after copying it into the reference (the previous path), and the reference is as
    before, down to its storages."""
    module = moved_policy(module_kwargs, tiny_model)
    batch = next(iter(training_loader(tiny_data)))
    before = reference_weights(module)
    storages = [t.data_ptr() for t in module.reference.reference_parameters(module.policy).values()]
    seeds = [11, 12, 13, 14]
    measured = module.estimate_divergence(batch, 4, "hard_copy", sample_seeds=seeds)
    after = module.reference.reference_parameters(module.policy)
    assert all(torch.equal(before[k], after[k]) for k in before), "measuring changed the reference"
    assert [t.data_ptr() for t in after.values()] == storages
    module.reference.update(module.policy, 1.0)
    copied = module.estimate_divergence(batch, 4, "reference", sample_seeds=seeds)
    torch.testing.assert_close(measured, copied, rtol=1e-6, atol=1e-9)
    assert abs(float(measured)) > 1e-7, "the policy has moved from the initial model"


@pytest.mark.parametrize("module_kwargs", HARD_COPY_LAYOUTS.values(), ids=HARD_COPY_LAYOUTS.keys())
@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "refused"])
def test_a_hard_copy_event_takes_no_cpu_copy(tiny_model, tiny_data, module_kwargs, accepted):
    module = moved_policy(module_kwargs, tiny_model)

    def no_cpu_copy(policy):
        raise AssertionError("a hard-copy event copied the reference to CPU memory")

    module.reference.state = no_cpu_copy
    batch = next(iter(training_loader(tiny_data)))
    before = reference_weights(module)
    callback = ReferenceModelUpdate(every_n_steps=1, max_divergence=1.0, divergence_samples=2)
    if not accepted:
        callback.max_divergence = -1.0  # below any divergence (|D| ~ 1e-3 here): refused
    callback.update(event_trainer(), module, batch)
    after = module.reference.reference_parameters(module.policy)
    if accepted:
        assert callback.num_updates == 1 and not callback.frozen
        if module.uses_lora:
            policy = lora.adapter_parameters(module.policy, lora.POLICY)
        else:
            policy = {k: v.to(after[k].dtype) for k, v in module.policy.state_dict().items()}
        assert all(torch.equal(after[k], policy[k]) for k in after), "the reference is the copied policy"
    else:
        assert callback.num_updates == 0 and callback.frozen
        assert all(torch.equal(before[k], after[k]) for k in before), (
            "a refused candidate leaves it as it was"
        )
