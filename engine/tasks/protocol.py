"""Tasks: a data set, a model and a training protocol, and the fitness they give a candidate.

A `Task` is plain frozen data (picklable, hashable), so it travels to worker processes and keys
caches. The `paper` preset is the original AutoLR system's ALR/DLR protocol (docs/protocol.md,
"Evaluation protocol", which also says why `smoke` and `quick` shrink it) with its flaws fixed:
- one stratified split per run seed, the same for every evaluation (it was redrawn each time);
- one normalisation (minus the mean image of the training pool) for every split;
- the same initial weights for every candidate, derived from the seed;
- every random source (split, init, shuffling, dropout) an explicit generator derived from the
  seed, so a candidate's fitness is reproducible bit for bit (at a fixed thread count);
- a non-finite loss or learning rate is a divergence: floor fitness and a reason, not ~0.1.

Seeds are derived with numpy's SeedSequence from (seed, purpose, trial), so streams never overlap
and adding a trial does not shift the others.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from engine.tasks.data import FashionMNIST, load_fashion_mnist
from engine.tasks.results import EvalResult, TrialResult
from engine.tasks.training import ModelSpec, fit, loss_accuracy

__all__ = [
    "FLOOR_FITNESS",
    "PRESETS",
    "AlrProtocol",
    "DataSpec",
    "DlrProtocol",
    "EvalResult",
    "OptimizerFactory",
    "Prepared",
    "ScheduleFn",
    "Split",
    "Task",
    "TrialResult",
    "derive_seed",
    "alr_fitness",
    "dlr_fitness",
    "get_task",
    "make_split",
    "prepare",
    "resolve_device",
]

FLOOR_FITNESS = 0.0  # what a diverged, timed-out or broken candidate scores: below any accuracy

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
ScheduleFn = Callable[[int, float], float]  # (epoch, current lr) -> lr for this epoch

_SPLIT, _INIT, _TRAIN = 0, 1, 2  # SeedSequence purposes


def derive_seed(seed: int, purpose: int, trial: int = 0, bits: int = 63) -> int:
    """A `bits`-bit seed for one random stream, from (seed, purpose, trial) by SeedSequence:
    streams never overlap. 63 bits suit torch's generators; 31 those that want a C int."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    state = np.random.SeedSequence([seed, purpose, trial]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(64 - bits))


@dataclass(frozen=True)
class DataSpec:
    """How the Fashion-MNIST training set is cut. `pool` < 60,000 takes a stratified subset first.

    The pool minus `val` and `fitness` images is the training pool: DLR trains on all of it, ALR
    cuts it into chunks of about `chunk` images and trains trial i on chunk i.
    """

    val: int = 3500
    fitness: int = 3500
    chunk: int = 7571
    pool: int | None = None  # None: the whole training set

    def __post_init__(self) -> None:
        for name in ("val", "fitness", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.pool is not None and self.pool < self.val + self.fitness + self.chunk:
            raise ValueError(
                f"DataSpec.pool={self.pool} leaves no training chunk after val={self.val} and "
                f"fitness={self.fitness}; make it at least {self.val + self.fitness + self.chunk}"
            )


@dataclass(frozen=True)
class AlrProtocol:
    """Reference ALR fitness: min accuracy over up to `trials` trials, early stop on val accuracy."""

    trials: int = 5
    batch_size: int = 1000
    max_epochs: int = 100
    patience: int = 5
    abort_below: float = 0.8  # stop trying more chunks once one trial scores below this

    def __post_init__(self) -> None:
        _positive(self, "trials", "batch_size", "max_epochs", "patience")
        if not 0.0 <= self.abort_below <= 1.0:
            raise ValueError(f"AlrProtocol.abort_below is an accuracy in [0, 1], got {self.abort_below}")


@dataclass(frozen=True)
class DlrProtocol:
    """Reference DLR fitness: SGD driven by the schedule, early stop on validation loss."""

    initial_lr: float = 0.01
    batch_size: int = 1000
    max_epochs: int = 100
    patience: int = 3
    chunks: int | None = None  # train on the first `chunks` chunks of the pool; None: all of it

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "max_epochs", "patience")
        if self.chunks is not None:
            _positive(self, "chunks")
        if not self.initial_lr > 0:
            raise ValueError(f"DlrProtocol.initial_lr must be > 0, got {self.initial_lr}")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 1, got {getattr(obj, name)}")


