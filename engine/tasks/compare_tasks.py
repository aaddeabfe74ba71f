"""The tasks `engine.compare` trains on: the evolution task, held-out ones, and their three splits.

(Named for what it holds; it was `heldout.py`, though not all of its tasks are held out.)

An optimizer found on one task is only interesting if it also works where it was not found, so
besides the evolution presets (`quick`, and `paper` for a GPU or a long CPU run) there are tasks
that differ in architecture (`fmnist-mlp`: an MLP on Fashion-MNIST images the quick evolution run
never saw) or in data (`digits-mlp`, alias `digits`: scikit-learn's bundled 8x8 handwritten
digits, so it runs anywhere, offline, in seconds); and three that a discovery search on
Fashion-MNIST, digits-mlp and diabetes never uses: `wine-mlp` (other data and a Brier-score
loss), `cancer-mlp` (other data, a deeper MLP) and `digits-cnn` (digits-mlp's data through a
CNN), each a SupervisedTask whose own split is the same for every split seed. None is defined
here: each comes from the task registry (engine/tasks/registry.py), the presets from the
fmnist-cnn family and the MLPs of Fashion-MNIST and digits from their family files (widths,
batch size, epochs, and `HELD_OUT`: how compare redraws their splits per split seed); this
module holds only how each data source is split.

Every task has a train / validation / test split fixed by the split seed. The test split is kept
apart on purpose: `train_val` gives what tuning may see, and `load_test_split` is the only
function that reads test data; `engine.compare` calls it only in the final per-seed evaluation,
and the tests poison it during tuning to prove so.

For the Fashion-MNIST tasks the test split is the official 10,000-image test file, which the
evolution never reads (its fitness set comes from the training file). Normalisation is always the
training split's statistics, applied unchanged to validation and test.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from engine.tasks.data import load_fashion_mnist
from engine.tasks.protocol import PRESETS, derive_seed, make_split, prepare
from engine.tasks.training import ModelSpec

__all__ = ["CompareTask", "MLP", "MLPSpec", "Splits", "all_splits", "digits_indices",
           "from_reference", "get_task", "load_test_split", "names", "supervised", "train_val"]

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MLPSpec:
    """Flatten -> [Linear ReLU] per hidden width -> Linear(classes). No dropout."""

    inputs: int
    hidden: tuple[int, ...]
    classes: int = 10

    def build(self, seed: int) -> MLP:
        return MLP(self, seed)


class MLP(nn.Module):
    """A plain MLP initialised like the CNN (Glorot-uniform weights, zero biases) from `seed`.

    `forward(x, dropout=...)` takes and ignores the dropout generator, so `engine.tasks.training.fit`
    and `evaluate` drive it exactly as they drive the CNN.
    """

    def __init__(self, spec: MLPSpec, seed: int) -> None:
        super().__init__()
        widths = (spec.inputs, *spec.hidden, spec.classes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers:
                nn.init.xavier_uniform_(layer.weight, generator=generator)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor, dropout: torch.Generator | None = None) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


@dataclass(frozen=True)
class CompareTask:
    """A data source, a model and a training protocol (fixed epochs, best-validation epoch kept).

    `source` names how the splits are made (see `train_val`); `sizes` are (train, val, test)
    image counts where the source draws them itself (None: the source's own choice).
    """

    name: str
    about: str
    source: str
    model: ModelSpec | MLPSpec | None  # None for a SupervisedTask's (source "supervised")
    batch_size: int
    epochs: int
    sizes: tuple[int | None, int | None, int | None] = (None, None, None)
    eval_batch: int = 1000
    held_out: bool = True
    ref: str | None = None  # a SupervisedTask's reference (source "supervised")

    def build_model(self, seed: int) -> nn.Module:
        if self.source == "supervised":
            torch.manual_seed(seed)
            return supervised(self).model()
        return self.model.build(seed)


def from_reference(ref: str) -> CompareTask:
    """A SupervisedTask (a built-in family or FILE.py:CALLABLE) as engine.compare trains it:
    its model, batch size and epochs; its own train / val / test splits (it must have test)."""
    from engine.tasks.registry import resolve

    task, tref = resolve(ref)
    return CompareTask(name=task.name, about=f"task {ref} ({task.metric} on its test split)",
                       source="supervised", model=None, batch_size=task.batch_size,
                       epochs=task.epochs, eval_batch=task.eval_batch, ref=tref.ref)


@functools.lru_cache(maxsize=2)
def supervised(task: CompareTask):
    """The SupervisedTask behind a "supervised" CompareTask, resolved once per process."""
    from engine.tasks.registry import resolve

    return resolve(task.ref)[0]


@functools.lru_cache(maxsize=2)
def _supervised_data(task: CompareTask):
    from engine.tasks.supervised import load_data

    return load_data(supervised(task), need_test=True)


def _preset(name: str) -> CompareTask:
    """A preset size of the fmnist-cnn family as compare trains it: its model, ALR batch size and
    epoch budget, on the split's first chunk (all of the training pool for `paper`) and its
    validation set (both exactly what the evolution used for the same seed); tested on the
    official test file."""
    preset = PRESETS[name]
    data = preset.data
    train = "the whole training pool" if name == "paper" else f"chunk 0 ({data.chunk:,} train)"
    return CompareTask(
        name=name, about=f"evolution task: the {name} preset's CNN, Fashion-MNIST {train}, its "
        f"{data.val:,} validation images, official test set", source="preset", model=preset.model,
        batch_size=preset.alr.batch_size, epochs=preset.alr.max_epochs, held_out=False)


def _held_out(family: str, module) -> CompareTask:
    """A built-in MLP family whose splits compare redraws per split seed (its HELD_OUT): the
    family's own widths, batch size and epochs, and the MLP initialised from the seed."""
    task, widths = module.task(), module.WIDTHS
    return CompareTask(
        name=family, about=module.HELD_OUT["about"], source=module.HELD_OUT["source"],
        model=MLPSpec(widths[0], tuple(widths[1:-1]), widths[-1]), batch_size=task.batch_size,
        epochs=task.epochs, sizes=module.HELD_OUT["sizes"])


def names() -> tuple[str, ...]:
    """The names `engine.compare --task` takes besides a reference: all from the registry."""
    from engine.tasks.registry import ALIASES, FAMILIES

    return (*PRESETS, *(n for n in FAMILIES if n != "fmnist-cnn"), *ALIASES)


def get_task(name: str) -> CompareTask:
    """The task `name` names in the registry (a preset size of fmnist-cnn, a built-in family or
    its alias) or a SupervisedTask reference; an unknown name is a ValueError listing the valid
    ones."""
    from engine.tasks.registry import FAMILIES, canonical, family_module

    if name in PRESETS:
        return _preset(name)
    family = canonical(name)
    module = family_module(family) if family != "fmnist-cnn" else None
    if module is not None and hasattr(module, "HELD_OUT"):
        return _held_out(family, module)
    if ":" in name or (family in FAMILIES and family != "fmnist-cnn"):
        return from_reference(name)  # a TaskError (a ValueError) says what is wrong
    raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(names())} or "
                     "FILE.py:CALLABLE")


