"""The cache and every speed switch give the same results as the plain path, within tolerance."""

import json

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_refdpo import PreferenceDataModule
from lightning_refdpo.cli import run_cli
from lightning_refdpo.data.latent_cache import CachedPreferenceCollator
from tests.helpers import assert_same_step, cache_pairs, make_batch, make_module


def losses(module, batch, seed=0):
    torch.manual_seed(seed)
    return module.preference_step(batch, batch["timesteps"], generator=torch.Generator().manual_seed(seed))


def test_cached_and_uncached_training_give_the_same_loss(tiny_model, tiny_data, tmp_path):
    module = make_module(tiny_model, reward_scale=True)
    pairs = cache_pairs(module, tiny_data, tmp_path / "cache")
    assert pairs.num_cached == pairs.num_loaded
    assert pairs.cached["caption"] == pairs.uncached["caption"]
    assert_same_step(module, pairs.uncached, pairs.cached, torch.tensor([10, 500, 990]))


def test_cached_caption_dropout_uses_the_empty_prompt(tiny_model, tmp_path):
    empty = torch.full((4, 8), 7.0)
    rows = [
        {
            "caption": "x",
            "encoder_hidden_states": torch.zeros(4, 8),
            **{
                k: torch.zeros(4, 2, 2)
                for k in ("latents_mean_w", "latents_std_w", "latents_mean_l", "latents_std_l")
            },
        }
    ] * 2
    batch = CachedPreferenceCollator({"encoder_hidden_states": empty})(
        [{**row, "drop_caption": True} for row in rows]
    )
    assert batch["caption"] == ["", ""] and torch.equal(batch["encoder_hidden_states"][1], empty)


def test_cache_command_then_fit_from_cache(tiny_model, tiny_data, tmp_path):
    common = [
        "--config=configs/tiny.yaml",
        f"--model.init_args.pretrained_model_name_or_path={tiny_model}",
        f"--data.init_args.data_files={json.dumps(tiny_data)}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    path = run_cli(["cache", *common, f"--output={tmp_path / 'cache'}"]).result
    cli = run_cli(["fit", *common, f"--data.init_args.latent_cache={path}", "--trainer.max_steps=4"])
    assert cli.trainer.global_step == 4 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_missing_cache_split_is_a_clear_error(tmp_path):
    dm = PreferenceDataModule(latent_cache=str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError, match="lightning-refdpo cache"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "switch",
    [
        {"gradient_checkpointing": True},
        {"channels_last": True},
        {"attention": "eager"},
        {"lora_rank": 2, "gradient_checkpointing": True},
    ],
    ids=["checkpointing", "channels_last", "eager_attention", "lora_checkpointing"],
)
def test_speed_switches_keep_loss_and_gradients(tiny_model, switch):
    base_kwargs = {"lora_rank": switch["lora_rank"]} if "lora_rank" in switch else {}
    torch.manual_seed(0)  # the same random LoRA A factors in both modules
    reference = make_module(tiny_model, **base_kwargs)
    torch.manual_seed(0)
    switched = make_module(tiny_model, **switch)
    batch = make_batch()
    grads = []
    for module in (reference, switched):
        module.train()
        loss = losses(module, batch).loss.mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.requires_grad]))
    torch.testing.assert_close(
        losses(reference, batch).mse_w, losses(switched, batch).mse_w, rtol=1e-4, atol=1e-6
    )
    assert (grads[0] - grads[1]).norm() <= 1e-4 * grads[0].norm()


def test_bf16_mixed_precision_matches_fp32(tiny_model, tiny_data):
    results = []
    for precision in ("32-true", "bf16-mixed"):
        trainer = Trainer(
            accelerator="cpu",
            precision=precision,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = make_module(tiny_model)
        dm = PreferenceDataModule(
            dataset_name="parquet", data_files=tiny_data, resolution=32, num_workers=0, val_batch_size=4
        )
        results.append(trainer.validate(module, dm, verbose=False)[0])
    assert results[1]["val/mse_w"] == pytest.approx(results[0]["val/mse_w"], rel=2e-2)


def test_compile_unet_matches_eager(tiny_model):
    pytest.importorskip("torch._inductor")
    compiled = make_module(tiny_model, compile_unet=True)
    batch = make_batch()
    try:
        out = losses(compiled, batch)
    except Exception as err:  # noqa: BLE001 - the reason is reported, as the README says
        pytest.skip(f"torch.compile does not run on this CPU: {type(err).__name__}: {str(err)[:200]}")
    torch.testing.assert_close(out.mse_w, losses(make_module(tiny_model), batch).mse_w, rtol=1e-4, atol=1e-6)
