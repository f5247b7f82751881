"""The optimizer and the LR schedule of the policy, given in the config as ``class_path`` and
``init_args``.

They are arguments of the module (``model.init_args.optimizer``, ``model.init_args.lr_scheduler``),
not LightningCLI's top-level ``optimizer:`` / ``lr_scheduler:`` keys, because those replace the
module's ``configure_optimizers`` with one that knows nothing of ``scale_lr``, of which parameters
train (the policy's, or its LoRA adapter) or of the per-step schedule, are not saved in the
checkpoint's hyperparameters, and do not exist when the module is built in Python or by a subclass;
a module argument composes with config overlays like any other (an overlay replaces or completes
``init_args``), a subclass inherits it, and the checkpoint records it.

The learning rate is not an optimizer argument: it is ``model.learning_rate``, multiplied by the
effective batch when ``scale_lr`` is set, whatever the optimizer. Documented choices (each tested
taking a step on a tiny model and resuming exactly, ``tests/test_optimizers.py``):

- ``torch.optim.AdamW`` (the default, with the Diffusion-DPO script's ``adam_*`` defaults: betas
  (0.9, 0.999), eps 1e-8, weight decay 1e-2). On CUDA the fused kernel is used unless ``fused`` or
  ``foreach`` is given; elsewhere torch's own default (``foreach`` where it has it).
- ``transformers.Adafactor`` with the Diffusion-DPO authors' SDXL settings (their ``train.py``:
  ``if args.use_adafactor or args.sdxl``): ``weight_decay`` = their ``adam_weight_decay`` (1e-2),
  ``clip_threshold: 1.0``, ``scale_parameter: false``, ``relative_step: false``. Its second moment
  of a matrix is factored into a row and a column vector and it keeps no first moment, so its
  state is a small fraction of AdamW's.
- ``bitsandbytes.optim.AdamW8bit`` (the ``bnb`` extra): AdamW with both moments quantized to 8 bits
  in blocks of 256, the diffusers DPO examples' ``--use_8bit_adam``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

OptimizerCallable = Callable[[Iterable[torch.nn.Parameter], float], torch.optim.Optimizer]
"""An optimizer class called with the parameters and the learning rate (in the config:
``class_path`` and ``init_args`` without ``lr``)."""
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
"""An LR scheduler class called with the optimizer, stepped after every optimizer step."""
DEFAULT_OPTIMIZER = {
    "class_path": "torch.optim.AdamW",
    "init_args": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2},
}
"""``model.optimizer: null``: AdamW with the Diffusion-DPO script's ``adam_*`` defaults. The module's
default is ``None`` rather than the class because jsonargparse keeps the init arguments of a
default class that the next class also takes: switching to Adafactor would inherit AdamW's ``eps``."""


