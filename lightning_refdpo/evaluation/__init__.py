"""Generate images for prompts with fixed seeds, score them and compare with a baseline.

Shared by the ``PreferenceEvaluation`` callback and ``lightning-refdpo evaluate``. An evaluation item
is a (prompt, seed) pair; the items are ordered prompt-major, so a model and its baseline produce
paired scores for the win rate (the share of items where the model scores higher).

- ``generation.py``: sampler settings, pipelines (both sides of a comparison from one code path),
  image generation;
- ``scoring.py``: reward scores, win rates, bootstrap confidence intervals;
- ``streaming.py``: generate, score and forget a batch at a time, with a resumable index on disk;
- ``report.py``: the results in the paper's layout (JSON and Markdown);
- ``images.py``: image grids for the logs;
- ``command.py``: ``lightning-refdpo evaluate``.
"""

from lightning_refdpo.evaluation.command import evaluate_model
from lightning_refdpo.evaluation.generation import (
    GenerationConfig,
    evaluation_items,
    generate,
    in_dtype,
    load_pipeline,
    with_scheduler,
)
from lightning_refdpo.evaluation.images import image_grid, log_image
from lightning_refdpo.evaluation.report import results_table
from lightning_refdpo.evaluation.scoring import compare, paper_scorers, score

__all__ = [
    "GenerationConfig",
    "compare",
    "evaluate_model",
    "evaluation_items",
    "generate",
    "image_grid",
    "in_dtype",
    "load_pipeline",
    "log_image",
    "paper_scorers",
    "results_table",
    "score",
    "with_scheduler",
]
