"""``lightning-refdpo``: ``fit`` and ``validate`` (LightningCLI) plus ``cache``, ``evaluate`` and ``export``.

    lightning-refdpo fit --config configs/sd15_refdpo.yaml
    lightning-refdpo fit --config configs/tiny.yaml --trainer.max_steps 4
    lightning-refdpo cache --config configs/sdxl_refdpo.yaml --output cache/pickapic_sdxl
    lightning-refdpo evaluate outputs/.../last.ckpt --prompt_sets '[pickapic_v2_test, partiprompts, hpdv2]'
    lightning-refdpo export --ckpt_path outputs/.../last.ckpt --output exports/refdpo [--pipeline true]

Model and data are given by ``class_path`` so a subclass from another project plugs in unchanged.
:func:`main` is the console script (an exit status); :func:`run_cli` runs the same commands in
Python and returns the :class:`RefDPOCLI`, whose ``result`` holds what ``cache``, ``evaluate`` and
``export`` produced.
"""

from __future__ import annotations

import difflib
import inspect
import re
import signal
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_refdpo.callbacks.checkpointing import (
    ExceptionCheckpoint,
    FinalStepCheckpoint,
    latest_checkpoint,
    logger_version,
)
from lightning_refdpo.callbacks.progress import sane_progress_bar
from lightning_refdpo.data import PreferenceDataModule
from lightning_refdpo.guard import NonFiniteLossError, UndecodablePairsError
from lightning_refdpo.hub import ModelLoadError
from lightning_refdpo.module import DiffusionDPOModule

DESCRIPTION = (
    "Diffusion-DPO with reference-model updates and timestep-aware optimization (arXiv 2505.18736): "
    "train, validate, cache latents, evaluate and export."
)
TOOLS = {
    "cache": "Encode the config's preference pairs into a latent cache (VAE posteriors, text embeddings).",
    "evaluate": "Generate images for prompt sets and score them against a baseline.",
    "export": "Export the policy of a training checkpoint for diffusers, with a model card.",
}
JSONARGPARSE_REPORT = "Does not validate against any of the Union subtypes"
EXIT_USAGE = 2
EXIT_SIGTERM = 128 + signal.SIGTERM
# Errors that a user fixes in the config, the data or the model path: shown as one line, no traceback.
USER_ERRORS = (
    ValueError,
    KeyError,
    ModelLoadError,
    FileNotFoundError,
    PermissionError,
    NonFiniteLossError,
    UndecodablePairsError,
)


