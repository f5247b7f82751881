"""The paper's ablation (Tables 3 and 4 of arXiv 2505.18736) in the toy world, and the other preference
objectives of the field with and without the paper's parts: each variant tuned on the validation
prompts with the same search budget, then trained with five seeds and measured on the test prompts.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_alignment.py --jobs 2                 # the ablation
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_alignment.py --jobs 2 --variants ...  # any rows
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_alignment.py --pilot-only --model M --data D

Every variant is ``configs/demo.yaml`` (the full method) with parts switched off or another objective
(``VARIANTS``; the first seven, ``ABLATION``, are the default):

| variant | loss | reference update | cap (``max_divergence``) | on exceeding | timestep-aware (sampler + ``lambda(t)``) |
| --- | --- | --- | --- | --- | --- |
| ``sft`` | winners only | no | - | - | no |
| ``diffusion_dpo`` | DPO | no | - | - | no |
| ``timestep_aware_only`` | DPO | no | - | - | yes |
| ``ref_update_no_cap`` | DPO | yes | none | - | no |
| ``ref_update_cap`` | DPO | yes | delta | freeze | no |
| ``reinit`` | DPO | yes | delta | re-init | yes |
| ``full`` | DPO | yes | delta | freeze | yes |
| ``kto``, ``dspo``, ``dmpo`` | Diffusion-KTO, DSPO (SD1.5 form), DMPO (alpha 0.01) | no | - | - | no |
| ``kto_full``, ``dspo_full``, ``dmpo_full`` | the same | yes | delta | freeze | yes |
| ``diffusion_dpo_safeguard``, ``full_safeguard`` | DPO with Diffusion-SDPO's safeguard (mu 0.9) | as ``diffusion_dpo``, ``full`` | | | |

Protocol, the same for every variant:

0. **Pilot gate** (validation prompts): Diffusion-DPO with the config's learning rate and beta,
   training seed 0, must win against the base model on at least ``PILOT_GATE`` of the validation
   images, or nothing else runs. Every base model and preference set tried this way is kept in
   ``benchmarks/results/toy_pilots.json`` (``--model``, ``--data`` try others than the config's).
1. **Search** (validation prompts): ``--trials`` configurations drawn without replacement (seeded)
   from the variant's own grid of ``SEARCH_SPACE`` (learning rate, and where the variant has them
   beta, tau and delta); each trained with training seed 0 and sampled on
   ``VALIDATION_PROMPTS`` x ``--eval-seeds``; the one with the highest mean ToyReward wins. If the
   chosen Diffusion-DPO wins on more than ``CEILING`` of the validation images, the script stops:
   shorten training for every variant alike (``--max-steps``), choosing on the validation prompts.
2. **Test**: the chosen configuration trained with each of ``--seeds`` and sampled on
   ``TEST_PROMPTS`` x ``--eval-seeds`` (the same items for every run and for the base model).

Every run trains through the CLI (``lightning-refdpo fit`` in a worker process) and is kept in
``--work-dir`` (a JSON per run, keyed by its whole configuration), so a rerun skips finished runs.
Written: ``benchmarks/results/toy_alignment.json`` and the tables between ``<!-- toy_alignment:start -->``
and ``<!-- toy_alignment:end -->`` of ``benchmarks/README.md`` (``--output`` names both). Per variant:
the chosen hyperparameters and every search trial; the mean and standard deviation over training seeds
of the test reward; against the base model and against Diffusion-DPO of the same training seed, the
win rate and the mean reward gain, each with its 95 % bootstrap interval over prompts and training
seeds; per-attribute means and their change against the base model, the change of the parts the
preferences do not favour (winner-minus-loser gap below ``FAVOURED`` in the training pairs: the
alignment tax); the divergence of the policy from the initial model and the reference-update counts.
Then the gates (``sft`` and ``diffusion_dpo`` beat the base model), whether the full method meets the
demo's target, and the full method against Diffusion-DPO paired by training seed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lightning_refdpo.data.preference import PreferenceCollator, PreferencePairs, drop_ties
from lightning_refdpo.evaluation import GenerationConfig, evaluation_items, load_pipeline
from lightning_refdpo.metrics import win_outcomes, win_rate
from lightning_refdpo.toy.demo import TARGET_WIN_RATE, fit
from lightning_refdpo.toy.evaluate import GENERATION, attribute_summary, bootstrap_ci, toy_scores
from lightning_refdpo.toy.world import TEST_PROMPTS, VALIDATION_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_UPDATE = "lightning_refdpo.callbacks.ReferenceModelUpdate"
PREFERENCE_EVALUATION = "lightning_refdpo.callbacks.PreferenceEvaluation"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row of the ablation: the objective and which of the paper's parts a run has.

    ``reference_update``: ``None`` (the reference stays the initial model), ``"no_cap"`` (updated every
    ``tau`` steps), ``"freeze"`` (updated under the cap ``delta``, frozen once it is exceeded: the
    paper's method) or ``"reinit"`` (reset to the initial model instead). ``timestep_aware``: the
    discounted timestep sampler and ``lambda(t)``. ``model_options``: further fixed ``model.init_args``.
    """

    loss: str = "sigmoid"
    reference_update: str | None = None
    timestep_aware: bool = False
    model_options: tuple[tuple[str, Any], ...] = ()
    beta_grid: tuple[float, ...] | None = None

    def with_method(self) -> Variant:
        """This objective with the paper's two parts: the capped reference update and timestep-aware
        optimization."""
        return dataclasses.replace(self, reference_update="freeze", timestep_aware=True)


