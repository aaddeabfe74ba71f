"""A user's own task: `SupervisedTask`, and the fitness an optimizer or schedule gets on it.

A task is three things a user already has (a data loader, a model builder, a loss) and a few
numbers (batch size, epochs, patience). The fitness protocol is the same as the Fashion-MNIST
presets' in spirit, in its simplest form: one training run from the same initial weights for
every candidate (torch is seeded before `model()`), early stopping on the validation metric, the
best epoch's weights restored, and the metric on "val" is the fitness. The "test" split is never
read here; `engine.compare` reads it for its final table.

Metrics are "higher is better" and never below the floor fitness (0.0) a broken candidate gets:
"accuracy" is in [0, 1]; "neg_loss" is reported as exp(-validation loss), which orders exactly as
the negated loss does and is, for cross-entropy, the geometric-mean probability the model gives
the right answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.tasks.epochs import FitResult, fit_epochs

__all__ = ["LOSSES", "METRICS", "Loaded", "SupervisedTask", "TaskError", "check_task",
           "fit_supervised", "load_data", "metric_value", "supervised_fitness"]

LOSSES = ("cross_entropy", "mse")
METRICS = ("accuracy", "neg_loss")
SPLITS = ("train", "val", "test")

Pair = tuple[torch.Tensor, torch.Tensor]


class TaskError(ValueError):
    """A task that cannot be used: the message names the task and what is wrong, in one line."""


@dataclass(frozen=True)
class SupervisedTask:
    """A data set, a model and a training budget: what a candidate optimizer is scored on.

    `data()` returns {"train": (x, y), "val": (x, y)} and optionally "test", tensors on the
    CPU; it is called once per worker process. `model()` returns a fresh torch.nn.Module; the
    engine seeds torch before calling it, so every candidate starts from the same weights.
    `loss` is "cross_entropy", "mse" or a callable(output, target) -> scalar tensor. `metric`
    ("accuracy" or "neg_loss") is measured on "val" and is the fitness. DLR drives plain SGD
    that starts at `initial_lr`.
    """

    name: str
    data: Callable[[], Mapping[str, Pair]]
    model: Callable[[], torch.nn.Module]
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy"
    metric: str = "accuracy"
    batch_size: int = 32
    epochs: int = 20
    patience: int = 5
    initial_lr: float = 0.01
    eval_batch: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise TaskError(f"a SupervisedTask needs a non-empty name, got {self.name!r}")
        for field in ("data", "model"):
            if not callable(getattr(self, field)):
                raise TaskError(f"task {self.name!r}: {field} must be a zero-argument callable, "
                                f"got {type(getattr(self, field)).__name__}")
        if not callable(self.loss) and self.loss not in LOSSES:
            raise TaskError(f"task {self.name!r}: loss {self.loss!r} is not one of "
                            f"{', '.join(LOSSES)} or a callable(output, target)")
        if self.metric not in METRICS:
            raise TaskError(f"task {self.name!r}: metric {self.metric!r} is not one of "
                            f"{', '.join(METRICS)}")
        for field in ("batch_size", "epochs", "patience", "eval_batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TaskError(f"task {self.name!r}: {field} must be a positive integer, "
                                f"got {value!r}")
        if not (isinstance(self.initial_lr, (int, float)) and self.initial_lr > 0):
            raise TaskError(f"task {self.name!r}: initial_lr must be > 0, got {self.initial_lr!r}")

    def settings(self) -> str:
        """Everything but the callables' code, as text: part of the task's digest."""
        def named(f: object) -> str:
            return f if isinstance(f, str) else \
                f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__name__)}"

        return (f"name={self.name!r} data={named(self.data)} model={named(self.model)} "
                f"loss={named(self.loss)} metric={self.metric} batch_size={self.batch_size} "
                f"epochs={self.epochs} patience={self.patience} initial_lr={self.initial_lr!r} "
                f"eval_batch={self.eval_batch}")

    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if callable(self.loss):
            return self.loss
        if self.loss == "mse":
            return lambda out, target: F.mse_loss(out.reshape(target.shape), target)
        return F.cross_entropy


@dataclass(frozen=True, eq=False)
class Loaded:
    """A task's splits, checked, on the training device."""

    train: Pair
    val: Pair
    test: Pair | None


