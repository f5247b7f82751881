"""The paper's ablation (Tables 3 and 4 of arXiv 2505.18736) in the toy world: seven variants, each
tuned on the validation prompts with the same search budget, then trained with five seeds and
measured on the test prompts.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_alignment.py --jobs 2

Every variant is ``configs/demo.yaml`` (the full method) with components switched off:

| variant | loss | reference update | cap (``max_divergence``) | on exceeding | timestep-aware (sampler + ``lambda(t)``) |
| --- | --- | --- | --- | --- | --- |
| ``sft`` | winners only | no | - | - | no |
| ``diffusion_dpo`` | DPO | no | - | - | no |
| ``timestep_aware_only`` | DPO | no | - | - | yes |
| ``ref_update_no_cap`` | DPO | yes | none | - | no |
| ``ref_update_cap`` | DPO | yes | delta | freeze | no |
| ``reinit`` | DPO | yes | delta | re-init | yes |
| ``full`` | DPO | yes | delta | freeze | yes |

Protocol, the same for every variant:

1. **Search** (validation prompts): ``--trials`` configurations drawn without replacement (seeded)
   from the variant's own grid of ``SEARCH_SPACE`` (learning rate, and where the variant has them
   beta, tau and delta); each trained with training seed 0 and sampled on
   ``VALIDATION_PROMPTS`` x ``--eval-seeds``; the one with the highest mean ToyReward wins.
2. **Test**: the chosen configuration trained with each of ``--seeds`` and sampled on
   ``TEST_PROMPTS`` x ``--eval-seeds`` (the same items for every run and for the base model).

Every run trains through the CLI (``lightning-refdpo fit`` in a worker process) and is kept in
``--work-dir`` (a JSON per run, keyed by its configuration), so a rerun skips finished runs.
Written: ``benchmarks/results/toy_alignment.json`` and the table between ``<!-- toy_alignment:start -->``
and ``<!-- toy_alignment:end -->`` of ``benchmarks/README.md``. Per variant: the chosen
hyperparameters and every search trial, the mean and standard deviation over training seeds of the
test reward, the win rate against the base model (mean over seeds) with its 95 % bootstrap interval
over prompts and training seeds (``win_rate_vs_base_ci``), the win rate against Diffusion-DPO of the
same seed, per-attribute means, the divergence of the policy from the initial model and the
reference-update counts; the gates (``sft`` and ``diffusion_dpo`` beat the base model) and whether
the full method meets the demo's target.
"""

from __future__ import annotations

import argparse
import copy
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
VARIANTS = (
    "sft",
    "diffusion_dpo",
    "timestep_aware_only",
    "ref_update_no_cap",
    "ref_update_cap",
    "reinit",
    "full",
)
REFERENCE_UPDATE = "lightning_refdpo.callbacks.ReferenceModelUpdate"
UPDATES = ("ref_update_no_cap", "ref_update_cap", "reinit", "full")
CAPPED = ("ref_update_cap", "reinit", "full")
TIMESTEP_AWARE = ("timestep_aware_only", "reinit", "full")
SEARCH_SPACE = {
    "learning_rate": [1e-4, 2e-4, 3e-4, 4e-4],
    "beta": [2500.0, 5000.0, 10000.0, 20000.0],
    "every_n_steps": [2, 4, 8],
    "max_divergence": [0.002, 0.005, 0.01, 0.02],
}
GATES = {"sft": 0.55, "diffusion_dpo": 0.5}


def searched(name: str) -> list[str]:
    """The hyperparameters variant ``name`` has."""
    keys = ["learning_rate"] + ([] if name == "sft" else ["beta"])
    keys += ["every_n_steps"] if name in UPDATES else []
    return keys + (["max_divergence"] if name in CAPPED else [])


def trials(name: str, count: int, seed: int = 0) -> list[dict[str, float]]:
    """``count`` configurations of the variant's grid, drawn without replacement."""
    keys = searched(name)
    grid = list(itertools.product(*(SEARCH_SPACE[k] for k in keys)))
    order = np.random.default_rng(seed).permutation(len(grid))[: min(count, len(grid))]
    return [dict(zip(keys, grid[i], strict=True)) for i in sorted(order)]