KTO = Variant(
    loss="kto", beta_grid=(1250.0, 2500.0, 5000.0, 10000.0)
)  # no 0.5 in its reward: half the DPO grid
DSPO = Variant(loss="dspo", model_options=(("dspo_form", "sd15"),), beta_grid=(0.001, 0.01, 0.05))
DMPO = Variant(loss="dmpo", model_options=(("dmpo_alpha", 0.01),))
SAFEGUARD = (("winner_preserving_mu", 0.9),)  # Diffusion-SDPO's value for Diffusion-DPO on SD1.5
VARIANTS = {
    "sft": Variant(loss="sft"),
    "diffusion_dpo": Variant(),
    "timestep_aware_only": Variant(timestep_aware=True),
    "ref_update_no_cap": Variant(reference_update="no_cap"),
    "ref_update_cap": Variant(reference_update="freeze"),
    "reinit": Variant(reference_update="reinit", timestep_aware=True),
    "full": Variant().with_method(),
    "kto": KTO,
    "kto_full": KTO.with_method(),
    "dspo": DSPO,
    "dspo_full": DSPO.with_method(),
    "dmpo": DMPO,
    "dmpo_full": DMPO.with_method(),
    "diffusion_dpo_safeguard": Variant(model_options=SAFEGUARD),
    "full_safeguard": Variant(model_options=SAFEGUARD).with_method(),
}
ABLATION = tuple(VARIANTS)[:7]
"""The paper's ablation (Tables 3 and 4); the rows after it are the other objectives of the field and
Diffusion-SDPO's winner-preserving safeguard, with and without the paper's parts."""
SEARCH_SPACE = {
    "learning_rate": [1e-4, 2e-4, 3e-4, 4e-4],
    "beta": [2500.0, 5000.0, 10000.0, 20000.0],
    "every_n_steps": [2, 4, 8],
    "max_divergence": [0.002, 0.005, 0.01, 0.02],
}
GATES = {"sft": 0.55, "diffusion_dpo": 0.5}
PILOT_GATE = 0.6
"""Diffusion-DPO (the config's hyperparameters, training seed 0) must beat the base model on this share
of the validation images before the ablation runs."""
CEILING = 0.95
"""A Diffusion-DPO validation win rate above this leaves no room to separate the variants."""
FAVOURED = 0.02
"""A part the preferences favour: its winner-minus-loser gap in the training pairs is at least this."""


def searched(name: str) -> list[str]:
    """The hyperparameters variant ``name`` has."""
    variant = VARIANTS[name]
    keys = ["learning_rate"] + ([] if variant.loss == "sft" else ["beta"])
    keys += ["every_n_steps"] if variant.reference_update else []
    return keys + (["max_divergence"] if variant.reference_update in ("freeze", "reinit") else [])