def load_data(task: SupervisedTask, device: str | torch.device = "cpu",
              need_test: bool = False) -> Loaded:
    """`task.data()` checked: the named splits, tensors of matching lengths; a TaskError else."""
    try:
        splits = task.data()
    except TaskError:
        raise
    except Exception as err:  # the user's loader: its own failure, named
        raise TaskError(f"task {task.name!r}: data() raised {type(err).__name__}: "
                        f"{_first_line(err)}") from err
    if not isinstance(splits, Mapping):
        raise TaskError(f"task {task.name!r}: data() returned {type(splits).__name__}, not a "
                        "dict of splits {'train': (x, y), 'val': (x, y)}")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise TaskError(f"task {task.name!r}: data() has unknown split(s) "
                        f"{', '.join(map(repr, sorted(map(str, unknown))))}; use train, val, test")
    pairs = {}
    for name in SPLITS:
        if name not in splits:
            if name == "test" and not need_test:
                continue
            raise TaskError(f"task {task.name!r}: data() has no {name!r} split"
                            + (" (engine.compare measures on it)" if name == "test" else ""))
        pair = splits[name]
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(t, torch.Tensor) for t in pair)):
            raise TaskError(f"task {task.name!r}: split {name!r} must be a pair of tensors (x, y)")
        x, y = pair
        if len(x) != len(y):
            raise TaskError(f"task {task.name!r}: split {name!r} has {len(x)} inputs but "
                            f"{len(y)} targets")
        if len(x) == 0:
            raise TaskError(f"task {task.name!r}: split {name!r} is empty")
        pairs[name] = (x.to(device), y.to(device))
    return Loaded(pairs["train"], pairs["val"], pairs.get("test"))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "(no message)"


def metric_value(task: SupervisedTask, model: torch.nn.Module, pair: Pair) -> tuple[float, float]:
    """(mean loss, metric) of `model` on `pair`, in evaluation mode and without autograd."""
    loss_fn = task.loss_fn()
    x, y = pair
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), task.eval_batch):
            out = model(x[start:start + task.eval_batch])
            target = y[start:start + task.eval_batch]
            loss_sum += float(loss_fn(out, target)) * len(target)
            if task.metric == "accuracy":
                correct += int((out.argmax(dim=-1) == target).sum())
    model.train(was_training)
    loss = loss_sum / len(x)
    if task.metric == "accuracy":
        return loss, correct / len(x)
    return loss, math.exp(-loss) if math.isfinite(loss) else 0.0


def fit_supervised(
    task: SupervisedTask,
    data: Loaded,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    *,
    init_seed: int,
    shuffle_seed: int,
    deadline: float | None = None,
    schedule: Callable[[int, float], float] | None = None,
    epochs: int | None = None,
    patience: int | None = None,
) -> tuple[torch.nn.Module, FitResult]:
    """Train a fresh model; early stop on the validation metric; the best epoch restored.

    The curves' `val_acc` holds the metric per epoch (whatever it is). A non-finite loss or
    learning rate stops training with a "diverged" reason; a passed `deadline`
    (time.perf_counter()) with a "timeout" reason, as the presets' `fit` does.
    """
    start = time.perf_counter()
    epochs = task.epochs if epochs is None else epochs
    patience = task.patience if patience is None else patience
    device = data.train[0].device
    torch.manual_seed(init_seed)
    model = task.model().to(device)
    optimizer = make_optimizer(model)
    loss_fn = task.loss_fn()
    x, y = data.train
    return model, fit_epochs(
        model, optimizer, lambda idx: loss_fn(model(x[idx]), y[idx]),
        lambda: metric_value(task, model, data.val), n=len(x), batch_size=task.batch_size,
        epochs=epochs, patience=patience, shuffle=torch.Generator().manual_seed(shuffle_seed),
        start=start, schedule=schedule, deadline=deadline)


