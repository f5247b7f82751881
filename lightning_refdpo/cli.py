"""``lightning-refdpo``: ``fit`` and ``validate`` (LightningCLI) plus ``cache``, ``evaluate`` and ``export``.

    lightning-refdpo fit --config configs/sd15/dpo.yaml --config configs/sd15/refdpo.yaml
    lightning-refdpo fit --config configs/tiny.yaml --trainer.max_steps 4
    lightning-refdpo cache --config configs/sdxl/dpo.yaml --output cache/pickapic_sdxl
    lightning-refdpo evaluate outputs/.../last.ckpt --prompt_sets '[pickapic_v2_test, partiprompts, hpdv2]'
    lightning-refdpo export outputs/.../last.ckpt --output exports/refdpo [--pipeline true]

Every subcommand is one :class:`Command` of :data:`COMMANDS`: its help, its options (the parameters
of its function) and what runs. Model and data are given by ``class_path`` so a subclass from
another project plugs in unchanged.
:func:`main` is the console script (an exit status); :func:`run_cli` runs the same commands in
Python and returns the :class:`RefDPOCLI`, whose ``result`` holds what ``cache``, ``evaluate`` and
``export`` produced.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_refdpo.callbacks.checkpointing import (
    ExceptionCheckpoint,
    FinalStepCheckpoint,
    latest_checkpoint,
)
from lightning_refdpo.callbacks.progress import sane_progress_bar
from lightning_refdpo.checkpoint import UNSAFE_UNPICKLE_HELP
from lightning_refdpo.data import PreferenceDataModule
from lightning_refdpo.data.cache_command import cache_latents
from lightning_refdpo.evaluation import evaluate_model
from lightning_refdpo.export import export_checkpoint
from lightning_refdpo.guard import NonFiniteLossError, UndecodablePairsError
from lightning_refdpo.hub import MissingExtraError, ModelLoadError
from lightning_refdpo.module import DiffusionDPOModule
from lightning_refdpo.sources import check_model_source, check_writable_folder, open_checkpoint

DESCRIPTION = (
    "Diffusion-DPO with reference-model updates and timestep-aware optimization (arXiv 2505.18736): "
    "train, validate, cache latents, evaluate and export."
)
# jsonargparse's wrappers around the error of a class it could not instantiate (a class inside a
# list of classes gets both): the user is shown the error they wrap.
JSONARGPARSE_REPORTS = (
    "Does not validate against any of the Union subtypes",
    "Problem with given class_path",
)
EXIT_USAGE = 2
EXIT_SIGTERM = 128 + signal.SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT
# Errors that a user fixes in the config, the data or the model path: shown as one line, no traceback.
USER_ERRORS = (
    ValueError,
    KeyError,
    ModelLoadError,
    MissingExtraError,
    FileNotFoundError,
    PermissionError,
    NonFiniteLossError,
    UndecodablePairsError,
)
# What a command that needs model and data is passed, built from its --trainer, --model and --data.
BUILT_FROM_CONFIG = {"trainer", "model", "datamodule"}


@dataclass(frozen=True)
class Command:
    """A ``lightning-refdpo`` subcommand.

    Its options are the parameters of ``function``; a command that ``needs_model_and_data`` also
    takes the ``--trainer``, ``--model`` and ``--data`` options (and a config of them) and is
    passed the ``trainer``, ``model`` and ``datamodule`` built from them. ``fit`` and ``validate``
    are ``Trainer`` methods, run by ``LightningCLI``; any other function is called with the parsed
    options, after ``check`` (which may refuse them or return them adjusted), and what it returns
    is the CLI's ``result``. ``positional`` makes the required parameters positional arguments
    (keyword-only ones stay ``--options``).
    """

    name: str
    help: str
    function: Callable[..., Any]
    needs_model_and_data: bool
    positional: bool = False
    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def is_trainer_method(self) -> bool:
        return getattr(Trainer, self.name, None) is self.function

    @property
    def skip(self) -> set[str]:
        """The parameters of ``function`` that are not options: those ``LightningCLI`` skips for a
        ``Trainer`` method and its ``weights_only`` (``--unsafe_unpickle`` instead), the ``trainer``,
        ``model`` and ``datamodule`` that a tool is passed."""
        if self.is_trainer_method:
            return LightningCLI.subcommands()[self.name] | {"weights_only"}
        parameters = inspect.signature(self.function).parameters
        return BUILT_FROM_CONFIG & set(parameters) if self.needs_model_and_data else set()


def check_evaluation(options: dict[str, Any]) -> dict[str, Any]:
    """Refuse an ``--output`` that cannot be written and a model or ``--baseline`` that cannot be
    one (a checkpoint that weights-only loading refuses, or whose module class cannot be imported,
    included), before any model is loaded; local model paths made absolute."""
    check_writable_folder(options["output"], "--output")
    for option, name in (("model", "model"), ("baseline", "--baseline")):
        if options[option] is not None:
            options[option] = check_model_source(options[option], name)
            if options[option].endswith(".ckpt"):
                open_checkpoint(options[option], options["unsafe_unpickle"])
    return options


COMMANDS = (
    Command(
        "fit",
        "Train the policy on the config's preference pairs; resume with --ckpt_path PATH or last.",
        Trainer.fit,
        needs_model_and_data=True,
    ),
    Command(
        "validate",
        "Measure the implicit accuracy and reward margins on the validation pairs (of a --ckpt_path).",
        Trainer.validate,
        needs_model_and_data=True,
    ),
    Command(
        "cache",
        "Encode the config's preference pairs into a latent cache (VAE posteriors, text embeddings).",
        cache_latents,
        needs_model_and_data=True,
    ),
    Command(
        "evaluate",
        "Generate images for prompt sets and score them against a baseline.",
        evaluate_model,
        needs_model_and_data=False,
        positional=True,
        check=check_evaluation,
    ),
    Command(
        "export",
        "Export the policy of a training checkpoint for diffusers, with a model card.",
        export_checkpoint,
        needs_model_and_data=False,
        positional=True,
    ),
)
COMMANDS_BY_NAME = {command.name: command for command in COMMANDS}
# Commands whose model is their positional argument and that also take it as ``--ckpt_path``
# (export's spelling before it became positional).
CKPT_PATH_ALIAS = ("export", "evaluate")


def ckpt_path_as_positional(args: list[str]) -> list[str]:
    """``export --ckpt_path CKPT ...`` (or ``--ckpt_path=CKPT``) as ``export CKPT ...``, and the
    same for ``evaluate``: both take the model as their positional argument."""
    if args[:1] not in ([name] for name in CKPT_PATH_ALIAS):
        return list(args)
    for i, arg in enumerate(args):
        if arg == "--ckpt_path" and i + 1 < len(args):
            return [args[0], args[i + 1], *args[1:i], *args[i + 2 :]]
        if arg.startswith("--ckpt_path="):
            return [args[0], arg.partition("=")[2], *args[1:i], *args[i + 1 :]]
    return list(args)


def main(args: list[str] | None = None) -> int:
    """The console script: run the command of ``args`` (default: ``sys.argv[1:]``).

    Exit status 0 on success; 143 (128 + SIGTERM) when the run was terminated and 130 (128 +
    SIGINT) when it was interrupted with Ctrl-C (a ``fit`` saves its checkpoint first); 2 for an option or config error, a model or checkpoint that cannot be loaded
    (one that weights-only loading refuses, or whose module class cannot be imported) or bad data,
    reported as one line on stderr.
    """
    try:
        run_cli(args)
    except SIGTERMException:
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print("lightning-refdpo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        print(f"lightning-refdpo: error: {user_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def user_message(err: BaseException) -> str:
    """The first line of ``err``, or of the check that failed inside jsonargparse's report of a
    class that could not be instantiated (which dumps the whole parsed namespace)."""
    while err.__cause__ is not None and any(report in str(err) for report in JSONARGPARSE_REPORTS):
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
        # The optimizer and LR schedule are the module's arguments (lightning_refdpo.optim says why),
        # so LightningCLI's own top-level optimizer / lr_scheduler keys are not offered.
        auto_configure_optimizers=False,
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
    key = ".".join(m.group(1) for _, m in found)
    nested = NESTED_NOT_ACCEPTED.search(message)
    if nested:  # an init argument of a class given inside the model's arguments (optimizer, scheduler)
        name, class_path = nested.groups()
        if name == "lr" and key == "model.optimizer":
            return f"{key}.init_args.lr: the learning rate is model.init_args.learning_rate (see scale_lr)"
        if class_path == "torch.optim.Optimizer":  # init_args without a class_path: the default is null
            return f"{key}.init_args.{name}: give {key}'s class_path first (e.g. torch.optim.AdamW)"
        return f"{key}.init_args.{name}: not accepted by {class_path}"
    return f"{key}: {detail.removeprefix('- ')}"


NESTED_NOT_ACCEPTED = re.compile(
    r"Option '(\w+)' is not accepted\. Got value: Namespace\(class_path='([\w.]+)'"
)


def nested_suggestion(message: str) -> str:
    """`` (did you mean x?)`` for an init argument that a class given inside the model's arguments
    (``model.init_args.optimizer``) does not accept: the closest of that class's parameters."""
    nested = NESTED_NOT_ACCEPTED.search(message)
    module_name, _, name = nested.group(2).rpartition(".") if nested else ("", "", "")
    try:
        parameters = list(inspect.signature(getattr(importlib.import_module(module_name), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return ""
    close = difflib.get_close_matches(nested.group(1), parameters, n=1, cutoff=0.7)
    if close == [nested.group(1)]:  # a parameter the library passes itself (lr, optimizer)
        return ""
    return f" (did you mean {close[0]}?)" if close else ""


def suggestion(parser: Any, message: str) -> str:
    """`` (did you mean --x?)`` for the unknown options of an "unrecognized arguments" report, or
    an init argument that a ``--model`` / ``--data`` class (or a class inside their arguments) does
    not accept."""
    if NESTED_NOT_ACCEPTED.search(message):
        return nested_suggestion(message)
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
    - The subcommands are :data:`COMMANDS`, so ``--help`` lists them and each has its own
      ``--help``; ``test`` and ``predict`` are not offered (the module has no test or predict step).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Each command of :data:`COMMANDS` and the parameters of its function that are not options."""
        return {command.name: command.skip for command in COMMANDS}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for command in COMMANDS:
            subparser = self.command_parser(command, **kwargs.get(command.name, {}))
            self._subcommand_parsers[command.name] = subparser
            subcommands.add_subcommand(command.name, subparser, help=command.help)

    def command_parser(self, command: Command, **kwargs: Any) -> LightningArgumentParser:
        """The parser of ``command``'s options."""
        kwargs.setdefault("description", command.help)
        if command.is_trainer_method:
            parser = self._prepare_subcommand_parser(Trainer, command.name, **kwargs)
            parser.add_argument("--unsafe_unpickle", type=bool, default=False, help=UNSAFE_UNPICKLE_HELP)
            return parser
        parser = self.init_parser(**kwargs)
        if command.needs_model_and_data:
            self._add_arguments(parser)
        parser.add_function_arguments(command.function, skip=command.skip, as_positional=command.positional)
        return parser

    # ------------------------------------------------------------------ LightningCLI steps
    def needs_model_and_data(self) -> bool:
        """Whether the parsed command builds the config's trainer, model and data (``run=False``
        builds them)."""
        name = self.config.get("subcommand")
        return name is None or COMMANDS_BY_NAME[name].needs_model_and_data

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """``LightningCLI``'s parsing, with the ``--ckpt_path`` alias of :func:`ckpt_path_as_positional`."""
        if args is None:
            self.config = parser.parse_args(ckpt_path_as_positional(sys.argv[1:]))
        else:
            super().parse_arguments(parser, ckpt_path_as_positional(args) if isinstance(args, list) else args)

    def _parse_ckpt_path(self) -> None:
        """As ``LightningCLI``: the hyperparameters of a ``--ckpt_path`` file become the config's
        model; but the file is opened by :func:`~lightning_refdpo.sources.open_checkpoint`, so one that
        weights-only loading refuses (unless ``--unsafe_unpickle``) or whose module class cannot be
        imported stops the command in one line. ``--ckpt_path last`` is resolved in :meth:`fit`."""
        if not self.config.get("subcommand") or not self.needs_model_and_data():
            return
        options = self.config[self.config.subcommand]
        path = options.get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        hparams = dict(open_checkpoint(path, options.unsafe_unpickle).get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if hparams:
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def _set_seed(self) -> None:
        if self.needs_model_and_data():
            super()._set_seed()

    def instantiate_classes(self) -> None:
        if not self.needs_model_and_data():
            self.config_init = self.parser.instantiate_classes(self.config)
            self.model = self.datamodule = self.trainer = None
            return
        super().instantiate_classes()
        bar = sane_progress_bar(self.trainer.progress_bar_callback)
        if bar is not None:
            callbacks = self.trainer.callbacks
            callbacks[callbacks.index(self.trainer.progress_bar_callback)] = bar

    def _run_subcommand(self, subcommand: str) -> None:
        command = COMMANDS_BY_NAME[subcommand]
        if command.is_trainer_method:
            try:
                super()._run_subcommand(subcommand)
            except SystemExit as stop:
                # Lightning ends a run stopped by Ctrl-C with exit(1), once the on_exception hooks
                # (our checkpoint) have run: raise it again as what it was.
                if isinstance(stop.__context__, KeyboardInterrupt):
                    raise KeyboardInterrupt from None
                raise
            return
        config = self.config_init[subcommand]
        parameters = inspect.signature(command.function).parameters
        options = {name: config[name] for name in parameters if name not in command.skip}
        options |= {name: getattr(self, name) for name in command.skip}  # trainer, model, datamodule
        if command.check is not None:
            options = command.check(options)
        self.result = command.function(**options)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """The ``Trainer`` method's arguments, with ``weights_only`` unless ``--unsafe_unpickle``."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        return {**kwargs, "weights_only": not self.config_init[subcommand].unsafe_unpickle}

    def fit(
        self,
        model: DiffusionDPOModule,
        ckpt_path: str | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> None:
        """``Trainer.fit`` with the checkpoints of a command-line run and ``--ckpt_path last``; the
        checkpoint is loaded weights-only unless ``--unsafe_unpickle``."""
        trainer = self.trainer
        trainer.callbacks += [ExceptionCheckpoint(trainer.default_root_dir), FinalStepCheckpoint()]
        if ckpt_path == "last":
            ckpt_path = latest_checkpoint(trainer.default_root_dir, unsafe_unpickle=not weights_only)
            rank_zero_info(
                f"resuming from {ckpt_path}" if ckpt_path else "no checkpoint to resume: a new run"
            )
        if ckpt_path is not None and Path(ckpt_path).is_file():
            keep_logger_version(trainer, open_checkpoint(ckpt_path, unsafe_unpickle=not weights_only))
        trainer.fit(
            model,
            ckpt_path=None if ckpt_path is None else str(ckpt_path),
            weights_only=weights_only,
            **kwargs,
        )


def keep_logger_version(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Point the run's ``TensorBoardLogger`` at the version the checkpoint was written in
    (``DiffusionDPOModule.on_save_checkpoint`` stores it), so a resumed run continues its curves
    instead of starting ``version_<n+1>``. TensorBoard appends a new event file there; other loggers
    are left alone (``CSVLogger`` would delete the metrics it finds in an existing version)."""
    version = checkpoint.get("logger_version")
    if version is not None and isinstance(trainer.logger, TensorBoardLogger):
        trainer.logger._version = version


if __name__ == "__main__":
    sys.exit(main())
