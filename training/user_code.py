"""User code in a training job: the model factory, the objective (task, loss,
metrics) and the ``train_step`` hook, all named by import path.

Import paths are ``"package.module:attribute"`` (a dotted attribute is
allowed after the colon). They resolve against the job's ``code`` folder
(shipped to every Ray worker, on every node, as the workers' runtime
``working_dir``: see training/runner.py) or, without one, against the
installed packages. Nothing is imported until a job starts: a spec stays
plain data (:func:`check_import_path` only checks the form). User code runs
only because a spec names it.

The contracts (also in training/spec.py's JobSpec docstring):

- ``model.factory(**model.kwargs)`` returns a ``torch.nn.Module`` whose
  forward takes one FP32 tensor ``[batch, *model.input_shape]``.
- ``loss(outputs, targets)`` returns a scalar tensor (differentiable);
  ``targets`` are int64 class ids (task classification) or float32 values
  of shape ``[batch]`` (task regression).
- each ``metrics`` entry ``fn(outputs, targets)`` returns a number (or a
  one-element tensor), computed on the whole validation split, reported as
  ``val_<name>``.
- ``train_step(model, batch, ctx)`` does the forward pass and returns the
  loss: a scalar tensor, or a dict with ``loss`` (that tensor) plus other
  scalars, reported per epoch as ``train_<name>`` (the same names on every
  step and every rank). ``batch`` is ``(inputs, targets)`` of this rank;
  ``ctx`` is a :class:`StepContext`. Flywheel owns the rest: zero_grad,
  ``backward``, the optimizer and scheduler steps, checkpoints and exact
  resume, metrics, cancellation. A hook that draws random numbers must
  draw them from torch's, NumPy's or Python's global generators (those are
  checkpointed), never from its own.

Every failure to import, call or type-check user code is a ConfigError
naming the field, the import path and what was expected.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flywheel.protocol.errors import ConfigError

IMPORT_PATH_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
TASKS = ("classification", "regression")


def check_import_path(value: str, field: str) -> None:
    """ConfigError unless ``value`` has the form ``module.path:attribute``
    (no import happens here)."""
    if not IMPORT_PATH_RE.match(value):
        raise ConfigError(f"{field} {value!r} must be an import path 'package.module:callable' "
                          "(a module of the job's code folder or of an installed package)")


@contextlib.contextmanager
def shipped(code: str) -> Iterator[None]:
    """Make the job's ``code`` folder importable in this process for the
    block (the driver's checks; workers get it as their working_dir). The
    modules imported from it are forgotten afterwards, so that another job
    shipping a module of the same name gets its own."""
    if not code:
        yield
        return
    root = os.path.abspath(code)
    if not os.path.isdir(root):
        raise ConfigError(f"code {code!r} is not a folder (it holds the job's Python modules)")
    before = set(sys.modules)
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(root)
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if os.path.abspath(origin).startswith(root + os.sep):
                del sys.modules[name]


def resolve(path: str, field: str) -> Callable[..., Any]:
    """The callable at import path ``path``; ConfigError naming ``field``
    when the module does not import, the attribute is missing, or it is not
    callable."""
    check_import_path(path, field)
    module_name, attr = path.split(":", 1)
    where = "the job's code folder (code:) or an installed package"
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of user code is reported the same way
        raise ConfigError(f"{field} {path!r}: module {module_name!r} does not import "
                          f"({type(exc).__name__}: {exc}); expected a module of {where}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field} {path!r}: module {module_name!r} has no attribute {attr!r}; "
                              "expected a callable there")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field} {path!r} is a {type(obj).__name__}, expected a callable")
    return obj


def build_model(model_spec) -> Any:
    """Call ``model.factory(**model.kwargs)`` (a ModelSpec with a factory);
    ConfigError naming ``model.factory`` when it does not import, raises, or
    returns something other than a torch.nn.Module."""
    import torch

    path = model_spec.factory
    factory = resolve(path, "model.factory")
    try:
        module = factory(**model_spec.kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
        raise ConfigError(f"model.factory {path!r} with model.kwargs {model_spec.kwargs} raised "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"model.factory {path!r} returned a {type(module).__name__}, "
                          "expected a torch.nn.Module")
    return module


@dataclass(frozen=True)
class StepContext:
    """What a ``train_step`` hook may read. ``epoch``: 0-based;
    ``global_step``: optimizer steps done before this one; ``loss_fn``: the
    job's loss (the task's or the user's), ``loss_fn(outputs, targets)``."""

    rank: int
    world_size: int
    epoch: int
    global_step: int
    device: Any
    loss_fn: Callable[[Any, Any], Any]


def _regression_view(outputs, targets):
    # one value per row: [batch, 1] and [batch] both compare with [batch] targets
    return outputs.reshape(len(outputs), -1).squeeze(1), targets.to(outputs.dtype)


def _mse(outputs, targets):
    import torch

    out, tgt = _regression_view(outputs, targets)
    return torch.nn.functional.mse_loss(out, tgt)


def _mae(outputs, targets) -> float:
    out, tgt = _regression_view(outputs, targets)
    return float((out - tgt).abs().mean().item())


def _accuracy(outputs, targets) -> float:
    return float((outputs.argmax(1) == targets).double().mean().item())


def _cross_entropy(outputs, targets):
    import torch

    return torch.nn.functional.cross_entropy(outputs, targets)


class Objective:
    """The loss, the validation metrics and the step of one job spec, with
    user code resolved (call inside :func:`shipped` in the driver)."""

    def __init__(self, spec) -> None:
        self.task = spec.task
        self.regression = spec.task == "regression"
        builtin = _mse if self.regression else _cross_entropy
        self.loss_fn = resolve(spec.loss, "loss") if spec.loss else builtin
        self.loss_field = "loss" if spec.loss else f"task {spec.task!r}"
        self.metric_fns: dict[str, Callable] = (
            {"mse": lambda o, t: float(_mse(o, t).item()), "mae": _mae} if self.regression
            else {"accuracy": _accuracy})
        for name, path in spec.metrics.items():
            self.metric_fns[name] = resolve(path, f"metrics.{name}")
        self.user_metrics = set(spec.metrics)
        self.hook = resolve(spec.train_step, "train_step") if spec.train_step else None

    @property
    def headline(self) -> str:
        """The validation metric a log line shows."""
        return "val_mse" if self.regression else "val_accuracy"

    def step_loss(self, model, batch, ctx: StepContext) -> tuple[Any, dict[str, float]]:
        """(loss tensor to back-propagate, extra scalars) of one step."""
        if self.hook is None:
            x, y = batch
            return self.loss_fn(model(x), y), {}
        return self.check_step_result(self.hook(model, batch, ctx))

    def check_step_result(self, out) -> tuple[Any, dict[str, float]]:
        import torch

        extra: dict[str, float] = {}
        loss = out
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise ConfigError(f"train_step returned a dict with keys {sorted(out)}; expected one with 'loss'")
            loss = out["loss"]
            for key, value in out.items():
                if key == "loss":
                    continue
                if not isinstance(key, str) or not re.match(r"^[A-Za-z_]\w*$", key):
                    raise ConfigError(f"train_step returned extra key {key!r}; expected identifier names")
                extra[key] = _scalar(value, f"train_step's {key!r}")
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
            raise ConfigError(f"train_step returned {_describe(loss)} as the loss; expected a one-element "
                              "tensor that requires grad (or a dict with it under 'loss')")
        return loss.reshape(()), extra

    def loss_value(self, outputs, targets, field: str = ""):
        """The job's loss, checked to be a one-element tensor."""
        import torch

        loss = self.loss_fn(outputs, targets)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ConfigError(f"{field or self.loss_field}: the loss returned {_describe(loss)}; "
                              "expected a one-element tensor")
        return loss.reshape(())

    def evaluate(self, outputs, targets) -> dict[str, float]:
        """val_loss and every metric of the validation outputs."""
        row = {"val_loss": float(self.loss_value(outputs, targets).item())}
        for name, fn in self.metric_fns.items():
            field = f"metrics.{name}" if name in self.user_metrics else f"task {self.task!r}"
            try:
                value = fn(outputs, targets)
            except Exception as exc:  # noqa: BLE001 - user metric code may raise anything
                raise ConfigError(f"{field} raised {type(exc).__name__}: {exc}") from None
            row[f"val_{name}"] = _scalar(value, field)
        return row

    def empty_metrics(self) -> dict[str, float]:
        return {"val_loss": math.nan, **{f"val_{name}": math.nan for name in self.metric_fns}}


def _scalar(value, field: str) -> float:
    try:
        if hasattr(value, "numel") and value.numel() != 1:
            raise TypeError
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field} gave {_describe(value)}; expected a number") from None


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    return f"a {type(value).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def build_job_model(model_spec, n_features: int) -> tuple[Any, tuple[int, ...]]:
    """(module, shape of one input row) of a ModelSpec, built-in or factory;
    ``n_features``: the width of the dataset's rows (a factory model's
    default row shape)."""
    if model_spec.factory:
        return build_model(model_spec), tuple(model_spec.input_shape) or (n_features,)
    from flywheel.runtime.architectures import build

    module, sig = build(model_spec.architecture, model_spec.hparams)
    return module, tuple(sig.inputs[0].shape[1:])