def variant_config(base: dict, name: str, hparams: dict[str, float]) -> dict:
    """``base`` (the full method) with the components of ``name`` and ``hparams``."""
    config = copy.deepcopy(base)
    model = config["model"]["init_args"]
    callbacks = config["trainer"].get("callbacks") or []
    update = next(c for c in callbacks if c["class_path"] == REFERENCE_UPDATE)
    config["trainer"]["callbacks"] = [c for c in callbacks if c["class_path"] != REFERENCE_UPDATE]
    if name in UPDATES:
        update = copy.deepcopy(update)
        update["init_args"]["every_n_steps"] = hparams["every_n_steps"]
        update["init_args"]["max_divergence"] = hparams.get("max_divergence")
        update["init_args"]["on_exceed"] = "reinit" if name == "reinit" else "freeze"
        config["trainer"]["callbacks"].append(update)
    if name not in TIMESTEP_AWARE:
        sampler = config["data"]["init_args"]["timestep_sampler"]
        config["data"]["init_args"]["timestep_sampler"] = {
            "class_path": "lightning_refdpo.UniformTimestepSampler",
            "init_args": {"num_train_timesteps": sampler["init_args"]["num_train_timesteps"]},
        }
        model["reward_scale"] = False
    model["learning_rate"] = hparams["learning_rate"]
    if name == "sft":
        model["loss_type"] = "sft"
    else:
        model["beta"] = hparams["beta"]
    return config


def run_key(name: str, hparams: dict, seed: int, split: str, steps: int, eval_seeds: int) -> str:
    text = json.dumps([name, hparams, seed, split, steps, eval_seeds], sort_keys=True)
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
    path = work_dir / f"base_{split}_eval{eval_seeds}.json"
    if not path.exists():
        prompts = VALIDATION_PROMPTS if split == "validation" else TEST_PROMPTS
        items = evaluation_items(list(prompts), list(range(eval_seeds)))
        _, parts = toy_scores(load_pipeline(model, "cpu")[0], items, GenerationConfig(**GENERATION))
        path.write_text(json.dumps({k: v.tolist() for k, v in parts.items()}))
    return {k: torch.tensor(v) for k, v in json.loads(path.read_text()).items()}