# Bump when the training code changes what a fitness is for an unchanged Task (another op order,
# initialisation or data path): fitnesses stored by older versions then stop answering
# (see Task.digest).
FITNESS_VERSION = 1


@dataclass(frozen=True)
class Task:
    """Everything that decides a fitness besides the candidate and the seed."""

    name: str
    data: DataSpec
    model: ModelSpec
    alr: AlrProtocol
    dlr: DlrProtocol
    eval_batch: int = 1000  # forward-only passes; bigger is not faster here (measured)
    # Where it trains (--device): None, the GPU when there is one. Not in the digest (repr) nor
    # equality: it changes how fast a fitness comes, not what the fitness means.
    device: str | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _positive(self, "eval_batch")

    @property
    def digest(self) -> str:
        """A short digest of every field and FITNESS_VERSION: part of the results store's key,
        so that a preset whose definition changed (data sizes, model, epochs) never answers
        from fitnesses measured under its old definition."""
        return hashlib.sha256(f"{FITNESS_VERSION}:{self!r}".encode()).hexdigest()[:12]


# --- the split --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Split:
    """Indices into the training set; every part is stratified (class counts within one)."""

    val: np.ndarray
    fitness: np.ndarray
    chunks: tuple[np.ndarray, ...]

    @property
    def train(self) -> np.ndarray:
        return np.concatenate(self.chunks)


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation whose every contiguous block holds each class in proportion, within one.

    Each class's members are shuffled and spread evenly over [0, 1) (member r of n_c sits at
    (r + offset_c) / n_c); sorting by position interleaves the classes evenly.
    """
    position = np.empty(len(labels))
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(position, kind="stable")


def make_split(labels: np.ndarray, spec: DataSpec, seed: int) -> Split:
    """The run's one split of the training set: depends on the labels, `spec` and `seed` only."""
    pool = len(labels) if spec.pool is None else spec.pool
    need = spec.val + spec.fitness + spec.chunk
    if pool > len(labels) or pool < need:
        raise ValueError(
            f"the data set has {len(labels)} images; the task needs a pool of {pool} with at least "
            f"{need} (val {spec.val} + fitness {spec.fitness} + one chunk of {spec.chunk})"
        )
    rng = np.random.default_rng(derive_seed(seed, _SPLIT))
    order = _stratified_order(labels, rng)
    if pool < len(labels):  # a stratified subset, then stratified parts of it
        subset = order[:pool]
        order = subset[_stratified_order(labels[subset], rng)]
    val, fitness = order[: spec.val], order[spec.val : spec.val + spec.fitness]
    rest = order[spec.val + spec.fitness : pool]
    n_chunks = max(1, round(len(rest) / spec.chunk))
    return Split(val=val, fitness=fitness, chunks=tuple(np.array_split(rest, n_chunks)))


