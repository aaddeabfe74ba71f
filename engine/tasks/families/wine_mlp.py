"""wine-mlp: a held-out tabular task, an MLP 13-32-3 on scikit-learn's bundled wine data,
trained on the Brier score.

178 wines from three cultivars, 13 chemical measurements each (standardised with the training
split's statistics). Held out from a discovery search on images by its data (tabular, three
classes, a hundred examples) and by its loss: the Brier score, the squared distance between the
softmax and the one-hot label (a bounded, proper scoring rule), not cross-entropy. Split once
(seed 0, stratified): 106 train / 36 validation / 36 test.

The metric is neg_loss, exp(-Brier): accuracy saturates on this data (most optimizers classify
all 36 test wines), so it would tie every seed. Cross-entropy's exp(-CE) would not saturate but
is a geometric mean, so one confident mistake among 36 wines drives it to 0; a huge learning rate
that fits the validation wines perfectly (CE 0) then scores 0 on test. The Brier score costs a
mistake at most 2/36, so the figure measures calibration over every wine, not the worst one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.tasks.families._mlp import tabular_task
from engine.tasks.supervised import SupervisedTask

WIDTHS = (13, 32, 3)
SIZES = (106, 36, 36)  # train, validation, test
_SPLIT = 0x3170  # derive_seed purpose of the split


def brier(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of sum_c (softmax_c - onehot_c)^2, in [0, 2]."""
    probs = torch.softmax(out, dim=-1)
    return (probs - F.one_hot(target, out.shape[-1]).to(probs.dtype)).square().sum(-1).mean()


def task() -> SupervisedTask:
    from sklearn.datasets import load_wine

    return tabular_task("wine-mlp", load_wine, WIDTHS, SIZES, _SPLIT, loss=brier,
                        metric="neg_loss", batch_size=8, epochs=50, patience=10)