def aggregate(search: dict, test: dict, base: dict, args: argparse.Namespace) -> dict:
    baseline = base["score"]
    results: dict[str, Any] = {
        "base": {"reward_mean": float(baseline.mean()), "attributes": attribute_summary(base)},
        "setup": {
            "config": str(args.config.relative_to(ROOT))
            if args.config.is_relative_to(ROOT)
            else str(args.config),
            "max_steps": args.max_steps,
            "trials_per_variant": args.trials,
            "search_space": SEARCH_SPACE,
            "seeds": args.seeds,
            "test_prompts": len(TEST_PROMPTS),
            "validation_prompts": len(VALIDATION_PROMPTS),
            "eval_seeds": args.eval_seeds,
            "generation": GENERATION,
            "command": "python " + " ".join(sys.argv),
        },
        "variants": {},
    }
    num_prompts = len(TEST_PROMPTS)
    for name in args.variants:
        runs = {r["seed"]: r for r in test[name]}
        seeds = sorted(runs)
        scores = {s: torch.tensor(runs[s]["scores"]) for s in seeds}
        means = [float(scores[s].mean()) for s in seeds]
        outcomes = torch.stack([win_outcomes(scores[s], baseline) for s in seeds]).view(
            len(seeds), num_prompts, -1
        )
        dpo = {r["seed"]: torch.tensor(r["scores"]) for r in test.get("diffusion_dpo", [])}
        versus_dpo = [win_rate(scores[s], dpo[s]) for s in seeds if s in dpo]
        refs = [runs[s]["reference"] for s in seeds if runs[s]["reference"]]
        results["variants"][name] = {
            "hparams": test[name][0]["hparams"],
            "search": [
                {"hparams": r["hparams"], "validation_reward": r["reward_mean"]} for r in search[name]
            ],
            "reward_mean": statistics.mean(means),
            "reward_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "win_rate_vs_base": float(outcomes.mean()),
            "win_rate_vs_base_ci": list(bootstrap_ci(outcomes)),
            "win_rate_vs_dpo": statistics.mean(versus_dpo) if versus_dpo else None,
            "attributes": {
                a: statistics.mean(runs[s]["attributes"][a]["mean"] for s in seeds)
                for a in runs[seeds[0]]["attributes"]
            },
            "attributes_correct": {
                a: statistics.mean(runs[s]["attributes"][a]["correct"] for s in seeds)
                for a in runs[seeds[0]]["attributes"]
            },
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
                str(s): {"reward_mean": means[i], "win_rate_vs_base": win_rate(scores[s], baseline)}
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
    return results


def table(results: dict) -> str:
    base = results["base"]
    setup = results["setup"]
    attributes = list(base["attributes"])
    lines = [
        f"Test ToyReward ({setup['test_prompts']} prompts x {setup['eval_seeds']} seeds per run, "
        f"{len(setup['seeds'])} training seeds, {setup['max_steps']} steps); each variant's hyperparameters "
        f"chosen on the {setup['validation_prompts']} validation prompts ({setup['trials_per_variant']} trials "
        "each). Win rate: mean over seeds, 95 % bootstrap interval over prompts and seeds; against "
        "Diffusion-DPO: same training seed. Attributes: mean ToyReward part.",
        "",
        "| variant | hyperparameters | reward | win vs base [95 % CI] | win vs DPO | "
        + " | ".join(attributes)
        + " | divergence | ref. updates (frozen runs) |",
        "| --- | --- | ---: | ---: | ---: | " + "---: | " * len(attributes) + "---: | ---: |",
        f"| base | - | {base['reward_mean']:.4f} | - | - | "
        + " | ".join(f"{base['attributes'][a]['mean']:.3f}" for a in attributes)
        + " | - | - |",
    ]
    for name, v in results["variants"].items():
        low, high = v["win_rate_vs_base_ci"]
        hp = ", ".join(
            f"{k.replace('learning_rate', 'lr').replace('every_n_steps', 'tau').replace('max_divergence', 'delta')} {x:g}"
            for k, x in v["hparams"].items()
        )
        dpo = "-" if v["win_rate_vs_dpo"] is None else f"{100 * v['win_rate_vs_dpo']:.1f}%"
        ref = v["reference"]
        ref_text = "-" if ref is None else f"{ref['updates']:.1f} ({ref['frozen_runs']}/{len(v['seeds'])})"
        if ref and ref["reinits"]:
            ref_text += f", {ref['reinits']:.1f} re-inits"
        lines.append(
            f"| {name} | {hp} | {v['reward_mean']:.4f} +- {v['reward_std']:.4f} | "
            f"{100 * v['win_rate_vs_base']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] | {dpo} | "
            + " | ".join(f"{v['attributes'][a]:.3f}" for a in attributes)
            + f" | {v['divergence_from_init']:.5f} | {ref_text} |"
        )
    gates = "; ".join(
        f"{n} {'passes' if g['passed'] else 'FAILS'} (win {100 * g['win_rate_vs_base']:.1f}% > {100 * g['threshold']:.0f}%, CI low {100 * g['ci'][0]:.1f}%)"
        for n, g in results["gates"].items()
    )
    lines += ["", f"Gates: {gates}."]
    if "target" in results:
        lines.append(
            f"Target (full method: win rate >= {100 * TARGET_WIN_RATE:.0f}% with CI low > 50%): "
            f"{'met' if results['target']['passed'] else 'NOT met'}."
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
        key = run_key(name, hparams, seed, split, common["steps"], args.eval_seeds)
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--trials", type=int, default=4, help="search trials per variant")
    parser.add_argument("--eval-seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "toy_alignment")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "toy_alignment.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "benchmarks" / "README.md")
    parser.add_argument("--search-only", action="store_true", help="stop after the search")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = yaml.safe_load(args.config.read_text())
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
    search_jobs = {
        n: jobs_for(n, trials(n, args.trials), [0], "validation", common, args) for n in args.variants
    }
    records = run_all([j for jobs in search_jobs.values() for j in jobs], args.jobs)
    search = {n: [r for r in records if r["variant"] == n] for n in args.variants}
    chosen = {n: max(search[n], key=lambda r: r["reward_mean"])["hparams"] for n in args.variants}
    for name, hparams in chosen.items():
        print(f"{name}: chose {hparams} on the validation prompts", flush=True)
    if args.search_only:
        return
    test_jobs = [j for n in args.variants for j in jobs_for(n, [chosen[n]], args.seeds, "test", common, args)]
    records = run_all(test_jobs, args.jobs)
    test = {n: [r for r in records if r["variant"] == n] for n in args.variants}
    model = base["model"]["init_args"]["pretrained_model_name_or_path"]
    results = aggregate(search, test, base_scores(model, "test", args.eval_seeds, args.work_dir), args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    write_readme_table(table(results), args.readme, args.output.stem)
    print(table(results))


if __name__ == "__main__":
    main()