def trials(name: str, count: int, seed: int = 0) -> list[dict[str, float]]:
    """``count`` configurations of the variant's grid, drawn without replacement."""
    keys = searched(name)
    space = {**SEARCH_SPACE, "beta": VARIANTS[name].beta_grid or SEARCH_SPACE["beta"]}
    grid = list(itertools.product(*(space[k] for k in keys)))
    order = np.random.default_rng(seed).permutation(len(grid))[: min(count, len(grid))]
    return [dict(zip(keys, grid[i], strict=True)) for i in sorted(order)]


def variant_config(base: dict, name: str, hparams: dict[str, float]) -> dict:
    """``base`` (the full method) with the parts of variant ``name`` and ``hparams`` (a
    ``max_divergence`` of ``None`` in ``hparams`` lifts the cap), without in-training evaluation."""
    variant = VARIANTS[name]
    config = copy.deepcopy(base)
    model = config["model"]["init_args"]
    callbacks = config["trainer"].get("callbacks") or []
    update = next(c for c in callbacks if c["class_path"] == REFERENCE_UPDATE)
    config["trainer"]["callbacks"] = [
        c for c in callbacks if c["class_path"] not in (REFERENCE_UPDATE, PREFERENCE_EVALUATION)
    ]
    if variant.reference_update:
        update = copy.deepcopy(update)
        update["init_args"]["every_n_steps"] = hparams["every_n_steps"]
        update["init_args"]["max_divergence"] = hparams.get("max_divergence")
        update["init_args"]["on_exceed"] = "reinit" if variant.reference_update == "reinit" else "freeze"
        config["trainer"]["callbacks"].append(update)
    if not variant.timestep_aware:
        sampler = config["data"]["init_args"]["timestep_sampler"]
        config["data"]["init_args"]["timestep_sampler"] = {
            "class_path": "lightning_refdpo.UniformTimestepSampler",
            "init_args": {"num_train_timesteps": sampler["init_args"]["num_train_timesteps"]},
        }
        model["reward_scale"] = False
    model["loss_type"] = variant.loss
    model.update(dict(variant.model_options))
    model["learning_rate"] = hparams["learning_rate"]
    if "beta" in hparams:
        model["beta"] = hparams["beta"]
    return config


def run_key(config: dict, name: str, seed: int, split: str, steps: int, eval_seeds: int) -> str:
    """A name for one run that changes with everything the run depends on (the whole config)."""
    text = json.dumps([config, seed, split, steps, eval_seeds], sort_keys=True)
    return f"{name}_{split}_seed{seed}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def run_one(job: dict) -> dict:
    """Train one configuration and score it on its split; the run's record (also saved as JSON)."""
    torch.set_num_threads(job["threads"])
    folder = Path(job["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    config = variant_config(job["base"], job["variant"], job["hparams"])
    config["seed_everything"] = job["seed"]
    config["trainer"]["default_root_dir"] = str(folder)
    config["trainer"]["max_steps"] = job["steps"]
    config["trainer"].update({"enable_progress_bar": False, "enable_checkpointing": False, "logger": False})
    if job.get("log_every_step"):  # a CSV log of every step, for the figures of toy_mechanisms.py
        config["trainer"]["logger"] = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(folder), "name": "log", "version": 0},
        }
        config["trainer"]["log_every_n_steps"] = 1
    config["trainer"]["callbacks"] += job.get("callbacks", [])
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    module = fit(folder / "config.yaml")
    if job.get("validate_after"):  # the callbacks' validation-time analysis of the trained policy
        module.trainer.validate(module, datamodule=module.trainer.datamodule, verbose=False)
    train_seconds = time.perf_counter() - start
    update = next((c for c in module.trainer.callbacks if type(c).__name__ == "ReferenceModelUpdate"), None)
    prompts = VALIDATION_PROMPTS if job["split"] == "validation" else TEST_PROMPTS
    items = evaluation_items(list(prompts), list(range(job["eval_seeds"])))
    _, parts = toy_scores(module.build_pipeline(), items, GenerationConfig(**GENERATION))
    record = {
        **{k: job[k] for k in ("variant", "hparams", "seed", "split")},
        "reward_mean": float(parts["score"].mean()),
        "scores": parts["score"].tolist(),
        "attributes": attribute_summary(parts),
        "divergence_from_init": divergence_from_init(module, job["divergence_batch"]),
        "reference": None
        if update is None
        else {
            "updates": update.num_updates,
            "reinits": update.num_reinits,
            "frozen": update.frozen,
            "last_divergence": update.last_divergence,
        },
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
        "log_dir": module.trainer.log_dir if job.get("log_every_step") else None,
    }
    Path(job["record"]).write_text(json.dumps(record))
    return record