def main(args: list[str] | None = None) -> int:
    """The console script: run the command of ``args`` (default: ``sys.argv[1:]``).

    Exit status 0 on success; 143 (128 + SIGTERM) when the run was terminated (its checkpoint is
    saved first); 2 for an option or config error, a model that cannot be loaded or bad data,
    reported as one line on stderr.
    """
    try:
        run_cli(args)
    except SIGTERMException:
        return EXIT_SIGTERM
    except USER_ERRORS as err:
        print(f"lightning-refdpo: error: {user_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def user_message(err: BaseException) -> str:
    """The first line of ``err``, or of the check that failed inside jsonargparse's report of a
    class that could not be instantiated (which dumps the whole parsed namespace)."""
    while err.__cause__ is not None and JSONARGPARSE_REPORT in str(err):
        err = err.__cause__
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(err).__name__


def run_cli(args: list[str] | None = None) -> RefDPOCLI:
    """Run a ``lightning-refdpo`` command in this process and return the CLI object (its
    ``trainer``, ``model``, ``datamodule`` and ``result``). Errors are raised, not printed."""
    return build_cli(args)


def build_cli(args: list[str] | None, run: bool = True) -> RefDPOCLI:
    """The CLI over any ``DiffusionDPOModule`` and ``PreferenceDataModule`` subclass; ``run=False``
    only builds the model, data and trainer of ``args`` (no subcommand)."""
    return RefDPOCLI(
        DiffusionDPOModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_class=RefDPOArgumentParser,
        parser_kwargs={"prog": "lightning-refdpo", "description": DESCRIPTION},
        run=run,
        args=args,
    )


class RefDPOArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one line naming the offending key (not the whole
    usage and jsonargparse's nested report), with the nearest valid option after an unknown one."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:  # jsonargparse is trying alternatives: let it go on
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {one_line(message)}{suggestion(parser, message)}\n")
        sys.stderr.write(f"See: {prog} --help\n")
        sys.exit(EXIT_USAGE)


SKIPPED_REPORT_LINES = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "- Problem with given")


def one_line(message: str) -> str:
    """jsonargparse's nested error report as ``key.path: innermost error``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys = [re.match(r'Parser key "([^"]+)":\s*(.*)', line) for line in lines]
    found = [(i, m) for i, m in enumerate(keys) if m]
    if not found:
        return lines[0] if lines else message
    last, match = found[-1]
    rest = [match.group(2)] + lines[last + 1 :]
    detail = next((line for line in rest if line and not line.startswith(SKIPPED_REPORT_LINES)), "")
    return f"{'.'.join(m.group(1) for _, m in found)}: {detail.removeprefix('- ')}"


def suggestion(parser: Any, message: str) -> str:
    """`` (did you mean --x?)`` for the unknown options of an "unrecognized arguments" report, or
    an init argument that a ``--model`` / ``--data`` class does not accept."""
    unknown = re.findall(r"--[\w.-]+", message.partition("nrecognized arguments:")[2])
    keys = re.findall(r'Parser key "([^"]+)"', message)
    unknown += [
        f"--{keys[0]}.init_args.{name}" for name in re.findall(r"Option '(\w+)' is not accepted", message)
    ]
    if not unknown:
        return ""
    known = option_names(parser)
    close = [m for name in unknown for m in difflib.get_close_matches(name, known, n=1, cutoff=0.7)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def option_names(parser: Any) -> list[str]:
    """The options of ``parser`` and of its subcommands, and ``--model.init_args.*`` /
    ``--data.init_args.*`` for the parameters of the base model and data classes."""
    names = [s for s in parser._option_string_actions if s.startswith("--")]
    subcommands = getattr(parser, "_subcommands_action", None)
    for subparser in subcommands._name_parser_map.values() if subcommands else ():
        names += option_names(subparser)
    for key, cls in (("model", DiffusionDPOModule), ("data", PreferenceDataModule)):
        if f"--{key}" in names:
            names += [f"--{key}.init_args.{p}" for p in inspect.signature(cls).parameters]
    return names


class RefDPOCLI(LightningCLI):
    """``LightningCLI`` with the run lifecycle of a command-line tool.

    - ``fit`` adds :class:`~lightning_refdpo.callbacks.checkpointing.ExceptionCheckpoint` (an
      interrupted or failed run saves ``<default_root_dir>/on_exception.ckpt`` once it has taken a
      step, never over a later step) and ``FinalStepCheckpoint`` (``last.ckpt`` and a checkpoint
      after the last step). It resumes only when asked: ``--ckpt_path PATH``, ``--ckpt_path last``
      (the checkpoint of the highest step under ``default_root_dir``), or, on SLURM, the
      ``hpc_ckpt_<n>.ckpt`` that Lightning's ``SLURMEnvironment`` saved before requeueing the job.
      A resumed run logs into the logger version it was checkpointed in.
    - ``test`` and ``predict`` are not offered (the module has no test or predict step).
    - ``cache``, ``evaluate`` and ``export`` are subcommands of the same parser, so ``--help``
      lists them and each has its own ``--help``.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, description in TOOLS.items():
            subparser = getattr(self, f"{name}_parser")(description)
            self._subcommand_parsers[name] = subparser
            parser._subcommands_action.add_subcommand(name, subparser, help=description)

    def cache_parser(self, description: str) -> LightningArgumentParser:
        parser = self.init_parser(description=description)
        self._add_arguments(parser)
        parser.add_argument("--output", required=True, help="Folder of the latent cache.")
        parser.add_argument("--cache_batch_size", type=int, default=8, help="Pairs encoded at a time.")
        return parser

    def evaluate_parser(self, description: str) -> LightningArgumentParser:
        from lightning_refdpo.evaluation import evaluate_model

        parser = self.init_parser(description=description)
        parser.add_function_arguments(evaluate_model, as_positional=True)
        return parser

    def export_parser(self, description: str) -> LightningArgumentParser:
        from lightning_refdpo.export import export_checkpoint

        parser = self.init_parser(description=description)
        parser.add_function_arguments(export_checkpoint)
        return parser

    # ------------------------------------------------------------------ LightningCLI steps
    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") not in ("evaluate", "export"):
            super()._parse_ckpt_path()

    def _set_seed(self) -> None:
        if self.config.get("subcommand") not in ("evaluate", "export"):
            super()._set_seed()

    def instantiate_classes(self) -> None:
        if self.subcommand in ("evaluate", "export"):
            self.config_init = self.parser.instantiate_classes(self.config)
            self.model = self.datamodule = self.trainer = None
            return
        super().instantiate_classes()
        bar = sane_progress_bar(self.trainer.progress_bar_callback)
        if bar is not None:
            callbacks = self.trainer.callbacks
            callbacks[callbacks.index(self.trainer.progress_bar_callback)] = bar

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in TOOLS:
            self.result = getattr(self, f"run_{subcommand}")(self.config_init[subcommand])
        else:
            super()._run_subcommand(subcommand)

    # ------------------------------------------------------------------ fit
    def fit(self, model: DiffusionDPOModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer.callbacks += [ExceptionCheckpoint(trainer.default_root_dir), FinalStepCheckpoint()]
        if ckpt_path == "last":
            ckpt_path = latest_checkpoint(trainer.default_root_dir)
            rank_zero_info(
                f"resuming from {ckpt_path}" if ckpt_path else "no checkpoint to resume: a new run"
            )
        if ckpt_path is not None:
            keep_logger_version(trainer, ckpt_path)
        trainer.fit(model, ckpt_path=None if ckpt_path is None else str(ckpt_path), **kwargs)

    # ------------------------------------------------------------------ tools
    def run_cache(self, config: Namespace) -> Path:
        """Encode the config's train and validation pairs with its model's VAE and text encoder into
        a latent cache; train from it with ``--data.init_args.latent_cache DIR``."""
        from lightning_refdpo.data.latent_cache import write_latent_cache
        from lightning_refdpo.data.preference import PairTransform

        data, module = self.datamodule, self.model.to(self.trainer.strategy.root_device).eval()
        transform = PairTransform(data.hparams.resolution, random_crop=False, random_flip=False)
        hp = data.hparams
        splits = {"train": data.load_pairs(hp.train_split, hp.max_train_samples, transform)}
        if hp.validation_split:
            splits["validation"] = data.load_pairs(hp.validation_split, hp.max_validation_samples, transform)
        path = write_latent_cache(module.backbone, splits, config.output, config.cache_batch_size)
        print(f"latent cache written to {path}; train with --data.init_args.latent_cache {path}")
        return Path(path)

    def run_evaluate(self, config: Namespace) -> dict:
        from lightning_refdpo.evaluation import evaluate_model
        from lightning_refdpo.sources import check_model_source, check_writable_folder

        check_writable_folder(config.output, "--output")
        for option in ("model", "baseline"):
            if config[option] is not None:
                config[option] = check_model_source(
                    config[option], f"--{option}" if option != "model" else "model"
                )
        return evaluate_model(**function_kwargs(evaluate_model, config))

    def run_export(self, config: Namespace) -> Path:
        from lightning_refdpo.export import export_checkpoint

        return export_checkpoint(**function_kwargs(export_checkpoint, config))


def function_kwargs(function: Any, config: Namespace) -> dict[str, Any]:
    """The parsed values of ``function``'s parameters."""
    return {name: config[name] for name in inspect.signature(function).parameters if name in config}


def keep_logger_version(trainer: Any, ckpt_path: str | Path) -> None:
    """Point the run's ``TensorBoardLogger`` at the version the checkpoint was written in, so a
    resumed run continues its curves instead of starting ``version_<n+1>``. TensorBoard appends a
    new event file there; other loggers are left alone (``CSVLogger`` would delete the metrics it
    finds in an existing version)."""
    version = logger_version(ckpt_path)
    if version is not None and isinstance(trainer.logger, TensorBoardLogger):
        trainer.logger._version = version


if __name__ == "__main__":
    sys.exit(main())
