"""fmnist-mlp: an MLP 784-256-128-10 on Fashion-MNIST images the quick evolution never sees.

The same images as `engine.compare --task fmnist-mlp` at split seed 0: 10,000 training and 2,000
validation images of the training file that the quick preset's seed-0 split leaves out, and the
official 10,000-image test file.
"""

from __future__ import annotations

from engine.tasks.families._mlp import mlp
from engine.tasks.supervised import SupervisedTask


def load() -> dict:
    from engine.tasks.compare_tasks import all_splits

    return all_splits("fmnist-mlp", 0)


def build():
    return mlp(784, 256, 128, 10)


def task() -> SupervisedTask:
    return SupervisedTask(name="fmnist-mlp", data=load, model=build, loss="cross_entropy",
                          metric="accuracy", batch_size=100, epochs=8, patience=3)