def divergence_batch(path: Path, latent_columns: list[str]) -> dict:
    """The strict pairs of a preference parquet with shipped latents, as one batch (winners first)."""
    import datasets

    rows = drop_ties(datasets.Dataset.from_parquet(str(path)), str(path))
    pairs = PreferencePairs(rows, transform=None, latent_columns=tuple(latent_columns))
    return PreferenceCollator()([pairs[i] for i in range(len(pairs))])


@torch.no_grad()
def divergence_from_init(module, batch: dict, repeats: int = 4) -> float:
    """``mean(mse_theta(x^w) - mse_init(x^w))`` over ``batch``, ``repeats`` draws of (t, noise)."""
    generator = torch.Generator().manual_seed(0)
    n = len(batch["caption"])
    return float(
        np.mean([module.estimate_divergence(batch, n, "policy", generator).item() for _ in range(repeats)])
    )


def run_all(jobs: list[dict], workers: int) -> list[dict]:
    """Run the jobs whose record is missing (``workers`` processes), then load every record."""
    todo = [j for j in jobs if not Path(j["record"]).exists()]
    for job in todo:
        print(f"queued {job['variant']} {job['split']} seed {job['seed']} {job['hparams']}", flush=True)
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for record in pool.map(run_one, todo):
                report(record)
    else:
        for job in todo:
            report(run_one(job))
    return [json.loads(Path(j["record"]).read_text()) for j in jobs]


def report(record: dict) -> None:
    print(
        f"done {record['variant']} {record['split']} seed {record['seed']} {record['hparams']}: reward "
        f"{record['reward_mean']:.4f}, divergence {record['divergence_from_init']:.5f}, reference "
        f"{record['reference']}, {record['seconds']:.0f}s",
        flush=True,
    )


def base_scores(model: str, split: str, eval_seeds: int, work_dir: Path) -> dict:
    """The base model's ToyReward parts on a split (cached in ``work_dir``)."""
    tag = hashlib.sha1(str(Path(model).resolve()).encode()).hexdigest()[:10]
    path = work_dir / f"base_{tag}_{split}_eval{eval_seeds}.json"
    if not path.exists():
        prompts = VALIDATION_PROMPTS if split == "validation" else TEST_PROMPTS
        items = evaluation_items(list(prompts), list(range(eval_seeds)))
        _, parts = toy_scores(load_pipeline(model, "cpu")[0], items, GenerationConfig(**GENERATION))
        path.write_text(json.dumps({k: v.tolist() for k, v in parts.items()}))
    return {k: torch.tensor(v) for k, v in json.loads(path.read_text()).items()}


def outcomes_of(scores: dict[int, torch.Tensor], versus: dict[int, torch.Tensor], kind: str) -> torch.Tensor:
    """Per training seed, prompt and evaluation seed ``(seeds, prompts, eval seeds)``: the win
    outcome (``kind="win"``, ties 1/2) or the reward difference (``"gain"``) of ``scores`` over
    ``versus`` (one tensor for every seed, or the run of the same seed)."""
    rows = []
    for seed, values in scores.items():
        other = versus[seed]
        rows.append(win_outcomes(values, other) if kind == "win" else values - other)
    return torch.stack(rows).view(len(rows), len(TEST_PROMPTS), -1)


def with_ci(outcomes: torch.Tensor) -> dict[str, Any]:
    """The mean of ``outcomes`` and its 95 % bootstrap interval over training seeds and prompts."""
    return {"mean": float(outcomes.double().mean()), "ci": list(bootstrap_ci(outcomes))}


def favoured_parts(stats_path: Path) -> dict[str, float]:
    """Winner-minus-loser gap of every ToyReward part in the training pairs (``stats.json`` of the
    preference set)."""
    gaps = json.loads(stats_path.read_text())["splits"]["train"]["winner_minus_loser"]
    return {k: v for k, v in gaps.items() if k not in ("score", "presence")}


