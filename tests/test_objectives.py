"""The objectives beside Diffusion-DPO (``kto``, ``dspo``, ``dmpo``) and the winner-preserving
safeguard train with the paper's components (``ReferenceModelUpdate``, the discounted sampler,
``reward_scale``) on the tiny SD1.5 and SDXL models, with LoRA and full fine-tuning; each objective
resumes exactly in one of its cases. Diffusion-KTO's EMA reference is ``every_n_steps: 1, alpha < 1``
(full fine-tuning; LoRA refuses it)."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_refdpo import DiscountedTimestepSampler, ReferenceModelUpdate, StableDiffusionXLDPOModule, lora
from lightning_refdpo.model_card import method_description
from lightning_refdpo.testing import save_random_labeled_images
from tests.helpers import fit_tiny, make_batch, make_module


class Case(NamedTuple):
    loss_type: str
    family: str
    lora_rank: int | None
    options: dict
    resume: bool = False
    unpaired: bool = False
    alpha: float = 1.0


CASES = {
    "kto-sd15-full-unpaired-ema": Case(
        "kto", "sd15", None, {"beta": 1000.0, "kto_reference_point": "class_means"}, True, True, 0.25
    ),
    "kto-sdxl-lora": Case("kto", "sdxl", 2, {"beta": 1000.0}),
    "dspo-sd15-lora": Case("dspo", "sd15", 2, {"beta": 0.001}, resume=True),
    "dspo-sdxl-full": Case("dspo", "sdxl", None, {"dspo_form": "sdxl"}),
    "dmpo-sd15-full": Case("dmpo", "sd15", None, {"beta": 2000.0}),
    "dmpo-sdxl-lora": Case("dmpo", "sdxl", 2, {"beta": 6000.0, "dmpo_alpha": 0.01}, resume=True),
    "safeguard-sd15-full": Case("sigmoid", "sd15", None, {"winner_preserving_mu": 0.9}),
    "safeguard-sdxl-lora": Case(
        "dspo", "sdxl", 2, {"dspo_form": "sdxl", "winner_preserving_mu": 0.6}, resume=True
    ),
}


@pytest.fixture(scope="module")
def tiny_labeled(tmp_path_factory) -> dict[str, str]:
    return {
        "train": str(save_random_labeled_images(tmp_path_factory.mktemp("labeled") / "train.parquet", 12))
    }


class StepLosses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


class Run(NamedTuple):
    module: object
    trainer: object
    update: ReferenceModelUpdate
    losses: list[float]


def run(case: Case, model: str, data: dict, max_steps: int, ckpt_path: str | None = None, *callbacks) -> Run:
    torch.manual_seed(0)  # the LoRA adapters' initialisation
    module_class = {"module_class": StableDiffusionXLDPOModule} if case.family == "sdxl" else {}
    module = make_module(
        model,
        loss_type=case.loss_type,
        reward_scale=True,
        lora_rank=case.lora_rank,
        **module_class,
        **case.options,
    )
    update = ReferenceModelUpdate(every_n_steps=1, alpha=case.alpha, max_divergence=1.0)
    losses = StepLosses()
    data_options = {"timestep_sampler": DiscountedTimestepSampler(1000, gamma=0.9), "unpaired": case.unpaired}
    trainer = fit_tiny(
        module,
        data,
        max_steps,
        ckpt_path=ckpt_path,
        callbacks=[update, losses, *callbacks],
        data_options=data_options,
        enable_checkpointing=bool(callbacks),
    )
    return Run(module, trainer, update, losses.values)


def trained_weights(module) -> dict[str, torch.Tensor]:
    """The policy's trained weights and the reference's."""
    policy = (
        lora.adapter_parameters(module.policy, lora.POLICY)
        if module.uses_lora
        else module.policy.state_dict()
    )
    reference = module.reference.reference_parameters(module.policy)
    return {
        **{f"policy.{k}": v for k, v in policy.items()},
        **{f"reference.{k}": v for k, v in reference.items()},
    }


@pytest.mark.parametrize("case", CASES.values(), ids=CASES)
def test_objective_trains_with_the_papers_components(
    case, tiny_model, tiny_sdxl, tiny_data, tiny_labeled, tmp_path
):
    model = tiny_sdxl if case.family == "sdxl" else tiny_model
    data = tiny_labeled if case.unpaired else tiny_data
    whole = run(case, model, data, max_steps=2)
    assert whole.trainer.global_step == 2 and len(whole.losses) == 2
    assert all(torch.isfinite(torch.tensor(whole.losses)))
    assert whole.update.num_updates == 2 and not whole.update.frozen and whole.update.last_divergence != 0
    metrics = whole.trainer.callback_metrics
    assert ("train/loser_scale" in metrics) == ("winner_preserving_mu" in case.options)
    if not case.resume:
        return

    first = run(case, model, data, 1, None, ModelCheckpoint(tmp_path, "step1", every_n_train_steps=1))
    if case.alpha < 1:  # the EMA reference: ref <- (1 - alpha) init + alpha theta after step 1
        module = first.module
        for ref, init, theta in zip(
            module.reference.model.parameters(),
            module.reference.initial_model.parameters(),
            module.policy.parameters(),
            strict=True,
        ):
            torch.testing.assert_close(ref, (1 - case.alpha) * init + case.alpha * theta)
    resumed = run(case, model, data, max_steps=2, ckpt_path=str(tmp_path / "step1.ckpt"))
    assert first.losses + resumed.losses == whole.losses
    assert resumed.update.state_dict() == whole.update.state_dict()
    expected, got = trained_weights(whole.module), trained_weights(resumed.module)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "weights differ after resume"


def test_lora_refuses_the_ema_reference(tiny_model, tiny_data):
    module = make_module(tiny_model, loss_type="kto", lora_rank=2)
    with pytest.raises(ValueError, match="alpha=0.5 is a soft update, which is not exact on LoRA factors"):
        fit_tiny(module, tiny_data, 1, callbacks=[ReferenceModelUpdate(every_n_steps=1, alpha=0.5)])


def test_couples_condition_each_image_on_its_own_caption(tiny_model):
    """A couple whose two captions are equal is the pair; another loser caption changes the
    losers' errors only. A pairwise loss refuses a batch of couples."""
    module = make_module(tiny_model, loss_type="kto")
    pair = make_batch()
    outputs = []
    for captions in (None, pair["caption"], ["another caption", "and another"]):
        batch = pair if captions is None else {**pair, "caption_l": captions}
        torch.manual_seed(0)  # the latent draw z = mean + std * eps
        outputs.append(
            module.preference_step(batch, batch["timesteps"], generator=torch.Generator().manual_seed(0))
        )
    torch.testing.assert_close(outputs[1].mse_l, outputs[0].mse_l)
    torch.testing.assert_close(outputs[2].mse_w, outputs[0].mse_w)
    assert not torch.allclose(outputs[2].mse_l, outputs[0].mse_l)
    assert outputs[0].loss.shape == (4,), "kto: one loss per image"
    module.hparams.loss_type = "sigmoid"
    with pytest.raises(
        ValueError, match="only a per-image loss can train \\(kto\\); model.loss_type is 'sigmoid'"
    ):
        module.preference_step({**pair, "caption_l": pair["caption"]}, pair["timesteps"])


def test_model_card_names_the_objective_and_the_safeguard():
    hparams = {"loss_type": "dspo", "beta": 0.001, "winner_preserving_mu": 0.2, "lora_rank": None}
    assert method_description(hparams, None).startswith(
        "DSPO (direct score preference optimization) (loss `dspo`, beta 0.001) with the winner-preserving "
        "safeguard of Diffusion-SDPO (mu 0.2)."
    )
