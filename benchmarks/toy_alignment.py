"""The paper's ablation (Tables 3 and 4 of arXiv 2505.18736, METHOD.md section 4), reproduced small
in the toy world: six variants, the same budget, several training seeds each.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_alignment.py            # all variants and seeds

Every variant is ``configs/demo.yaml`` (the full method) with components switched off; all share
its model, data, optimizer, learning rate, beta, batch and number of steps:

| variant | reference update | cap (``max_divergence``) | on exceeding | timestep-aware (sampler + ``lambda(t)``) |
| --- | --- | --- | --- | --- |
| ``diffusion_dpo`` | no | - | - | no |
| ``timestep_aware_only`` | no | - | - | yes |
| ``ref_update_no_cap`` | yes | none | - | no |
| ``ref_update_cap`` | yes | demo's delta | freeze | no |
| ``reinit`` | yes | demo's delta | re-init | yes |
| ``full`` | yes | demo's delta | freeze | yes |

Each run is trained through the CLI (``lightning-refdpo fit`` in this process, training seed =
``seed_everything``), then sampled on the held-out prompts (``EVAL_PROMPTS`` x ``--eval-seeds``,
the same items for every run and for the base model) and scored with ToyReward. Per run it also
estimates the policy's divergence from the initial model, ``mean(mse_theta(x^w) - mse_init(x^w))``
(the estimate of the reference update's cap) on the validation winners with fixed noise and
timesteps. A finished run is kept in ``--work-dir`` and skipped when the script runs again, so runs
can be split over processes (``--variants``, ``--seeds``) and gathered by a last call without them.

Written: ``benchmarks/results/toy_alignment.json`` (``base``, ``variants``: per variant the mean and
standard deviation over training seeds of the mean held-out reward, the win rates against the base
model and against Diffusion-DPO of the same training seed, averaged over seeds, and the divergence)
and the table between the markers named after the output (``<!-- toy_alignment:start -->``, ...) of
``benchmarks/README.md``. ``--max-divergence`` sets the cap of the capped variants; cached runs do
not record it, so give each cap its own ``--work-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from lightning_refdpo.data.preference import PairTransform, decode_image
from lightning_refdpo.data.toy import EVAL_PROMPTS
from lightning_refdpo.evaluation import GenerationConfig, evaluation_items, load_pipeline
from lightning_refdpo.metrics import win_rate
from lightning_refdpo.toy_demo import GENERATION, fit, toy_scores

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("diffusion_dpo", "timestep_aware_only", "ref_update_no_cap", "ref_update_cap", "reinit", "full")
REFERENCE_UPDATE = "lightning_refdpo.callbacks.ReferenceModelUpdate"


def variant_config(base: dict, name: str) -> dict:
    """``base`` (the full method) with the components of ``name`` only."""
    config = copy.deepcopy(base)
    callbacks = config["trainer"].get("callbacks") or []
    update = next(c for c in callbacks if c["class_path"] == REFERENCE_UPDATE)
    config["trainer"]["callbacks"] = [c for c in callbacks if c["class_path"] != REFERENCE_UPDATE]
    if name in ("ref_update_no_cap", "ref_update_cap", "reinit", "full"):
        update = copy.deepcopy(update)
        if name == "ref_update_no_cap":
            update["init_args"]["max_divergence"] = None
        update["init_args"]["on_exceed"] = "reinit" if name == "reinit" else "freeze"
        config["trainer"]["callbacks"].append(update)
    if name not in ("timestep_aware_only", "reinit", "full"):
        sampler = config["data"]["init_args"]["timestep_sampler"]
        config["data"]["init_args"]["timestep_sampler"] = {
            "class_path": "lightning_refdpo.UniformTimestepSampler",
            "init_args": {"num_train_timesteps": sampler["init_args"]["num_train_timesteps"]},
        }
        config["model"]["init_args"]["reward_scale"] = False
    return config


def divergence_batch(path: Path, resolution: int) -> dict:
    """The winners of the strict pairs of a preference parquet, as a batch for ``estimate_divergence``."""
    import datasets

    rows = datasets.Dataset.from_parquet(str(path))
    transform = PairTransform(resolution, random_crop=False, random_flip=False)
    pixels, captions = [], []
    for row in rows:
        if row["label_0"] == 0.5:
            continue
        winner = decode_image(row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"])
        pixels.append(transform(winner, winner)["pixel_values"])
        captions.append(row["caption"])
    return {"pixel_values": torch.stack(pixels), "caption": captions}


@torch.no_grad()
def divergence_from_init(module, batch: dict, repeats: int = 4) -> float:
    """``mean(mse_theta(x^w) - mse_init(x^w))`` over ``batch``, ``repeats`` draws of (t, noise, z)."""
    torch.manual_seed(0)  # the latent draw of ``encode_batch``
    generator = torch.Generator().manual_seed(0)
    n = len(batch["caption"])
    return float(
        np.mean([module.estimate_divergence(batch, n, "policy", generator).item() for _ in range(repeats)])
    )


def run_one(name: str, seed: int, base: dict, args: argparse.Namespace, items, batch) -> dict:
    folder = args.work_dir / name / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    config = variant_config(base, name)
    config["seed_everything"] = seed
    config["trainer"]["default_root_dir"] = str(folder)
    config["trainer"]["max_steps"] = args.max_steps or config["trainer"]["max_steps"]
    config["trainer"].update({"enable_progress_bar": False, "enable_checkpointing": False, "logger": False})
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    module = fit(folder / "config.yaml")
    train_seconds = time.perf_counter() - start
    update = next((c for c in module.trainer.callbacks if type(c).__name__ == "ReferenceModelUpdate"), None)
    _, scores = toy_scores(module.build_pipeline(), items, GenerationConfig(**GENERATION))
    return {
        "variant": name,
        "seed": seed,
        "reward_mean": float(scores.mean()),
        "scores": scores.tolist(),
        "divergence_from_init": divergence_from_init(module, batch),
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
    }


def aggregate(runs: dict[tuple[str, int], dict], base_scores: torch.Tensor, args: argparse.Namespace) -> dict:
    results: dict = {
        "base": {"reward_mean": float(base_scores.mean())},
        "setup": {
            "config": str(args.config),
            "max_steps": args.max_steps,
            "max_divergence": args.max_divergence,
            "held_out_prompts": len(EVAL_PROMPTS),
            "eval_seeds": args.eval_seeds,
            "images_per_run": len(base_scores),
            "generation": GENERATION,
            "command": "python " + " ".join(sys.argv),
        },
        "variants": {},
    }
    for name in VARIANTS:
        seeds = sorted(s for (n, s) in runs if n == name)
        if not seeds:
            continue
        scores = {s: torch.tensor(runs[name, s]["scores"]) for s in seeds}
        means = [float(scores[s].mean()) for s in seeds]
        versus_dpo = [
            win_rate(scores[s], torch.tensor(runs["diffusion_dpo", s]["scores"]))
            for s in seeds
            if ("diffusion_dpo", s) in runs
        ]
        divergences = [runs[name, s]["divergence_from_init"] for s in seeds]
        results["variants"][name] = {
            "reward_mean": statistics.mean(means),
            "reward_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "win_rate_vs_base": statistics.mean(win_rate(scores[s], base_scores) for s in seeds),
            "win_rate_vs_dpo": statistics.mean(versus_dpo) if versus_dpo else None,
            "divergence_from_init": statistics.mean(divergences),
            "seeds": seeds,
            "per_seed": {
                str(s): {
                    "reward_mean": means[i],
                    "win_rate_vs_base": win_rate(scores[s], base_scores),
                    "divergence_from_init": divergences[i],
                    "reference": runs[name, s]["reference"],
                    "train_seconds": runs[name, s]["train_seconds"],
                }
                for i, s in enumerate(seeds)
            },
        }
    return results


def table(results: dict) -> str:
    base = results["base"]["reward_mean"]
    setup = results["setup"]
    lines = [
        f"Held-out ToyReward ({setup['held_out_prompts']} prompts x {setup['eval_seeds']} seeds = "
        f"{setup['images_per_run']} images per run); base model {base:.4f}. Mean +- standard deviation "
        "over training seeds; win rates are averaged over seeds (against Diffusion-DPO: same training seed).",
        "",
        "| variant | reward | gain vs base | win rate vs base | win rate vs Diffusion-DPO | divergence from init | reference updates (frozen runs) | seeds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in results["variants"].items():
        refs = [r["reference"] for r in v["per_seed"].values() if r["reference"]]
        ref_text = (
            f"{statistics.mean(r['updates'] for r in refs):.1f} ({sum(r['frozen'] for r in refs)}/{len(refs)})"
            if refs
            else "-"
        )
        if refs and any(r["reinits"] for r in refs):
            ref_text += f", {statistics.mean(r['reinits'] for r in refs):.1f} re-inits"
        dpo = "-" if v["win_rate_vs_dpo"] is None else f"{100 * v['win_rate_vs_dpo']:.1f}%"
        lines.append(
            f"| {name} | {v['reward_mean']:.4f} +- {v['reward_std']:.4f} | {v['reward_mean'] - base:+.4f} "
            f"| {100 * v['win_rate_vs_base']:.1f}% | {dpo} | {v['divergence_from_init']:.5f} | {ref_text} "
            f"| {len(v['seeds'])} |"
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--eval-seeds", type=int, default=4, help="images per held-out prompt")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--max-divergence",
        type=float,
        default=None,
        help="the cap delta of the capped variants (default: the config's)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "toy_alignment")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "toy_alignment.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "benchmarks" / "README.md")
    parser.add_argument("--no-write", action="store_true", help="run and keep the runs, write no results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = yaml.safe_load(args.config.read_text())
    args.max_steps = args.max_steps or base["trainer"]["max_steps"]
    update = next(c for c in base["trainer"]["callbacks"] if c["class_path"] == REFERENCE_UPDATE)["init_args"]
    if args.max_divergence is not None:
        update["max_divergence"] = args.max_divergence
    args.max_divergence = update["max_divergence"]
    data_args = base["data"]["init_args"]
    items = evaluation_items(list(EVAL_PROMPTS), list(range(args.eval_seeds)))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tag = f"steps{args.max_steps}_eval{args.eval_seeds}"

    base_file = args.work_dir / f"base_{tag}.json"
    if not base_file.exists():
        model = base["model"]["init_args"]["pretrained_model_name_or_path"]
        _, scores = toy_scores(load_pipeline(model, "cpu")[0], items, GenerationConfig(**GENERATION))
        base_file.write_text(json.dumps({"scores": scores.tolist()}))
    base_scores = torch.tensor(json.loads(base_file.read_text())["scores"])
    print(f"base model: held-out ToyReward {base_scores.mean():.4f}", flush=True)

    batch = divergence_batch(Path(data_args["data_files"]["validation"]), data_args["resolution"])
    runs = {}
    for seed in args.seeds:
        for name in args.variants:
            path = args.work_dir / f"{name}_seed{seed}_{tag}.json"
            if not path.exists():
                print(f"training {name}, seed {seed} ({args.max_steps} steps)", flush=True)
                path.write_text(json.dumps(run_one(name, seed, base, args, items, batch)))
            run = json.loads(path.read_text())
            runs[name, seed] = run
            print(
                f"{name} seed {seed}: reward {run['reward_mean']:.4f}, divergence "
                f"{run['divergence_from_init']:.5f}, reference {run['reference']}, {run['seconds']:.0f}s",
                flush=True,
            )
    if args.no_write:
        return
    results = aggregate(runs, base_scores, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    write_readme_table(table(results), args.readme, args.output.stem)
    print(table(results))


if __name__ == "__main__":
    main()
