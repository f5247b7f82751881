"""The toy ablation (``benchmarks/toy_alignment.py``): every variant is a ``configs/demo.yaml`` that the
CLI's parser accepts, with exactly the parts the variant names, and its search draws from its grid."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_configs import parse  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("toy_alignment", REPO / "benchmarks" / "toy_alignment.py")
ALIGNMENT = sys.modules.setdefault(SPEC.name, importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(ALIGNMENT)


@pytest.mark.parametrize("name", list(ALIGNMENT.VARIANTS))
def test_every_variant_is_a_valid_config_with_its_parts(name, parse, tmp_path):  # noqa: F811
    variant = ALIGNMENT.VARIANTS[name]
    hparams = ALIGNMENT.trials(name, 4)
    assert len(hparams) == 4 and len({tuple(h.items()) for h in hparams}) == 4
    assert all(set(h) == set(ALIGNMENT.searched(name)) for h in hparams)
    path = tmp_path / "variant.yaml"
    path.write_text(
        yaml.safe_dump(
            ALIGNMENT.variant_config(
                yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()), name, hparams[0]
            )
        )
    )
    config = parse([path])

    model = config.model.init_args
    assert model.loss_type == variant.loss
    assert model.learning_rate == hparams[0]["learning_rate"]
    assert model.beta == hparams[0].get("beta", model.beta)
    assert all(model[key] == value for key, value in variant.model_options)
    callbacks = {c.class_path.rsplit(".", 1)[-1]: c.init_args for c in config.trainer.callbacks}
    assert "PreferenceEvaluation" not in callbacks
    update = callbacks.get("ReferenceModelUpdate")
    assert (update is not None) == (variant.reference_update is not None)
    if update is not None:
        assert update.every_n_steps == hparams[0]["every_n_steps"]
        assert update.max_divergence == hparams[0].get("max_divergence")
        assert update.on_exceed == ("reinit" if variant.reference_update == "reinit" else "freeze")
    sampler = config.data.init_args.timestep_sampler.class_path.rsplit(".", 1)[-1]
    assert sampler == ("DiscountedTimestepSampler" if variant.timestep_aware else "UniformTimestepSampler")
    assert model.reward_scale == variant.timestep_aware
