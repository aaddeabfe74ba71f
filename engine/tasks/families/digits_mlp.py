"""digits-mlp: an MLP 64-64-10 on scikit-learn's bundled 8x8 handwritten digits.

Offline anywhere scikit-learn is installed, in about a second. The same split as
`engine.compare --task digits` at split seed 0: 997 train / 350 validation / 450 test.
"""

from __future__ import annotations

from engine.tasks.families._mlp import mlp
from engine.tasks.supervised import SupervisedTask


WIDTHS = (64, 64, 10)
# How engine.compare redraws this task's splits for each of its split seeds (a source of
# engine/tasks/compare_tasks.py and its (train, val, test) sizes).
HELD_OUT = {"source": "digits", "sizes": (997, 350, 450),
            "about": "held out (data): scikit-learn digits (8x8), MLP 64-64-10, 997 train / 350 "
                     "validation / 450 test"}


def load() -> dict:
    from engine.tasks.compare_tasks import all_splits

    return all_splits("digits-mlp", 0)


def build():
    return mlp(*WIDTHS)


def task() -> SupervisedTask:
    return SupervisedTask(name="digits-mlp", data=load, model=build, loss="cross_entropy",
                          metric="accuracy", batch_size=32, epochs=20, patience=5)
