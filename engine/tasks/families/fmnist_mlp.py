"""fmnist-mlp: an MLP 784-256-128-10 on Fashion-MNIST images the quick evolution never sees.

The same images as `engine.compare --task fmnist-mlp` at split seed 0: 10,000 training and 2,000
validation images of the training file that the quick preset's seed-0 split leaves out, and the
official 10,000-image test file.
"""

from __future__ import annotations

from engine.tasks.families._mlp import mlp
from engine.tasks.supervised import SupervisedTask


WIDTHS = (784, 256, 128, 10)
# How engine.compare redraws this task's splits for each of its split seeds (a source of
# engine/tasks/compare_tasks.py and its (train, val, test) sizes; None: the official test file).
HELD_OUT = {"source": "fmnist-unseen", "sizes": (10000, 2000, None),
            "about": "held out (architecture): MLP 784-256-128-10 on 10,000 Fashion-MNIST images "
                     "outside the quick evolution pool, 2,000 validation, official test set"}


def load() -> dict:
    from engine.tasks.compare_tasks import all_splits

    return all_splits("fmnist-mlp", 0)


def build():
    return mlp(*WIDTHS)


def task() -> SupervisedTask:
    return SupervisedTask(name="fmnist-mlp", data=load, model=build, loss="cross_entropy",
                          metric="accuracy", batch_size=100, epochs=8, patience=3)
