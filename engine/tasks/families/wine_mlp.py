"""wine-mlp: a held-out tabular task, an MLP 13-32-3 on scikit-learn's bundled wine data.

178 wines from three cultivars, 13 chemical measurements each (standardised with the training
split's statistics). Held out from a discovery search on images: other data (tabular, three
classes, a few hundred examples) and another input scale. Split once (seed 0, stratified):
106 train / 36 validation / 36 test. The metric is neg_loss (exp(-cross-entropy), the
geometric-mean probability of the right cultivar): accuracy saturates on this data (most
optimizers reach 100 % on 36 test wines), so it would tie every seed, while the probability
still tells a confident model from a lucky one.
"""

from __future__ import annotations

from engine.tasks.families._mlp import tabular_task
from engine.tasks.supervised import SupervisedTask

WIDTHS = (13, 32, 3)
SIZES = (106, 36, 36)  # train, validation, test
_SPLIT = 0x3170  # derive_seed purpose of the split


def task() -> SupervisedTask:
    from sklearn.datasets import load_wine

    return tabular_task("wine-mlp", load_wine, WIDTHS, SIZES, _SPLIT, metric="neg_loss",
                        batch_size=8, epochs=50, patience=10)
