"""diabetes: regression (mse) with an MLP 10-32-1 on scikit-learn's bundled diabetes data.

442 patients, ten standardised features, and disease progression a year later (standardised
too, so the loss is in units of the target's variance: 1.0 is predicting the mean). Split once
(seed 0): 300 train / 70 validation / 72 test. The metric is neg_loss.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.tasks.families._mlp import mlp, standardised
from engine.tasks.protocol import derive_seed
from engine.tasks.supervised import SupervisedTask

_SPLIT = 0xD1AB  # derive_seed purpose


def load() -> dict:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(derive_seed(0, _SPLIT)).permutation(len(y))
    parts = {"train": order[:300], "val": order[300:370], "test": order[370:]}
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    train = parts["train"]
    x_mean, x_std = xt[train].mean(0), xt[train].std(0)
    y_mean, y_std = yt[train].mean(), yt[train].std()
    return {name: (standardised(xt[i], x_mean, x_std), standardised(yt[i], y_mean, y_std))
            for name, i in parts.items()}


def build():
    return mlp(10, 32, 1)


def task() -> SupervisedTask:
    return SupervisedTask(name="diabetes", data=load, model=build, loss="mse",
                          metric="neg_loss", batch_size=16, epochs=40, patience=8)