@dataclass(frozen=True, eq=False)
class Prepared:
    """The split as normalised tensors, shared read-only by every candidate of a run."""

    split: Split
    mean_image: torch.Tensor  # (28, 28), subtracted from every part
    val: tuple[torch.Tensor, torch.Tensor]
    fitness: tuple[torch.Tensor, torch.Tensor]
    chunks: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    _joined: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict, repr=False
    )  # built on first use: ALR runs never need it

    def train(self, chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `chunks` chunks (all when None) as one set: DLR's training set."""
        if chunks not in self._joined:
            parts = self.chunks[:chunks]
            self._joined[chunks] = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
        return self._joined[chunks]


@functools.lru_cache(maxsize=2)
def _prepare_cached(dataset: FashionMNIST, spec: DataSpec, seed: int, device: str) -> Prepared:
    split = make_split(dataset.labels, spec, seed)
    # One mean image, of the training pool only (val and fitness stay unseen), for every part.
    mean = dataset.images[split.train].mean(axis=0, dtype=np.float64) / 255.0

    def part(index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = (dataset.images[index].astype(np.float32) / np.float32(255.0)) - mean.astype(np.float32)
        y = dataset.labels[index]
        return torch.from_numpy(x).unsqueeze(1).to(device), torch.from_numpy(y).to(device)

    return Prepared(
        split=split,
        mean_image=torch.from_numpy(mean.astype(np.float32)).to(device),
        val=part(split.val),
        fitness=part(split.fitness),
        chunks=tuple(part(c) for c in split.chunks),
    )


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None means the GPU when there is one (the paper preset's home), else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or None") from err


def prepare(
    task: Task,
    seed: int,
    dataset: FashionMNIST | None = None,
    device: str | torch.device | None = None,
) -> Prepared:
    """The task's data for `seed` on `device`, built once per process (a worker evaluates many
    candidates against it)."""
    dataset = dataset if dataset is not None else load_fashion_mnist("train")
    return _prepare_cached(dataset, task.data, seed,
                           str(resolve_device(device if device is not None else task.device)))


# --- the two protocols ------------------------------------------------------------------------


def _deadline(start: float, time_limit: float | None) -> float | None:
    if time_limit is None:
        return None
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit}")
    return start + time_limit


def _trial(
    task: Task,
    data: Prepared,
    optimizer_for: Callable[[torch.nn.Module], torch.optim.Optimizer],
    train: tuple[torch.Tensor, torch.Tensor],
    chunk: int,
    seed: int,
    deadline: float | None,
    **protocol: object,
) -> TrialResult:
    # The same start for every candidate and trial.
    model = task.model.build(derive_seed(seed, _INIT), device=data.mean_image.device)
    optimizer = optimizer_for(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"the optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
    result = fit(
        model,
        optimizer,
        train,
        data.val,
        seed=derive_seed(seed, _TRAIN, chunk + 1),
        deadline=deadline,
        eval_batch=task.eval_batch,
        **protocol,
    )
    accuracy = FLOOR_FITNESS
    if result.reason is None:
        accuracy = loss_accuracy(model, *data.fitness, batch_size=task.eval_batch)[1]
    return TrialResult(chunk=chunk, accuracy=accuracy, fit=result)


def alr_fitness(
    task: Task,
    make_optimizer: OptimizerFactory,
    *,
    seed: int = 0,
    time_limit: float | None = None,
    dataset: FashionMNIST | None = None,
    device: str | torch.device | None = None,
) -> EvalResult:
    """ALR fitness: the minimum fitness-set accuracy over trials, trial i trained on chunk i.

    `make_optimizer(params)` builds the candidate's optimizer for a fresh model. Trials stop
    early once one scores below `task.alr.abort_below` (the minimum is already that low).
    `time_limit` (seconds) covers all trials; the data load (once per process, cached) is not
    charged to it. `dataset` overrides the Fashion-MNIST search (tests). `device` None: the
    GPU if there is one, else the CPU; results are reproducible per device, not across them.
    """
    start = time.perf_counter()
    _deadline(start, time_limit)  # a bad limit fails before any work
    data = prepare(task, seed, dataset, device)
    deadline = _deadline(time.perf_counter(), time_limit)  # the worker's data load is not charged
    protocol = task.alr
    if protocol.trials > len(data.chunks):
        raise ValueError(
            f"task {task.name!r} asks for {protocol.trials} trials but its data gives only "
            f"{len(data.chunks)} chunks of ~{task.data.chunk}; lower AlrProtocol.trials or "
            "DataSpec.chunk"
        )
    trials: list[TrialResult] = []
    reason = None
    for i in range(protocol.trials):
        trial = _trial(
            task,
            data,
            lambda model: make_optimizer(model.parameters()),
            data.chunks[i],
            i,
            seed,
            deadline,
            batch_size=protocol.batch_size,
            max_epochs=protocol.max_epochs,
            patience=protocol.patience,
            monitor="val_acc",
        )
        trials.append(trial)
        reason = None if trial.fit.reason is None else f"{trial.fit.reason} (trial {i})"
        if reason is not None or trial.accuracy < protocol.abort_below:
            break
    fitness = FLOOR_FITNESS if reason is not None else min(t.accuracy for t in trials)
    seconds = time.perf_counter() - start
    return EvalResult(fitness=fitness, trials=tuple(trials), seconds=seconds, reason=reason)


def dlr_fitness(
    task: Task,
    schedule: ScheduleFn,
    *,
    seed: int = 0,
    time_limit: float | None = None,
    dataset: FashionMNIST | None = None,
    device: str | torch.device | None = None,
    lr_scale: float = 1.0,
) -> EvalResult:
    """DLR fitness: fitness-set accuracy of plain SGD whose lr is `schedule(epoch, lr)` each epoch.

    Trained on the training pool (or its first `task.dlr.chunks` chunks), early stopping on
    validation loss, best weights restored. `time_limit`, `device` as for `alr_fitness`. SGD
    starts at `lr_scale` times the protocol's initial lr (`schedule` is then the scaled one:
    engine.modes.scaled_schedule).
    """
    if not callable(schedule):
        raise TypeError(
            f"schedule must be callable as schedule(epoch, lr) -> lr, got {type(schedule).__name__}"
        )
    start = time.perf_counter()
    _deadline(start, time_limit)
    data = prepare(task, seed, dataset, device)
    deadline = _deadline(time.perf_counter(), time_limit)
    protocol = task.dlr
    if protocol.chunks is not None and protocol.chunks > len(data.chunks):
        raise ValueError(
            f"task {task.name!r} trains DLR on {protocol.chunks} chunks but its data gives only "
            f"{len(data.chunks)}; lower DlrProtocol.chunks or DataSpec.chunk"
        )
    trial = _trial(
        task,
        data,
        lambda model: torch.optim.SGD(model.parameters(), lr=protocol.initial_lr * lr_scale),
        data.train(protocol.chunks),
        -1,
        seed,
        deadline,
        batch_size=protocol.batch_size,
        max_epochs=protocol.max_epochs,
        patience=protocol.patience,
        monitor="val_loss",
        schedule=schedule,
    )
    reason = trial.fit.reason
    fitness = FLOOR_FITNESS if reason is not None else trial.accuracy
    seconds = time.perf_counter() - start
    return EvalResult(fitness=fitness, trials=(trial,), seconds=seconds, reason=reason)


# --- presets ----------------------------------------------------------------------------------
# The presets are the fmnist-cnn family's sizes (engine/tasks/families/fmnist_cnn.py, named in
# the task registry), looked up on first use: that module builds them from the classes above.


def __getattr__(name: str) -> object:
    if name == "PRESETS":
        from engine.tasks.families.fmnist_cnn import SIZES

        return SIZES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_task(name: str, device: str | None = None) -> Task:
    """The preset called `name`, training on `device` (None: the GPU when there is one); an
    unknown name is an error that lists the valid ones."""
    presets = globals().get("PRESETS") or __getattr__("PRESETS")  # a test may patch PRESETS
    try:
        task = presets[name]
    except KeyError:
        raise ValueError(f"unknown task preset {name!r}; valid presets: {', '.join(presets)}") from None
    return task if device is None else dataclasses.replace(task, device=device)
