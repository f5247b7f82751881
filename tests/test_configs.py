"""Every shipped config parses with the CLI's own parser, alone or in the compositions the configs'
opening comments and the README give: keys, ``class_path`` entries and their ``init_args`` are
checked against the classes; nothing is instantiated (the models are hub ids). The evaluation
overlays cost what they state, and need open_clip (the ``hpsv2`` extra) only to run."""

import math
import re
import shutil
import sys
from itertools import takewhile
from pathlib import Path

import pytest
import yaml

from lightning_refdpo.cli import RefDPOCLI, build_cli
from lightning_refdpo.optim import optimizer_spec
from tests.test_console import assert_one_line_error, fit_args, run

REPO = Path(__file__).parents[1]
CONFIGS = REPO / "configs"
COMMAND = re.compile(r"lightning-refdpo fit((?: --config configs/\S+\.yaml)+)")
TABLE_ROW = re.compile(r"^\| [^|]+ \| `((?:--config configs/\S+\.yaml ?)+)` \|$", re.MULTILINE)
FAMILIES = ("sd15", "sdxl", "sd3")


def documented_recipes() -> dict[str, list[str]]:
    """The ``--config`` lists of every ``lightning-refdpo fit`` command line in the configs' opening
    comments and the README, and of every row of the README's recipe table, by command line."""
    texts = [(REPO / "README.md").read_text()] + [
        path.read_text() for path in sorted(CONFIGS.rglob("*.yaml"))
    ]
    commands = {m.group(1).strip() for text in texts for m in COMMAND.finditer(text)}
    commands |= {m.group(1).strip() for m in TABLE_ROW.finditer(texts[0])}
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
    evaluated = any(name.endswith("eval.yaml") for name in configs)
    if configs[0].startswith(("configs/sd15/", "configs/sdxl/", "configs/sd3/")):
        expected = ["ModelCheckpoint", "LearningRateMonitor"] + ["ReferenceModelUpdate"] * method
        expected += ["PreferenceEvaluation", "ImplicitRewardByTimestep"] * evaluated
        assert callbacks == expected, "an overlay adds its callbacks to the base's"
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


def test_readme_recipe_table_is_parsed():
    table = TABLE_ROW.findall((REPO / "README.md").read_text())
    assert len(table) >= 11 and all(row.strip() in RECIPES for row in table)


def test_every_family_has_an_evaluation_overlay_in_the_recipe_table():
    table = TABLE_ROW.findall((REPO / "README.md").read_text())
    for family in FAMILIES:
        overlay = f"--config configs/{family}/eval.yaml"
        assert any(row.strip().endswith(overlay) and "refdpo.yaml" in row for row in table), family
        assert any(row.strip().endswith(overlay) and "lora.yaml" in row for row in table), family


# Seconds of one GPU per unit of work, the figures each configs/<family>/eval.yaml derives and cites:
# a training pair (full fine-tuning, LoRA), a generated and scored image, a pair in one interval of
# ImplicitRewardByTimestep.
UNIT_SECONDS = {
    "sd15": {"pair": 0.139, "lora_pair": 0.116, "image": 1.64, "interval_pair": 0.068},
    "sdxl": {"pair": 0.518, "lora_pair": 0.433, "image": 5.98, "interval_pair": 0.254},
    "sd3": {"pair": 0.929, "lora_pair": 0.775, "image": 8.55, "interval_pair": 0.454},
}


def active_steps(validations: range, every_n_steps: int | None) -> list[int]:
    """The validation steps at which a callback with ``every_n_steps`` runs: the first one, then
    each at least ``every_n_steps`` after the last (the rule of both evaluation callbacks)."""
    done: list[int] = []
    for step in validations:
        if every_n_steps is None or not done or step - done[-1] >= every_n_steps:
            done.append(step)
    return done


