"""The MLP the built-in MLP families share, initialised like the CNN (Glorot-uniform weights,
zero biases) from torch's global generator, which the engine seeds before building a model."""

from __future__ import annotations

import torch
from torch import nn


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