def class_spec(value: Any, key: str, given: int) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` of ``value``: a class, a ``functools.partial`` of
    one (what jsonargparse makes of ``class_path`` / ``init_args``) or such a dict. ``init_args`` are
    checked against the class's signature, less its first ``given`` parameters (those the library
    passes); ``key`` names the option in errors."""
    if isinstance(value, dict):
        if "class_path" not in value:
            raise ValueError(f"{key} needs a class_path (and optional init_args); got {value}")
        cls, init_args = import_class(value["class_path"], key), dict(value.get("init_args") or {})
    elif isinstance(value, partial):
        # jsonargparse's partial is partial(call_without_instantiate_context, instantiator, cls, **init_args)
        classes = [a for a in (value.func, *value.args) if isinstance(a, type)]
        if not classes:
            raise ValueError(f"{key} must be a class with its arguments; got {value!r}")
        cls, init_args = classes[-1], dict(value.keywords)
    elif isinstance(value, type):
        cls, init_args = value, {}
    else:
        raise ValueError(
            f"{key} must be a class or class_path/init_args, so that a checkpoint can rebuild it; got {value!r}"
        )
    signature = list(inspect.signature(cls.__init__).parameters.values())[1:]
    passed, accepted = [p.name for p in signature[:given]], signature[given:]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted):
        for name in init_args:
            if name in passed:
                why = " (the learning rate is model.learning_rate, see scale_lr)" if name == "lr" else ""
                raise ValueError(f"{key}.init_args.{name}: given by the library, not an init argument{why}")
            if name not in {p.name for p in accepted}:
                raise ValueError(
                    f"{key}.init_args.{name}: not accepted by {cls.__module__}.{cls.__qualname__}; it takes "
                    f"{', '.join(p.name for p in accepted)}"
                )
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def import_class(class_path: str, key: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{key}.class_path: cannot import {class_path!r} ({err})") from err
    if not isinstance(cls, type):
        raise ValueError(f"{key}.class_path: {class_path!r} is not a class")
    return cls


def optimizer_spec(value: Any, legacy_adam: dict[str, float] | None = None) -> dict[str, Any]:
    """The checked ``class_path`` / ``init_args`` of ``model.optimizer`` (``None``:
    :data:`DEFAULT_OPTIMIZER`, with version 0.1's ``adam_*`` settings in ``legacy_adam``); refuses
    Adafactor settings that would fail at the first step or ignore ``learning_rate``."""
    legacy_adam = legacy_adam or {}
    if legacy_adam and value is not None:
        raise ValueError(
            f"model.{next(iter(legacy_adam))} is version 0.1's AdamW setting; with model.optimizer set, "
            "give it in model.optimizer.init_args"
        )
    if value is None:
        init_args = dict(DEFAULT_OPTIMIZER["init_args"])
        betas = init_args["betas"]
        init_args["betas"] = [
            legacy_adam.get("adam_beta1", betas[0]),
            legacy_adam.get("adam_beta2", betas[1]),
        ]
        init_args["eps"] = legacy_adam.get("adam_epsilon", init_args["eps"])
        init_args["weight_decay"] = legacy_adam.get("adam_weight_decay", init_args["weight_decay"])
        value = {"class_path": DEFAULT_OPTIMIZER["class_path"], "init_args": init_args}
    spec = class_spec(value, "model.optimizer", given=2)
    init_args = spec["init_args"]
    if spec["class_path"] == "transformers.optimization.Adafactor":
        if init_args.get("relative_step", True):
            raise ValueError(
                "model.optimizer.init_args.relative_step: true makes Adafactor pick its own learning rate, "
                "which model.learning_rate (and scale_lr) set; use relative_step: false"
            )
        eps = init_args.get("eps", (1e-30, 1e-3))
        if not isinstance(eps, list | tuple) or len(eps) != 2:
            raise ValueError(
                "model.optimizer.init_args.eps: Adafactor takes a pair [eps1, eps2] (default [1e-30, 1e-3]); "
                f"got {eps!r} (carried over from the previous optimizer's init_args?)"
            )
    return spec


def lr_scheduler_spec(value: Any) -> str | dict[str, Any]:
    """``model.lr_scheduler``: a ``diffusers.optimization.get_scheduler`` name, or a scheduler class
    as ``class_path`` / ``init_args`` (without the optimizer)."""
    from diffusers.optimization import SchedulerType

    if isinstance(value, str):
        names = [s.value for s in SchedulerType]
        if value not in names:
            raise ValueError(
                f"model.lr_scheduler must be one of {', '.join(names)} or a class_path; got {value!r}"
            )
        return value
    spec = class_spec(value, "model.lr_scheduler", given=1)
    if issubclass(
        import_class(spec["class_path"], "model.lr_scheduler"), torch.optim.lr_scheduler.ReduceLROnPlateau
    ):
        raise ValueError(
            "model.lr_scheduler: ReduceLROnPlateau needs a monitored metric, which the module does not "
            "give; use a schedule over steps"
        )
    return spec


def build_optimizer(
    spec: dict[str, Any], params: list[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` over ``params`` at learning rate ``lr``; torch's AdamW takes its fused
    CUDA kernel when neither ``fused`` nor ``foreach`` is given and every parameter is on CUDA."""
    cls = import_class(spec["class_path"], "model.optimizer")
    init_args = dict(spec["init_args"])
    if cls is torch.optim.AdamW and init_args.get("fused") is None and init_args.get("foreach") is None:
        if params and all(p.is_cuda for p in params):
            init_args["fused"] = True
    return cls(params, lr=lr, **init_args)


def build_lr_scheduler(
    spec: str | dict[str, Any],
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int | None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler of ``spec``: a diffusers schedule by name with ``warmup_steps`` of linear warm-up
    over ``total_steps``, or a scheduler class with its ``init_args``."""
    if isinstance(spec, str):
        from diffusers.optimization import get_scheduler

        return get_scheduler(spec, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return import_class(spec["class_path"], "model.lr_scheduler")(optimizer, **spec["init_args"])
