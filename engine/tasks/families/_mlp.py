"""The MLP the built-in MLP families share, initialised like the CNN (Glorot-uniform weights,
zero biases) from torch's global generator, which the engine seeds before building a model;
and the split of the bundled tabular data sets."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from engine.tasks.supervised import SupervisedTask


def mlp(*widths: int) -> nn.Sequential:
    """Flatten -> [Linear ReLU] per hidden width -> Linear; `widths` = (inputs, ..., outputs)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(a, b)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def standardised(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((x - mean) / std).float().contiguous()


def tabular_splits(loader: Callable[..., tuple], sizes: tuple[int, int, int],
                   purpose: int) -> dict:
    """A bundled scikit-learn classification data set (`loader`, e.g. load_wine) split once
    (seed 0; stratified, so that a small test split keeps every class), features standardised
    with the training split's statistics only."""
    from sklearn.model_selection import train_test_split

    from engine.tasks.protocol import derive_seed

    x, y = loader(return_X_y=True)
    n_train, n_val, n_test = sizes
    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=n_test, stratify=y,
                                  random_state=derive_seed(0, purpose, 0, bits=32))
    train, val = train_test_split(rest, train_size=n_train, test_size=n_val, stratify=y[rest],
                                  random_state=derive_seed(0, purpose, 1, bits=32))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    mean, std = xt[train].mean(0), xt[train].std(0)
    return {name: (standardised(xt[i], mean, std), yt[i].contiguous())
            for name, i in (("train", np.sort(train)), ("val", np.sort(val)),
                            ("test", np.sort(test)))}


def tabular_task(name: str, loader: Callable[..., tuple], widths: tuple[int, ...],
                 sizes: tuple[int, int, int], purpose: int, **protocol) -> SupervisedTask:
    """A held-out tabular family: an MLP of `widths` on `loader`'s data split by
    `tabular_splits`, and `protocol` (loss, metric, batch_size, epochs, patience)."""
    return SupervisedTask(name=name, data=functools.partial(tabular_splits, loader, sizes, purpose),
                          model=functools.partial(mlp, *widths), **protocol)
