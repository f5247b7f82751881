"""The results of ``lightning-refdpo evaluate`` in the paper's layout: per prompt set the mean of
every scorer for baseline and model and the model's win rate, each with its 95 % bootstrap
confidence interval; for HPDv2 also the mean of each of its four styles and their average, as the
HPSv2 benchmark reports them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_refdpo.evaluation.scoring import bootstrap_intervals
from lightning_refdpo.metrics import win_rate


def summarize(
    scores: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray],
    groups: Sequence[str],
    num_bootstrap: int = 1000,
) -> dict:
    """``{"scores": {scorer: {model_mean, model_ci, baseline_mean, baseline_ci, win_rate,
    win_rate_ci}}}`` over all items; with several ``groups`` (one label per item: HPDv2's styles)
    also ``"styles"`` (means and win rate per group) and ``"style_average"`` (their averages)."""
    entry = {"scores": {}}
    for name in scores:
        entry["scores"][name] = {
            "model_mean": float(scores[name].mean()),
            "baseline_mean": float(baseline[name].mean()),
            "win_rate": win_rate(scores[name], baseline[name]),
            **bootstrap_intervals(scores[name], baseline[name], num_bootstrap),
        }
    labels = np.asarray(groups)
    styles = list(dict.fromkeys(groups))
    if len(styles) > 1:
        entry["styles"] = {
            style: {
                name: {
                    "model_mean": float(scores[name][labels == style].mean()),
                    "baseline_mean": float(baseline[name][labels == style].mean()),
                    "win_rate": win_rate(scores[name][labels == style], baseline[name][labels == style]),
                }
                for name in scores
            }
            for style in styles
        }
        entry["style_average"] = {
            name: {
                key: float(np.mean([entry["styles"][s][name][key] for s in styles]))
                for key in ("model_mean", "baseline_mean", "win_rate")
            }
            for name in scores
        }
    return entry


def _cell(figures: dict, key: str, percent: bool = False) -> str:
    """``mean [low, high]``: the figure and its interval when the results hold one (win rates in %)."""
    show = (lambda x: f"{100 * x:.1f}") if percent else (lambda x: f"{x:.4g}")
    text = show(figures[key]) + ("%" if percent else "")
    interval = figures.get(key.replace("_mean", "") + "_ci")
    return text + (f" [{show(interval[0])}, {show(interval[1])}]" if interval else "")


def results_table(results: dict) -> str:
    """Markdown: per prompt set, the means of baseline and model and the model's win rate (95 %
    bootstrap interval in brackets); for HPDv2 then each style and the average of the styles."""
    lines = []
    for source, entry in results["prompt_sets"].items():
        names = list(entry["scores"])
        lines += [f"### {source} ({entry['num_prompts']} prompts, {entry['num_images']} images)", ""]
        lines += ["| model | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        for label, key in ((results["baseline"], "baseline_mean"), (results["model"], "model_mean")):
            lines.append(f"| {label} | " + " | ".join(_cell(entry["scores"][n], key) for n in names) + " |")
        lines.append(
            "| win rate vs baseline | "
            + " | ".join(_cell(entry["scores"][n], "win_rate", percent=True) for n in names)
            + " |"
        )
        if "styles" in entry:
            rows = {**entry["styles"], "average": entry["style_average"]}
            lines += ["", "| style: model / baseline (win rate) | " + " | ".join(names) + " |"]
            lines.append("| --- |" + " --- |" * len(names))
            for style, figures in rows.items():
                cells = [
                    f"{figures[n]['model_mean']:.4g} / {figures[n]['baseline_mean']:.4g} "
                    f"({100 * figures[n]['win_rate']:.1f}%)"
                    for n in names
                ]
                lines.append(f"| {style} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
