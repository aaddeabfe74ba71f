"""digits-cnn: a held-out task, a small CNN on scikit-learn's bundled 8x8 handwritten digits.

The images and split of `digits-mlp` at split seed 0 (997 train / 350 validation / 450 test),
as 1x8x8 images, through conv 3x3 (8) -> ReLU -> conv 3x3 (16) -> ReLU -> max-pool 2 -> linear
64 -> ReLU -> linear 10. Held out by architecture from digits-mlp (convolutions, weight sharing,
pooling) and by data from the Fashion-MNIST CNN (8x8 digits, not 28x28 clothes).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.tasks.supervised import SupervisedTask


def load() -> dict:
    # The rows themselves, not engine.compare's all_splits: that reads the test split through
    # load_test_split, which engine.compare keeps for the final seeds alone.
    from sklearn.datasets import load_digits

    from engine.tasks.compare_tasks import digits_indices
    from engine.tasks.families.digits_mlp import HELD_OUT

    digits = load_digits()
    parts = dict(zip(("train", "val", "test"), digits_indices(0, HELD_OUT["sizes"])))
    mean = digits.data[parts["train"]].mean(axis=0) / 16.0  # as digits-mlp: train's mean image
    return {name: (torch.from_numpy((digits.data[i] / 16.0 - mean).astype(np.float32)
                                    .reshape(-1, 1, 8, 8)),
                   torch.from_numpy(digits.target[i].astype(np.int64)))
            for name, i in parts.items()}


def build() -> nn.Module:
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(),
              nn.Linear(64, 10)]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # as the other families: Glorot-uniform weights, zero biases
        for layer in layers:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(layer.weight)
                layer.bias.zero_()
    return model


def task() -> SupervisedTask:
    return SupervisedTask(name="digits-cnn", data=load, model=build, loss="cross_entropy",
                          metric="accuracy", batch_size=32, epochs=20, patience=5)