def evaluation_share(family: str, config) -> float:
    """The share of one GPU's training time that the evaluation overlay's two callbacks take in a
    composed recipe, counted from the config: steps, pairs a GPU, GPUs, validations, prompts."""
    trainer, data = config.trainer, config.data.init_args
    seconds = UNIT_SECONDS[family]
    pair = seconds["lora_pair" if config.model.init_args.lora_rank else "pair"]
    steps, world = trainer.max_steps, trainer.devices * trainer.num_nodes
    training = steps * data.train_batch_size * trainer.accumulate_grad_batches * pair
    every = trainer.val_check_interval // trainer.accumulate_grad_batches
    validations = range(every, steps + 1, every)
    evaluation, analysis = (callback.init_args for callback in trainer.callbacks[-2:])
    evaluated = active_steps(validations, evaluation.every_n_steps)
    rounds = len(evaluated) + (evaluated[-1] != steps) + 1  # + after the last step, + the initial model
    images = math.ceil(evaluation.max_prompts * len(evaluation.seeds) / world) * seconds["image"]
    batches = min(analysis.max_batches or trainer.limit_val_batches, trainer.limit_val_batches)
    analysis_pairs = analysis.num_intervals * batches * data.val_batch_size * seconds["interval_pair"]
    analyses = len(active_steps(validations, analysis.every_n_steps))
    return (rounds * images + analyses * analysis_pairs) / training


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_overlay_costs_what_it_states(family, parse):
    overlay = f"configs/{family}/eval.yaml"
    recipes = [configs for configs in RECIPES.values() if configs[-1] == overlay]
    assert len(recipes) >= 2, "documented with full fine-tuning and with LoRA"
    shares = []
    for configs in recipes:
        config = parse(configs)
        evaluation = config.trainer.callbacks[-2].init_args
        assert evaluation.prompts == "pickapic_v2_test"
        assert [s.class_path.rsplit(".", 1)[-1] for s in evaluation.scorers] == ["PickScore", "HPSv2"]
        shares.append(evaluation_share(family, config))
    stated = re.search(r"Total: at most ([\d.]+) %", (REPO / overlay).read_text())
    assert stated, "the overlay states its cost"
    assert math.ceil(max(shares) * 1000) / 10 == float(stated.group(1)) <= 5.0, shares


def test_print_config_of_an_evaluation_overlay_needs_no_open_clip(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    configs = ["configs/sdxl/dpo.yaml", "configs/sdxl/refdpo.yaml", "configs/sdxl/eval.yaml"]
    with pytest.raises(SystemExit) as exit:
        build_cli(["fit", *(f"--config={REPO / c}" for c in configs), "--print_config"])
    assert not exit.value.code
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    scorers = [scorer["class_path"] for scorer in callbacks[-2]["init_args"]["scorers"]]
    assert scorers == ["lightning_refdpo.metrics.PickScore", "lightning_refdpo.metrics.HPSv2"]


def hub_cache_with(cache: Path, folder: Path, *repo_ids: str) -> Path:
    """``cache``, a Hugging Face hub cache in which each of ``repo_ids`` is a copy of ``folder``, so
    ``from_pretrained(repo_id)`` loads it offline as it loads a model fetched once online."""
    revision = "0" * 40
    for repo_id in repo_ids:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
        shutil.copytree(folder, repo / "snapshots" / revision)
    return cache


def test_fit_with_an_evaluation_overlay_without_open_clip_names_the_extra(
    tiny_model, tiny_data, clip_dir, tmp_path
):
    """The SD1.5 overlay as shipped, PickScore's hub ids served from a local cache and open_clip not
    importable: one line naming the extra, exit 2, before any step."""
    blocked = tmp_path / "no_open_clip"
    blocked.mkdir()
    (blocked / "open_clip.py").write_text("raise ModuleNotFoundError(\"No module named 'open_clip'\")\n")
    pickscore = ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    cache = hub_cache_with(tmp_path / "hub", Path(clip_dir), *pickscore)
    root = tmp_path / "run"
    args = fit_args(tiny_model, tiny_data, root, f"--config={CONFIGS / 'sd15' / 'eval.yaml'}")
    result = run(*args, env={"PYTHONPATH": f"{blocked}:{REPO}", "HF_HUB_CACHE": str(cache)})
    assert_one_line_error(result, "HPSv2 needs open_clip", "pip install 'lightning-refdpo[hpsv2]'")
    assert not root.exists(), "refused before training"


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


OBJECTIVES = {
    "sd15/kto": {
        "loss_type": "kto",
        "beta": 1000.0,
        "learning_rate": 1e-7,
        "kto_reference_point": "batch_mean",
    },
    "sd15/dspo": {"loss_type": "dspo", "beta": 0.001, "dspo_form": "sd15", "winner_preserving_mu": None},
    "sd15/dmpo": {"loss_type": "dmpo", "beta": 2000.0, "dmpo_alpha": 0.01},
    "sdxl/dspo": {"loss_type": "dspo", "beta": 5000.0, "dspo_form": "sdxl"},
}


@pytest.mark.parametrize(("overlay", "expected"), OBJECTIVES.items(), ids=OBJECTIVES)
def test_objective_overlays_carry_the_public_settings_under_the_papers_method(overlay, expected, parse):
    family = overlay.split("/")[0]
    configs = [f"configs/{family}/dpo.yaml", f"configs/{overlay}.yaml", f"configs/{family}/refdpo.yaml"]
    model = parse(configs).model.init_args
    assert {key: model[key] for key in expected} == expected
    assert model.reward_scale is True


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