def aggregate(search: dict, test: dict, base: dict, args: argparse.Namespace) -> dict:
    baseline = base["score"]
    base_attributes = attribute_summary(base)
    gaps = favoured_parts(args.stats)
    results: dict[str, Any] = {
        "base": {"reward_mean": float(baseline.mean()), "attributes": base_attributes},
        "setup": {
            "config": display(args.config),
            "model": display(Path(args.model)),
            "data": display(args.stats.parent),
            "max_steps": args.max_steps,
            "trials_per_variant": args.trials,
            "search_space": SEARCH_SPACE,
            "seeds": args.seeds,
            "test_prompts": len(TEST_PROMPTS),
            "validation_prompts": len(VALIDATION_PROMPTS),
            "eval_seeds": args.eval_seeds,
            "generation": GENERATION,
            "winner_minus_loser": gaps,
            "favoured_threshold": FAVOURED,
            "command": "python " + " ".join(sys.argv),
        },
        "variants": {},
    }
    dpo = {r["seed"]: torch.tensor(r["scores"]) for r in test.get("diffusion_dpo", [])}
    for name in args.variants:
        runs = {r["seed"]: r for r in test[name]}
        seeds = sorted(runs)
        scores = {s: torch.tensor(runs[s]["scores"]) for s in seeds}
        means = [float(scores[s].mean()) for s in seeds]
        against_base = {s: baseline for s in seeds}
        wins = outcomes_of(scores, against_base, "win")
        paired = {s: scores[s] for s in seeds if s in dpo}
        attributes = {
            a: statistics.mean(runs[s]["attributes"][a]["mean"] for s in seeds) for a in base_attributes
        }
        change = {a: attributes[a] - base_attributes[a]["mean"] for a in base_attributes}
        refs = [runs[s]["reference"] for s in seeds if runs[s]["reference"]]
        results["variants"][name] = {
            "hparams": test[name][0]["hparams"],
            "search": [
                {
                    "hparams": r["hparams"],
                    "validation_reward": r["reward_mean"],
                    "validation_win_rate_vs_base": r["win_rate_vs_base"],
                }
                for r in search[name]
            ],
            "reward_mean": statistics.mean(means),
            "reward_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "win_rate_vs_base": float(wins.mean()),
            "win_rate_vs_base_ci": list(bootstrap_ci(wins)),
            "gain_vs_base": with_ci(outcomes_of(scores, against_base, "gain")),
            "win_rate_vs_dpo": with_ci(outcomes_of(paired, dpo, "win")) if paired else None,
            "gain_vs_dpo": with_ci(outcomes_of(paired, dpo, "gain")) if paired else None,
            "attributes": attributes,
            "attributes_correct": {
                a: statistics.mean(runs[s]["attributes"][a]["correct"] for s in seeds)
                for a in base_attributes
            },
            "attribute_change": change,
            "alignment_tax": {a: change[a] for a in change if gaps.get(a, 0.0) < FAVOURED},
            "divergence_from_init": statistics.mean(runs[s]["divergence_from_init"] for s in seeds),
            "reference": {
                "updates": statistics.mean(r["updates"] for r in refs),
                "reinits": statistics.mean(r["reinits"] for r in refs),
                "frozen_runs": sum(r["frozen"] for r in refs),
            }
            if refs
            else None,
            "seeds": seeds,
            "per_seed": {
                str(s): {
                    "reward_mean": means[i],
                    "win_rate_vs_base": win_rate(scores[s], baseline),
                    "gain_vs_dpo": float(scores[s].mean() - dpo[s].mean()) if s in dpo else None,
                }
                for i, s in enumerate(seeds)
            },
        }
    variants = results["variants"]
    results["gates"] = {
        name: {
            "win_rate_vs_base": variants[name]["win_rate_vs_base"],
            "ci": variants[name]["win_rate_vs_base_ci"],
            "threshold": threshold,
            "passed": variants[name]["win_rate_vs_base"] > threshold
            and variants[name]["win_rate_vs_base_ci"][0] > 0.5,
        }
        for name, threshold in GATES.items()
        if name in variants
    }
    if "full" in variants:
        full = variants["full"]
        results["target"] = {
            "win_rate": TARGET_WIN_RATE,
            "passed": full["win_rate_vs_base"] >= TARGET_WIN_RATE and full["win_rate_vs_base_ci"][0] > 0.5,
        }
        if full["gain_vs_dpo"] is not None:
            per_seed = [full["per_seed"][str(s)]["gain_vs_dpo"] for s in full["seeds"]]
            results["full_vs_dpo"] = {
                "per_seed_gain": per_seed,
                "seeds_full_better": sum(g > 0 for g in per_seed),
                "gain": full["gain_vs_dpo"],
                "win_rate": full["win_rate_vs_dpo"],
                "full_better": full["gain_vs_dpo"]["ci"][0] > 0,
                "dpo_better": full["gain_vs_dpo"]["ci"][1] < 0,
            }
    return results


