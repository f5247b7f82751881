"""Every shipped config parses with the CLI's own parser, alone or in the compositions the configs'
opening comments and the README give: keys, ``class_path`` entries and their ``init_args`` are
checked against the classes; nothing is instantiated (the models are hub ids)."""

import re
from itertools import takewhile
from pathlib import Path

import pytest

from lightning_refdpo.cli import RefDPOCLI, build_cli
from lightning_refdpo.optim import optimizer_spec

REPO = Path(__file__).parents[1]
CONFIGS = REPO / "configs"
COMMAND = re.compile(r"lightning-refdpo fit((?: --config configs/\S+\.yaml)+)")


def documented_recipes() -> dict[str, list[str]]:
    """The ``--config`` lists of every ``lightning-refdpo fit`` command line in the configs' opening
    comments and the README, by command line."""
    texts = [REPO / "README.md"] + sorted(CONFIGS.rglob("*.yaml"))
    commands = {m.group(1).strip() for path in texts for m in COMMAND.finditer(path.read_text())}
    return {command: re.findall(r"--config (\S+)", command) for command in sorted(commands)}


RECIPES = documented_recipes()


@pytest.fixture
def parse(monkeypatch):
    """``build_cli`` of ``fit`` up to its parsed config: nothing seeded, instantiated or run."""
    for step in ("_set_seed", "instantiate_classes", "_run_subcommand"):
        monkeypatch.setattr(RefDPOCLI, step, lambda self, *args: None)
    return lambda configs: build_cli(["fit", *(f"--config={REPO / c}" for c in configs)]).config.fit


def opening_comment(path: Path) -> str:
    return "\n".join(takewhile(lambda line: line.startswith("#"), path.read_text().splitlines()))


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_says_what_it_is_and_its_command_line(path):
    comment = opening_comment(path)
    assert len(comment.splitlines()) >= 2, "a description and a command line"
    assert any(str(path.relative_to(REPO)) in c for c in COMMAND.findall(comment)), comment


def test_every_config_is_in_a_documented_recipe():
    used = {config for configs in RECIPES.values() for config in configs}
    assert {str(p.relative_to(REPO)) for p in CONFIGS.rglob("*.yaml")} <= used


@pytest.mark.parametrize("configs", RECIPES.values(), ids=RECIPES.keys())
def test_documented_recipe_parses(configs, parse):
    config = parse(configs)
    callbacks = [c.class_path.rsplit(".", 1)[-1] for c in config.trainer.callbacks or []]
    method = any(name.endswith("refdpo.yaml") for name in configs)
    if configs[0].startswith(("configs/sd15/", "configs/sdxl/", "configs/sd3/")):
        expected = ["ModelCheckpoint", "LearningRateMonitor"] + ["ReferenceModelUpdate"] * method
        assert callbacks == expected, "an overlay adds its callback to the base's"
        sampler = config.data.init_args.timestep_sampler.class_path
        baseline = (
            "LogitNormalTimestepSampler"
            if configs[0].startswith("configs/sd3/")
            else "UniformTimestepSampler"
        )
        assert sampler.endswith("DiscountedTimestepSampler" if method else baseline)
        assert config.model.init_args.reward_scale is method


def test_each_family_has_its_cap(parse):
    caps = {}
    for family in ("sd15", "sdxl", "sd3"):
        config = parse([f"configs/{family}/dpo.yaml", f"configs/{family}/refdpo.yaml"])
        caps[family] = config.trainer.callbacks[-1].init_args.max_divergence
    assert caps == {"sd15": 0.005, "sdxl": 0.002, "sd3": 0.002}


TYPOS = {
    "trainer key": ("trainer:\n  max_stepz: 3\n", "max_stepz"),
    "model init_args": ("model:\n  init_args:\n    lora_rnk: 8\n", "lora_rnk"),
    "class_path": (
        "data:\n  init_args:\n    timestep_sampler:\n      class_path: lightning_refdpo.DiscountedTimestepSamplr\n",
        "DiscountedTimestepSamplr",
    ),
    "callback init_args": (
        "trainer:\n  callbacks+:\n    - class_path: lightning_refdpo.callbacks.ReferenceModelUpdate\n"
        "      init_args: {max_divergense: 0.1}\n",
        "max_divergense",
    ),
    "top-level key": ("traner:\n  max_steps: 3\n", "traner"),
}


@pytest.mark.parametrize("overlay, key", TYPOS.values(), ids=TYPOS.keys())
def test_a_typo_in_a_config_is_refused(overlay, key, parse, tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text(overlay)
    with pytest.raises(SystemExit):
        parse(["configs/sd15/dpo.yaml", "configs/sd15/refdpo.yaml", typo])
    assert key in capsys.readouterr().err


ADAFACTOR_OF_THE_AUTHORS = {
    "class_path": "transformers.Adafactor",
    "weight_decay": 1e-2,
    "clip_threshold": 1.0,
    "scale_parameter": False,
    "relative_step": False,
}


FAMILY_RECIPES = {k: v for k, v in RECIPES.items() if v[0].split("/")[1] in ("sd15", "sdxl", "sd3")}


@pytest.mark.parametrize("configs", FAMILY_RECIPES.values(), ids=FAMILY_RECIPES.keys())
def test_each_recipe_names_its_optimizer(configs, parse):
    """SDXL and SD3 full fine-tuning on the Diffusion-DPO authors' Adafactor (their train.py: ``if
    args.use_adafactor or args.sdxl``), SD1.5 and every LoRA overlay on AdamW with the authors'
    AdamW settings; nothing carried over from another class; the module accepts each."""
    model = parse(configs).model.init_args
    optimizer = model.optimizer.as_dict()
    init_args = optimizer["init_args"]
    if model.lora_rank is None and configs[0].split("/")[1] in ("sdxl", "sd3"):
        settings = {k: init_args[k] for k in ADAFACTOR_OF_THE_AUTHORS if k != "class_path"}
        assert {"class_path": optimizer["class_path"], **settings} == ADAFACTOR_OF_THE_AUTHORS
        assert tuple(init_args["eps"]) == (1e-30, 1e-3), "Adafactor's own eps"
    else:
        assert optimizer["class_path"] == "torch.optim.AdamW"
        assert (tuple(init_args["betas"]), init_args["eps"], init_args["weight_decay"]) == (
            (0.9, 0.999),
            1e-8,
            1e-2,
        )
        assert init_args["fused"] is None and init_args["foreach"] is None, "fused on CUDA by default"
    assert model.learning_rate > 0 and "lr" not in init_args
    assert optimizer_spec(optimizer)["init_args"] == init_args
