"""The paper's mechanisms, made visible in the toy world (figures 1b, 2 and 4 of arXiv 2505.18736).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_mechanisms.py --jobs 2

Every run is ``configs/demo.yaml`` (the full method with the hyperparameters chosen on the
validation prompts by ``benchmarks/toy_alignment.py``), trained through the CLI with training seed 0:

* ``toy_divergence.png`` (Fig. 1b): the reference update with and without the cap, trained
  ``--long-steps`` steps (longer than the demo, so that the uncapped reference drifts): the
  divergence estimate ``D`` of the candidate reference at every update event and the training
  reward margin ``h`` at every step, each logged by the run itself (a CSV log).
* ``toy_implicit_reward.png`` (Fig. 2): Diffusion-DPO (no reference update, uniform timesteps): on the
  validation pairs, the mean implicit reward ``h`` and the implicit accuracy ``mean(h > 0)`` in 10
  timestep intervals (``ImplicitRewardByTimestep``), after training.
* ``toy_tau_sweep.png`` (Fig. 4): the full method with ``tau`` in ``--taus``, with the cap and
  without it: win rate against the base model on the test prompts.

The numbers behind the figures go to ``benchmarks/results/toy_mechanisms.json``. Runs are kept in
``--work-dir`` and skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib
import torch
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from toy_alignment import REFERENCE_UPDATE, base_scores, divergence_batch, jobs_for, run_all  # noqa: E402

from lightning_refdpo.metrics import win_rate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPLICIT_REWARD = {"class_path": "lightning_refdpo.callbacks.ImplicitRewardByTimestep", "init_args": {}}


def method_hparams(base: dict) -> dict:
    """The demo config's hyperparameters in the ablation's terms."""
    model = base["model"]["init_args"]
    update = next(c for c in base["trainer"]["callbacks"] if c["class_path"] == REFERENCE_UPDATE)["init_args"]
    return {
        "learning_rate": model["learning_rate"],
        "beta": model["beta"],
        "every_n_steps": update["every_n_steps"],
        "max_divergence": update["max_divergence"],
    }


def read_log(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged series of a CSV log as ``(step, value)`` pairs."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(Path(log_dir) / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def plot_divergence(runs: dict[str, dict], path: Path) -> dict:
    figures = {}
    fig, (ax_d, ax_h) = plt.subplots(1, 2, figsize=(10, 3.4))
    for label, record in runs.items():
        series = read_log(record["log_dir"])
        divergence = series.get("ref/divergence", [])
        margin = series.get("train/reward_margin_step", series.get("train/reward_margin", []))
        figures[label] = {"divergence": divergence, "reward_margin": margin, "reference": record["reference"]}
        if divergence:
            ax_d.plot(*zip(*divergence, strict=True), marker="o", ms=3, label=label)
        if margin:
            steps, values = zip(*margin, strict=True)
            smooth = torch.tensor(values).unfold(0, min(5, len(values)), 1).mean(1)
            ax_h.plot(steps[len(steps) - len(smooth) :], smooth, label=label)
    if "capped" in runs:
        delta = runs["capped"]["hparams"]["max_divergence"]
        ax_d.axhline(delta, color="grey", ls="--", lw=0.8, label=f"delta = {delta:g}")
    ax_d.set(xlabel="step", ylabel="D(candidate || init)", title="Reference divergence at update events")
    ax_h.set(xlabel="step", ylabel="reward margin h (5-step mean)", title="Training reward margin")
    ax_d.legend()
    ax_h.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return figures


def plot_implicit_reward(record: dict, path: Path) -> dict:
    tables = sorted(
        Path(record["log_dir"], "implicit_reward").glob("step*.json"), key=lambda p: int(p.stem[4:])
    )
    table = json.loads(tables[-1].read_text())
    centres = [(lo + hi) / 2 for lo, hi in table["intervals"]]
    width = 0.8 * (table["intervals"][0][1] - table["intervals"][0][0])
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax_r.bar(centres, table["mean_implicit_reward"], width=width)
    ax_r.set(
        xlabel="timestep t (high = noisy)",
        ylabel="mean implicit reward h",
        title="Implicit reward by timestep",
    )
    ax_a.plot(centres, table["implicit_accuracy"], marker="o")
    ax_a.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_a.set(xlabel="timestep t (high = noisy)", ylabel="mean(h > 0)", title="Implicit accuracy", ylim=(0, 1))
    fig.suptitle(f"Diffusion-DPO after {table['step']} steps, validation pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return table


def plot_tau_sweep(sweep: dict[str, dict[int, float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, points in sweep.items():
        taus = sorted(points)
        ax.plot(taus, [100 * points[t] for t in taus], marker="o", label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="tau (steps between reference updates)",
        ylabel="win rate vs base (%)",
        title="tau sweep, test prompts",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--taus", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--long-steps", type=int, default=120)
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "toy_mechanisms")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = yaml.safe_load(args.config.read_text())
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = base["data"]["init_args"]
    common = {
        "base": base,
        "steps": base["trainer"]["max_steps"],
        "eval_seeds": args.eval_seeds,
        "threads": 1,
        "divergence_batch": divergence_batch(Path(data["data_files"]["validation"]), data["latent_columns"]),
    }
    method = method_hparams(base)
    uncapped = {**method, "max_divergence": None}

    long = {**common, "steps": args.long_steps, "log_every_step": True}
    divergence_jobs = jobs_for("full", [method], [0], "validation", long, args)
    divergence_jobs += jobs_for("full", [uncapped], [0], "validation", long, args)
    implicit = {**common, "log_every_step": True, "callbacks": [IMPLICIT_REWARD], "validate_after": True}
    dpo_hparams = {"learning_rate": method["learning_rate"], "beta": method["beta"]}
    implicit_jobs = jobs_for("diffusion_dpo", [dpo_hparams], [0], "validation", implicit, args)
    sweep_configs = [{**method, "every_n_steps": t} for t in args.taus]
    sweep_jobs = jobs_for("full", sweep_configs, [0], "test", common, args)
    sweep_jobs += jobs_for(
        "full", [{**c, "max_divergence": None} for c in sweep_configs], [0], "test", common, args
    )
    records = run_all(divergence_jobs + implicit_jobs + sweep_jobs, args.jobs)
    by_job = dict(
        zip((j["record"] for j in divergence_jobs + implicit_jobs + sweep_jobs), records, strict=True)
    )

    args.results.mkdir(parents=True, exist_ok=True)
    capped, free = (by_job[j["record"]] for j in divergence_jobs)
    divergence = plot_divergence({"capped": capped, "no cap": free}, args.results / "toy_divergence.png")
    implicit_table = plot_implicit_reward(
        by_job[implicit_jobs[0]["record"]], args.results / "toy_implicit_reward.png"
    )
    model = base["model"]["init_args"]["pretrained_model_name_or_path"]
    baseline = base_scores(model, "test", args.eval_seeds, args.work_dir)["score"]
    sweep: dict[str, dict[int, float]] = {"with cap": {}, "without cap": {}}
    for job in sweep_jobs:
        record = by_job[job["record"]]
        label = "without cap" if job["hparams"]["max_divergence"] is None else "with cap"
        sweep[label][job["hparams"]["every_n_steps"]] = win_rate(torch.tensor(record["scores"]), baseline)
    plot_tau_sweep(sweep, args.results / "toy_tau_sweep.png")
    summary = {
        "config": str(args.config.relative_to(ROOT))
        if args.config.is_relative_to(ROOT)
        else str(args.config),
        "method": method,
        "long_steps": args.long_steps,
        "divergence": divergence,
        "implicit_reward_by_timestep": implicit_table,
        "tau_sweep_win_rate_vs_base": sweep,
    }
    (args.results / "toy_mechanisms.json").write_text(json.dumps(summary, indent=2))
    for label, points in sweep.items():
        print(label, {t: f"{100 * w:.1f}%" for t, w in sorted(points.items())})


if __name__ == "__main__":
    main()
