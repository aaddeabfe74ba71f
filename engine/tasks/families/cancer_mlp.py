"""cancer-mlp: a held-out tabular task, an MLP 30-64-32-2 on scikit-learn's bundled breast
cancer (Wisconsin diagnostic) data.

569 tumours, 30 features of cell nuclei (standardised with the training split's statistics),
benign or malignant. Held out from a discovery search on images by its data (tabular, two
classes, imbalanced 63/37); a deeper MLP than the tabular diabetes task. Split once (seed 0,
stratified): 341 train / 114 validation / 114 test. Cross-entropy, scored by accuracy: one
tumour is 0.88 points, so optimizers near 97 % tie on some seeds, which the paired test's zero
handling (Pratt) counts rather than drops.
"""

from __future__ import annotations

from engine.tasks.families._mlp import tabular_task
from engine.tasks.supervised import SupervisedTask

WIDTHS = (30, 64, 32, 2)
SIZES = (341, 114, 114)  # train, validation, test
_SPLIT = 0xCA2C  # derive_seed purpose of the split


def task() -> SupervisedTask:
    from sklearn.datasets import load_breast_cancer

    return tabular_task("cancer-mlp", load_breast_cancer, WIDTHS, SIZES, _SPLIT,
                        loss="cross_entropy", metric="accuracy", batch_size=16, epochs=40,
                        patience=8)