def display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def table(results: dict) -> str:
    base = results["base"]
    setup = results["setup"]
    attributes = list(base["attributes"])
    lines = [
        f"Test ToyReward ({setup['test_prompts']} prompts x {setup['eval_seeds']} seeds per run, "
        f"{len(setup['seeds'])} training seeds, {setup['max_steps']} steps); each variant's hyperparameters "
        f"chosen on the {setup['validation_prompts']} validation prompts ({setup['trials_per_variant']} trials "
        "each). Win rates and gains: mean over training seeds, [95 % bootstrap interval over training "
        "seeds and prompts]; against Diffusion-DPO: the run of the same training seed. Attributes: mean "
        "ToyReward part.",
        "",
        "| variant | hyperparameters | reward | win vs base | gain vs base | win vs DPO | gain vs DPO | "
        "divergence | ref. updates (frozen runs) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| base | - | {base['reward_mean']:.4f} | - | - | - | - | - | - |",
    ]

    def interval(v: dict | None, scale: float = 100, digits: int = 1) -> str:
        if v is None:
            return "-"
        low, high = v["ci"]
        return f"{scale * v['mean']:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"

    for name, v in results["variants"].items():
        low, high = v["win_rate_vs_base_ci"]
        hp = ", ".join(
            f"{k.replace('learning_rate', 'lr').replace('every_n_steps', 'tau').replace('max_divergence', 'delta')} {x:g}"
            for k, x in v["hparams"].items()
        )
        versus, gain_vs_dpo = (
            (None, None) if name == "diffusion_dpo" else (v["win_rate_vs_dpo"], v["gain_vs_dpo"])
        )
        versus_text = (
            "-"
            if versus is None
            else f"{percent(versus['mean'])} [{100 * versus['ci'][0]:.1f}, {100 * versus['ci'][1]:.1f}]"
        )
        ref = v["reference"]
        ref_text = "-" if ref is None else f"{ref['updates']:.1f} ({ref['frozen_runs']}/{len(v['seeds'])})"
        if ref and ref["reinits"]:
            ref_text += f", {ref['reinits']:.1f} re-inits"
        lines.append(
            f"| {name} | {hp} | {v['reward_mean']:.4f} +- {v['reward_std']:.4f} | "
            f"{percent(v['win_rate_vs_base'])} [{100 * low:.1f}, {100 * high:.1f}] | "
            f"{interval(v['gain_vs_base'], 1, 4)} | {versus_text} | {interval(gain_vs_dpo, 1, 4)} | "
            f"{v['divergence_from_init']:.5f} | {ref_text} |"
        )
    gaps = setup["winner_minus_loser"]
    lines += [
        "",
        "Attributes (mean ToyReward part; change against the base model). Winner minus loser in the "
        "training pairs: " + ", ".join(f"{a} {gaps[a]:+.3f}" for a in attributes) + f"; the parts below "
        f"{setup['favoured_threshold']} are the ones the preferences do not favour, and their change is the "
        "alignment tax (in bold where it is a loss).",
        "",
        "| variant | " + " | ".join(attributes) + " |",
        "| --- |" + " ---: |" * len(attributes),
        "| base | " + " | ".join(f"{base['attributes'][a]['mean']:.3f}" for a in attributes) + " |",
    ]
    for name, v in results["variants"].items():
        cells = []
        for a in attributes:
            delta = v["attribute_change"][a]
            text = f"{v['attributes'][a]:.3f} ({delta:+.3f})"
            cells.append(f"**{text}**" if a in v["alignment_tax"] and delta < 0 else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gates = "; ".join(
        f"{n} {'passes' if g['passed'] else 'FAILS'} (win {percent(g['win_rate_vs_base'])} > "
        f"{100 * g['threshold']:.0f}%, CI low {percent(g['ci'][0])})"
        for n, g in results["gates"].items()
    )
    lines += ["", f"Gates: {gates}."]
    if "target" in results:
        lines.append(
            f"Target (full method: win rate >= {100 * TARGET_WIN_RATE:.0f}% with CI low > 50%): "
            f"{'met' if results['target']['passed'] else 'NOT met'}."
        )
    if "full_vs_dpo" in results:
        paired = results["full_vs_dpo"]
        verdict = (
            "the full method is better"
            if paired["full_better"]
            else "Diffusion-DPO is better"
            if paired["dpo_better"]
            else "no significant difference"
        )
        lines.append(
            f"Full method vs Diffusion-DPO, paired by training seed: reward gain {interval(paired['gain'], 1, 4)}, "
            f"higher on {paired['seeds_full_better']} of {len(paired['per_seed_gain'])} seeds "
            f"(per seed: {', '.join(f'{g:+.4f}' for g in paired['per_seed_gain'])}), win rate "
            f"{percent(paired['win_rate']['mean'])}: {verdict}."
        )
    return "\n".join(lines)


def write_readme_table(text: str, readme: Path, name: str) -> None:
    """Put ``text`` between the markers ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` of ``readme``
    (appended with them if they are missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text()
    if start in content and end in content:
        head, rest = content.split(start, 1)
        content = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    else:
        content = content.rstrip("\n") + f"\n\n{start}\n{text}\n{end}\n"
    readme.write_text(content)


def jobs_for(name: str, configs: list[dict], seeds: list[int], split: str, common: dict, args) -> list[dict]:
    jobs = []
    for hparams, seed in itertools.product(configs, seeds):
        config = variant_config(common["base"], name, hparams)
        key = run_key(config, name, seed, split, common["steps"], args.eval_seeds)
        jobs.append(
            {
                **common,
                "variant": name,
                "hparams": hparams,
                "seed": seed,
                "split": split,
                "folder": str(args.work_dir / "runs" / key),
                "record": str(args.work_dir / f"{key}.json"),
            }
        )
    return jobs


def load_base_config(args: argparse.Namespace) -> dict:
    """The config, with ``--model`` and ``--data`` (a preference set folder) in place of its own."""
    base = yaml.safe_load(args.config.read_text())
    model, data = base["model"]["init_args"], base["data"]["init_args"]
    if args.model:
        model["pretrained_model_name_or_path"] = str(args.model)
    if args.data:
        data["data_files"] = {split: str(args.data / f"{split}.parquet") for split in ("train", "validation")}
    args.model = model["pretrained_model_name_or_path"]
    args.stats = Path(data["data_files"]["train"]).parent / "stats.json"
    return base


def pilot(common: dict, args: argparse.Namespace, name: str = "diffusion_dpo") -> dict:
    """The gate before the ablation: variant ``name`` (Diffusion-DPO) with the config's learning rate
    and beta, training seed 0, against the base model on the validation prompts. Recorded in
    ``--pilots`` (one entry per base model, preference set and variant), with the base model's
    attributes and the pool's statistics."""
    model = common["base"]["model"]["init_args"]
    hparams = {k: model[k] for k in searched(name) if k in ("learning_rate", "beta")}
    record = run_all(jobs_for(name, [hparams], [0], "validation", common, args), 1)[0]
    base = base_scores(args.model, "validation", args.eval_seeds, args.work_dir)
    outcomes = win_outcomes(torch.tensor(record["scores"]), base["score"]).view(
        1, len(VALIDATION_PROMPTS), -1
    )
    stats = json.loads(args.stats.read_text())
    entry = {
        "model": display(Path(args.model)),
        "data": display(args.stats.parent),
        "pool": stats["pool"],
        "winner_minus_loser": stats["splits"]["train"]["winner_minus_loser"],
        "base_validation": {
            "reward_mean": float(base["score"].mean()),
            "attributes": attribute_summary(base),
        },
        "variant": name,
        "pilot": {
            "hparams": hparams,
            "steps": args.max_steps,
            "reward_mean": record["reward_mean"],
            "attributes": record["attributes"],
            "win_rate_vs_base": float(outcomes.mean()),
            "win_rate_vs_base_ci": list(bootstrap_ci(outcomes)),
        },
        "gate": PILOT_GATE,
        "passed": float(outcomes.mean()) >= PILOT_GATE,
    }
    pilots = json.loads(args.pilots.read_text()) if args.pilots.exists() else []
    key = ("model", "data", "variant")
    pilots = [p for p in pilots if [p[k] for k in key] != [entry[k] for k in key]] + [entry]
    args.pilots.parent.mkdir(parents=True, exist_ok=True)
    args.pilots.write_text(json.dumps(pilots, indent=2))
    low, high = entry["pilot"]["win_rate_vs_base_ci"]
    print(
        f"pilot: {name} {hparams} wins {percent(entry['pilot']['win_rate_vs_base'])} "
        f"[{100 * low:.1f}, {100 * high:.1f}] of the validation images against {entry['model']} on "
        f"{entry['data']}: {'passes' if entry['passed'] else 'FAILS'} the gate ({percent(PILOT_GATE)})",
        flush=True,
    )
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--model", type=Path, default=None, help="a toy base model instead of the config's")
    parser.add_argument(
        "--data", type=Path, default=None, help="a preference set folder instead of the config's"
    )
    parser.add_argument("--variants", nargs="+", default=list(ABLATION), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--trials", type=int, default=4, help="search trials per variant")
    parser.add_argument("--eval-seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "toy_alignment")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "toy_alignment.json")
    parser.add_argument("--pilots", type=Path, default=ROOT / "benchmarks" / "results" / "toy_pilots.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "benchmarks" / "README.md")
    parser.add_argument("--pilot-only", action="store_true", help="stop after the pilot gate")
    parser.add_argument(
        "--pilot-variant", default="diffusion_dpo", choices=VARIANTS, help="measure this variant's pilot only"
    )
    parser.add_argument("--search-only", action="store_true", help="stop after the search")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_base_config(args)
    args.max_steps = args.max_steps or base["trainer"]["max_steps"]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = base["data"]["init_args"]
    common = {
        "base": base,
        "steps": args.max_steps,
        "eval_seeds": args.eval_seeds,
        "threads": 1,
        "divergence_batch": divergence_batch(Path(data["data_files"]["validation"]), data["latent_columns"]),
    }
    if args.pilot_variant != "diffusion_dpo":
        pilot(common, args, args.pilot_variant)
        return
    if not pilot(common, args)["passed"] or args.pilot_only:
        return
    search_jobs = {
        n: jobs_for(n, trials(n, args.trials), [0], "validation", common, args) for n in args.variants
    }
    records = run_all([j for jobs in search_jobs.values() for j in jobs], args.jobs)
    validation_base = base_scores(args.model, "validation", args.eval_seeds, args.work_dir)["score"]
    for record in records:
        record["win_rate_vs_base"] = win_rate(torch.tensor(record["scores"]), validation_base)
    search = {n: [r for r in records if r["variant"] == n] for n in args.variants}
    best = {n: max(search[n], key=lambda r: r["reward_mean"]) for n in args.variants}
    for name, record in best.items():
        print(
            f"{name}: chose {record['hparams']} on the validation prompts "
            f"(win rate vs base {percent(record['win_rate_vs_base'])})",
            flush=True,
        )
    if "diffusion_dpo" in best and best["diffusion_dpo"]["win_rate_vs_base"] > CEILING:
        print(
            f"Diffusion-DPO wins {percent(best['diffusion_dpo']['win_rate_vs_base'])} of the validation "
            f"images (> {percent(CEILING)}): at the ceiling, the test could not separate the variants. "
            "Shorten training for every variant (--max-steps), choosing on the validation prompts.",
            flush=True,
        )
        return
    if args.search_only:
        return
    chosen = {n: best[n]["hparams"] for n in args.variants}
    test_jobs = [j for n in args.variants for j in jobs_for(n, [chosen[n]], args.seeds, "test", common, args)]
    records = run_all(test_jobs, args.jobs)
    test = {n: [r for r in records if r["variant"] == n] for n in args.variants}
    results = aggregate(search, test, base_scores(args.model, "test", args.eval_seeds, args.work_dir), args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    write_readme_table(table(results), args.readme, args.output.stem)
    print(table(results))


if __name__ == "__main__":
    main()