@dataclass(frozen=True, eq=False)
class Splits:
    """What tuning and training may see: the training and validation splits. No test data."""

    train: Pair
    val: Pair
    mean: np.ndarray  # the training split's mean input, subtracted from every split


# SeedSequence purposes of the splits (engine.tasks.protocol.derive_seed), apart from the
# evolution's (0-2) and the comparison's own; scikit-learn's random_state takes 32 bits.
_DIGITS_TEST, _DIGITS_VAL, _FMNIST_UNSEEN = 0xC0DE1, 0xC0DE2, 0xC0DE3


def _tensors(x: np.ndarray, y: np.ndarray, mean: np.ndarray, scale: float) -> Pair:
    x = x.astype(np.float32) / np.float32(scale) - mean.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def _images(x: np.ndarray) -> np.ndarray:
    return x[:, None, :, :]  # (N, 1, 28, 28), what the CNN takes; the MLP flattens


@functools.lru_cache(maxsize=4)
def digits_indices(seed: int, sizes: tuple[int | None, ...]) -> tuple[np.ndarray, ...]:
    """Train, validation and test rows of scikit-learn's digits for split seed `seed`
    (stratified, sorted): digits-mlp's split, which digits-cnn reads too."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    n_train, n_val, n_test = sizes
    rest, test = train_test_split(np.arange(len(labels)), test_size=n_test, stratify=labels,
                                  random_state=derive_seed(seed, _DIGITS_TEST, bits=32))
    train, val = train_test_split(rest, test_size=n_val, train_size=n_train,
                                  stratify=labels[rest],
                                  random_state=derive_seed(seed, _DIGITS_VAL, bits=32))
    return np.sort(train), np.sort(val), np.sort(test)


@functools.lru_cache(maxsize=4)
def _unseen_fmnist_indices(seed: int, sizes: tuple[int | None, ...]) -> tuple[np.ndarray, ...]:
    """Train and validation images of the Fashion-MNIST training file that the quick preset's
    split for the same seed leaves out: the evolution never trained or scored on them."""
    labels = load_fashion_mnist("train").labels
    split = make_split(labels, PRESETS["quick"].data, seed)
    used = np.concatenate([split.val, split.fitness, *split.chunks])
    unseen = np.setdiff1d(np.arange(len(labels)), used)
    n_train, n_val, _ = sizes
    train, val = train_test_split(unseen, train_size=n_train, test_size=n_val,
                                  stratify=labels[unseen],
                                  random_state=derive_seed(seed, _FMNIST_UNSEEN, bits=32))
    return np.sort(train), np.sort(val)


@functools.lru_cache(maxsize=2)
def train_val(task: CompareTask, seed: int) -> Splits:
    """The task's training and validation splits for split seed `seed` (cached per process).
    A SupervisedTask's splits are its own: the same for every seed."""
    if task.source == "supervised":
        data = _supervised_data(task)
        return Splits(train=data.train, val=data.val, mean=np.zeros(()))
    if task.source == "preset":
        data = prepare(PRESETS[task.name], seed)
        train = data.chunks[0] if task.name != "paper" else data.train()
        return Splits(train=train, val=data.val, mean=data.mean_image.numpy())
    if task.source == "fmnist-unseen":
        dataset = load_fashion_mnist("train")
        train, val = _unseen_fmnist_indices(seed, task.sizes)
        mean = dataset.images[train].mean(axis=0, dtype=np.float64) / 255.0
        return Splits(train=_tensors(_images(dataset.images[train]), dataset.labels[train],
                                     mean, 255.0),
                      val=_tensors(_images(dataset.images[val]), dataset.labels[val], mean, 255.0),
                      mean=mean)
    if task.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        train, val, _ = digits_indices(seed, task.sizes)
        mean = digits.data[train].mean(axis=0) / 16.0
        return Splits(train=_tensors(digits.data[train], digits.target[train], mean, 16.0),
                      val=_tensors(digits.data[val], digits.target[val], mean, 16.0), mean=mean)
    raise ValueError(f"task {task.name!r} has an unknown data source {task.source!r}")


@functools.lru_cache(maxsize=2)
def load_test_split(task: CompareTask, seed: int) -> Pair:
    """The task's test split, normalised with the training split's statistics.

    The only reader of test data: call it for the final evaluation, never while tuning.
    """
    if task.source == "supervised":
        return _supervised_data(task).test
    mean = train_val(task, seed).mean
    if task.source in ("preset", "fmnist-unseen"):
        test = load_fashion_mnist("test")
        return _tensors(_images(test.images), test.labels, mean, 255.0)
    if task.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        _, _, index = digits_indices(seed, task.sizes)
        return _tensors(digits.data[index], digits.target[index], mean, 16.0)
    raise ValueError(f"task {task.name!r} has an unknown data source {task.source!r}")


def all_splits(name: str, seed: int) -> dict[str, Pair]:
    """The task `name`'s three splits as a SupervisedTask's data() returns them: how the
    built-in families fmnist-mlp and digits-mlp share these tasks' data."""
    task = get_task(name)
    splits = train_val(task, seed)
    return {"train": splits.train, "val": splits.val, "test": load_test_split(task, seed)}
