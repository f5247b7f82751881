import os

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lightning_refdpo import DiffusionDPOModule, lora
from lightning_refdpo.batch import PreferenceStepOutput
from lightning_refdpo.hub import ModelLoadError, absolute_if_local
from lightning_refdpo.losses import LOSS_TYPES, LOSSES
from tests.helpers import make_batch, make_module


def merged_unet_state(module, adapter: str) -> dict[str, torch.Tensor]:
    """The full UNet weights W + scale * B @ A of one LoRA adapter, in the plain UNet's key layout."""
    unet = module.policy
    state = {}
    for name, sub in unet.named_modules():
        if isinstance(sub, LoraLayer):
            state[f"{name}.weight"] = sub.base_layer.weight + sub.get_delta_weight(adapter)
            if sub.base_layer.bias is not None:
                state[f"{name}.bias"] = sub.base_layer.bias
    for key, value in unet.state_dict().items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        state.setdefault(plain, value)
    return state


def randomize_adapter(module, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(module.policy, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_reference_adapter_and_full_copy_give_the_same_loss(tiny_model):
    lora_module = make_module(tiny_model, lora_rank=4, reward_scale=True)
    randomize_adapter(lora_module, lora.POLICY, 1)
    randomize_adapter(lora_module, lora.REFERENCE, 2)
    full_module = make_module(tiny_model, reward_scale=True)
    full_module.policy.load_state_dict(merged_unet_state(lora_module, lora.POLICY))
    full_module.reference.model.load_state_dict(merged_unet_state(lora_module, lora.REFERENCE))

    batch = make_batch()
    torch.manual_seed(0)
    out_lora = lora_module.preference_step(
        batch, batch["timesteps"], generator=torch.Generator().manual_seed(5)
    )
    torch.manual_seed(0)
    out_full = full_module.preference_step(
        batch, batch["timesteps"], generator=torch.Generator().manual_seed(5)
    )
    for key in ("mse_w", "mse_l", "ref_mse_w", "ref_mse_l", "reward_margin"):
        torch.testing.assert_close(getattr(out_lora, key), getattr(out_full, key), rtol=1e-4, atol=1e-6)
    # beta = 5000 magnifies the float32 rounding of W + BA against x W + (x A) B.
    torch.testing.assert_close(out_lora.loss, out_full.loss, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(out_lora.ref_mse_w, out_lora.mse_w)


def test_lora_initial_model_is_adapters_disabled(tiny_model):
    module = make_module(tiny_model, lora_rank=4)
    randomize_adapter(module, lora.POLICY, 1)
    full = make_module(tiny_model)
    batch = make_batch()
    torch.manual_seed(0)
    d_lora = module.estimate_divergence(batch, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    full.policy.load_state_dict(merged_unet_state(module, lora.POLICY))
    d_full = full.estimate_divergence(batch, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(d_lora, d_full, rtol=1e-4, atol=1e-6)
    assert d_lora != 0


def test_only_the_policy_adapter_trains_and_flags_survive_adapter_switches(tiny_model):
    module = make_module(tiny_model, lora_rank=4)
    trainable = {k for k, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in k for k in trainable)
    batch = make_batch()
    out = module.preference_step(batch, batch["timesteps"])
    out.loss.mean().backward()
    module.estimate_divergence(batch, 2)
    assert {k for k, p in module.named_parameters() if p.requires_grad} == trainable
    grads = [p.grad for k, p in module.named_parameters() if k in trainable]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for k, p in module.named_parameters() if ".reference." in k)


def test_full_finetuning_copies_are_frozen_and_independent(tiny_model):
    module = make_module(tiny_model)
    assert not any(p.requires_grad for p in module.reference.model.parameters())
    assert not any(p.requires_grad for p in module.reference.initial_model.parameters())
    for a, b in zip(module.policy.parameters(), module.reference.model.parameters(), strict=True):
        assert a.data_ptr() != b.data_ptr()
    module.train()
    assert module.policy.training and not module.reference.model.training and not module.backbone.vae.training


def test_at_start_policy_equals_reference_so_margin_is_zero(tiny_model):
    for kwargs in ({}, {"lora_rank": 2}):
        module = make_module(tiny_model, **kwargs)
        out = module.preference_step(make_batch(), make_batch()["timesteps"]).summary()
        assert out["reward_margin"].item() == pytest.approx(0.0, abs=1e-7)
        assert out["loss"].item() == pytest.approx(0.6931, abs=1e-3)


def test_v_prediction_target(tiny_v_model):
    module = make_module(tiny_v_model)
    assert module.backbone.prediction_type == "v_prediction"
    latents, noise, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    torch.testing.assert_close(
        module.backbone.diffusion_target(latents, noise, t),
        module.backbone.noise_scheduler.get_velocity(latents, noise, t),
    )
    out = module.preference_step(make_batch(), make_batch()["timesteps"])
    assert torch.isfinite(out.loss).all()


def test_reward_scale_is_applied(tiny_model):
    module = make_module(tiny_model, reward_scale=True)
    assert module.reward_scales[0].item() == pytest.approx(1.0) and module.reward_scales[
        -1
    ].item() == pytest.approx(2.0)


def test_subclass_overrides_prediction_error(tiny_model):
    class L1DPO(DiffusionDPOModule):
        def prediction_error(self, model_pred, target):
            return (model_pred - target).abs().mean(dim=(1, 2, 3))

    module = L1DPO(pretrained_model_name_or_path=tiny_model, scale_lr=False)
    batch = make_batch()
    torch.manual_seed(0)
    out = module.preference_step(batch, batch["timesteps"], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = make_module(tiny_model).preference_step(
        batch, batch["timesteps"], generator=torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(out.mse_w, base.mse_w)


def test_reference_update_and_reset(tiny_model):
    for kwargs in ({}, {"lora_rank": 2}):
        module = make_module(tiny_model, **kwargs)
        if module.uses_lora:
            randomize_adapter(module, lora.POLICY, 3)
        else:
            with torch.no_grad():
                for p in module.policy.parameters():
                    p.add_(0.01)
        batch = make_batch()
        module.reference.update(module.policy)
        torch.manual_seed(0)
        out = module.preference_step(batch, batch["timesteps"], generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.ref_mse_w, out.mse_w)
        module.reference.reset(module.policy)
        d_ref = module.estimate_divergence(
            batch, 2, candidate="reference", generator=torch.Generator().manual_seed(0)
        )
        assert d_ref.item() == pytest.approx(0.0, abs=1e-7)


def test_soft_update_refused_with_lora_and_exact_for_full(tiny_model):
    with pytest.raises(ValueError, match="not exact on LoRA factors"):
        lora_module = make_module(tiny_model, lora_rank=2)
        lora_module.reference.update(lora_module.policy, alpha=0.5)
    module = make_module(tiny_model)
    before = [p.clone() for p in module.reference.model.parameters()]
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(1.0)
    module.reference.update(module.policy, alpha=0.25)
    for ref, old, policy in zip(
        module.reference.model.parameters(), before, module.policy.parameters(), strict=True
    ):
        torch.testing.assert_close(ref, 0.75 * old + 0.25 * policy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "orpo"}, "model.loss_type"),
        ({"dspo_form": "sd3"}, "model.dspo_form"),
        ({"winner_preserving_mu": 1.5}, "model.winner_preserving_mu must be in \\[0, 1\\]"),
        (
            {"loss_type": "kto", "winner_preserving_mu": 0.5},
            "model.winner_preserving_mu scales the loser branch",
        ),
        ({"beta": 0.0}, "model.beta"),
        ({"lora_rank": 0}, "model.lora_rank"),
        ({"frozen_dtype": "int8"}, "model.frozen_dtype"),
        ({"label_smoothing": 0.6}, "model.label_smoothing"),
        ({"beta": float("nan")}, "model.beta must be a finite number"),
        ({"beta": float("inf")}, "model.beta must be a finite number"),
        ({"learning_rate": float("nan")}, "model.learning_rate must be a finite number"),
        ({"max_skipped_share": 1.5}, "model.max_skipped_share"),
    ],
)
def test_bad_config_refused_before_loading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionDPOModule(pretrained_model_name_or_path="/does/not/exist", **kwargs)


def test_unloadable_model_id_is_one_clear_error():
    with pytest.raises(ModelLoadError, match="could not load DDPMScheduler from 'nobody/no-such-model'"):
        DiffusionDPOModule(pretrained_model_name_or_path="nobody/no-such-model")


def test_missing_tokenizer_files_are_refused(tmp_path):
    from transformers import CLIPTokenizer

    from lightning_refdpo.hub import load_component

    with pytest.raises(ModelLoadError, match="no vocabulary files"):
        load_component(CLIPTokenizer, str(tmp_path), "tokenizer")


def test_lora_dropout_stays_out_of_the_reference_and_initial_forwards(tiny_model):
    module = make_module(tiny_model, lora_rank=2, lora_dropout=0.5)
    randomize_adapter(module, lora.POLICY, seed=1)
    module.reference.update(module.policy, 1.0)
    module.train()
    batch, t = make_batch(), make_batch()["timesteps"]
    latents, _, cond = module.backbone.encode_batch(batch)
    with torch.no_grad():
        policy = [module.backbone.predict(module.policy, latents, t, cond) for _ in range(2)]
        assert (policy[0] - policy[1]).abs().max() > 0, "dropout still acts in the policy forward"
        for model in (module.reference.reference, module.reference.initial):
            with model(module.policy) as unet:
                twice = [module.backbone.predict(unet, latents, t, cond) for _ in range(2)]
            torch.testing.assert_close(twice[0], twice[1], rtol=0, atol=0)
    module.eval()
    out = module.preference_step(batch, t)
    assert out.reward_margin.abs().max() == 0, "right after a hard copy, h = 0 exactly in eval"


def test_ties_count_half_and_validation_reports_the_margin_against_the_initial_model(tiny_model):
    zeros = torch.zeros(4)
    figures = PreferenceStepOutput(
        zeros,
        zeros,
        zeros,
        torch.tensor([0.0, 0.0, 1.0, -1.0]),
        initial_margin=torch.tensor([1.0, 1.0, 0, 1]),
    ).summary()
    assert figures["implicit_acc"] == pytest.approx(0.5) and figures["implicit_acc_initial"] == pytest.approx(
        0.875
    )
    module = make_module(tiny_model, lora_rank=2)
    randomize_adapter(module, lora.POLICY, seed=2)
    module.reference.update(module.policy, 1.0)
    out = module.preference_step(make_batch(), make_batch()["timesteps"], against_initial=True).summary()
    assert out["implicit_acc"] == 0.5, "a fresh copy ties on every pair: a coin flip, not 0"
    assert out["initial_margin"] != 0, "against the initial model the policy's margin is not a tie"


def test_local_model_folder_is_stored_as_an_absolute_path(tiny_model, monkeypatch):
    parent, name = os.path.split(tiny_model)
    monkeypatch.chdir(parent)
    module = make_module(name, vae_name_or_path=f"{name}/vae")
    assert module.hparams.pretrained_model_name_or_path == tiny_model
    assert module.hparams.vae_name_or_path == f"{tiny_model}/vae"
    assert absolute_if_local("owner/hub-model") == "owner/hub-model"


def test_zero_terminal_snr_scheduler_gives_a_finite_reward_scale_and_loss(tiny_model):
    from diffusers import DDPMScheduler

    module = make_module(tiny_model, reward_scale=True)
    options = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    plain = module.backbone.reward_scale_schedule()
    module.backbone.noise_scheduler = DDPMScheduler(**options, rescale_betas_zero_snr=True)
    module.reward_scales = module.backbone.reward_scale_schedule()
    lam = module.reward_scales
    assert torch.isfinite(lam).all() and lam[0] == pytest.approx(1.0) and lam[-1] == pytest.approx(2.0)
    assert torch.all(lam[1:] >= lam[:-1]) and (lam > 1.1).float().mean() > 0.4, "not 1 almost everywhere"
    torch.testing.assert_close(lam[:500], plain[:500], rtol=0.2, atol=0.0)
    out = module.preference_step(make_batch(), torch.tensor([999, 0]))
    assert torch.isfinite(out.loss).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_only_a_loss_that_needs_the_reference_runs_its_forward(tiny_model, loss_type):
    module = make_module(tiny_model, loss_type=loss_type)
    forwards = []
    predict = module.backbone.predict
    module.backbone.predict = lambda denoiser, *args: forwards.append(denoiser) or predict(denoiser, *args)
    batch = make_batch()
    out = module.preference_step(batch, batch["timesteps"])
    reference = [module.reference.model] if LOSSES[loss_type].needs_reference else []
    assert forwards == [module.policy, *reference]
    assert (out.reward_margin is None) == (loss_type == "sft") and torch.isfinite(out.loss).all()