def check_task(task: SupervisedTask, device: str | torch.device = "cpu") -> Loaded:
    """The pre-flight check: splits, one forward and backward pass on a batch with the loss,
    and the metric on a few validation rows; each failure a TaskError naming what was wrong."""
    data = load_data(task, device)
    try:
        model = task.model()
    except Exception as err:
        raise TaskError(f"task {task.name!r}: model() raised {type(err).__name__}: "
                        f"{_first_line(err)}") from err
    if not isinstance(model, torch.nn.Module):
        raise TaskError(f"task {task.name!r}: model() returned {type(model).__name__}, not a "
                        "torch.nn.Module")
    model = model.to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise TaskError(f"task {task.name!r}: model() has no trainable parameters")
    x, y = data.train[0][:task.batch_size], data.train[1][:task.batch_size]
    try:
        out = model(x)
    except Exception as err:
        raise TaskError(f"task {task.name!r}: the model's forward pass on a training batch of "
                        f"shape {tuple(x.shape)} raised {type(err).__name__}: "
                        f"{_first_line(err)}") from err
    _check_shapes(task, out, y, torch.cat([data.train[1], data.val[1]]))
    try:
        loss = task.loss_fn()(out, y)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise TaskError(f"task {task.name!r}: the loss must be a scalar tensor, got "
                            f"{type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                               else ""))
        loss.backward()
    except TaskError:
        raise
    except Exception as err:
        raise TaskError(f"task {task.name!r}: the loss or its backward pass raised "
                        f"{type(err).__name__}: {_first_line(err)}") from err
    if all(p.grad is None for p in model.parameters()):
        raise TaskError(f"task {task.name!r}: the loss's backward pass gave no gradient to any "
                        "parameter of the model")
    try:
        small = Loaded(data.train, (data.val[0][:task.batch_size], data.val[1][:task.batch_size]),
                       None)
        metric_value(task, model, small.val)
    except Exception as err:
        raise TaskError(f"task {task.name!r}: the metric {task.metric!r} cannot be computed on "
                        f"'val': {type(err).__name__}: {_first_line(err)}") from err
    return data


def _check_shapes(task: SupervisedTask, out: object, y: torch.Tensor,
                  targets: torch.Tensor) -> None:
    """`y`: the batch's targets; `targets`: every train and val target (the class count)."""
    if not isinstance(out, torch.Tensor):
        raise TaskError(f"task {task.name!r}: the model returned {type(out).__name__}, not a "
                        "tensor")
    if len(out) != len(y):
        raise TaskError(f"task {task.name!r}: the model gave {len(out)} outputs for a batch of "
                        f"{len(y)} targets")
    if callable(task.loss):
        return
    if task.loss == "cross_entropy":
        if y.is_floating_point():
            raise TaskError(f"task {task.name!r}: cross_entropy needs integer class targets, "
                            f"got {y.dtype}")
        classes = int(targets.max()) + 1 if targets.numel() else 0
        if out.dim() < 2:
            raise TaskError(f"task {task.name!r}: cross_entropy needs model outputs of shape "
                            f"(batch, classes), got {tuple(out.shape)}")
        if out.shape[-1] < classes:
            raise TaskError(f"task {task.name!r}: model output has {out.shape[-1]} columns, "
                            f"targets need {classes}")
    elif task.loss == "mse":
        if out.numel() != y.numel():
            raise TaskError(f"task {task.name!r}: mse needs one output per target value; the "
                            f"model gives shape {tuple(out.shape)} for targets "
                            f"{tuple(y.shape)}")
        if not y.is_floating_point():
            raise TaskError(f"task {task.name!r}: mse needs floating-point targets, got "
                            f"{y.dtype}")
    if task.metric == "accuracy" and (task.loss == "mse"):
        raise TaskError(f"task {task.name!r}: metric 'accuracy' needs class outputs; use "
                        "metric='neg_loss' with loss='mse'")


def supervised_fitness(
    task: SupervisedTask,
    data: Loaded,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    *,
    seed: int,
    time_limit: float | None = None,
    schedule: Callable[[int, float], float] | None = None,
):
    """A candidate's fitness on `task`: the best validation metric of one training run
    (`fit_supervised`), from the same initial weights for every candidate of a seed; a
    failure scores the floor (0.0) with its reason. ALR passes the candidate's optimizer;
    DLR passes SGD at `task.initial_lr` and the candidate `schedule`."""
    from engine.tasks.protocol import (_INIT, _TRAIN, FLOOR_FITNESS, EvalResult, TrialResult,
                                       derive_seed)

    start = time.perf_counter()
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit}")
    deadline = None if time_limit is None else start + time_limit
    _, fit = fit_supervised(task, data, make_optimizer, init_seed=derive_seed(seed, _INIT),
                            shuffle_seed=derive_seed(seed, _TRAIN, 1), deadline=deadline,
                            schedule=schedule)
    value = FLOOR_FITNESS
    if fit.reason is None and fit.best_epoch >= 0:
        value = max(FLOOR_FITNESS, fit.val_acc[fit.best_epoch])
    trial = TrialResult(chunk=-1, accuracy=value, fit=fit)
    return EvalResult(fitness=value, trials=(trial,), seconds=time.perf_counter() - start,
                      reason=fit.reason)
