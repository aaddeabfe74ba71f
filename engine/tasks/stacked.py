"""K models of one architecture as one stacked model over a (K, P) arena (see engine.tasks.batched
for why, and for what "the same as alone" means)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.tasks.compare_tasks import MLPSpec
from engine.tasks.training import (ModelSpec, _keep_below, _pool_kernels, _PoolReluDropout,
                                   _random_bytes, _ReluDropout, _scaled_mask)

__all__ = ["StackedModel"]

ALIGN = 16  # each member's row starts on a 64-byte boundary: cache lines, vector loads


class StackedModel:
    """K models of one spec (`MLPSpec` or the CNN's `ModelSpec`) as one, over a (K, P) arena.

    `weight` is the arena (K, P); `leaves` the stacked parameters (K, *shape), strided views of it
    that autograd differentiates; `forward(x, dropout)` gives logits (K, B, classes) for a batch
    `x` every member sees. `device` is where the arena lives; the members are built on the CPU and
    copied there, so they start the same on every device.
    """

    def __init__(self, spec: MLPSpec | ModelSpec, init_seeds: Sequence[int],
                 device: str | torch.device = "cpu") -> None:
        if not isinstance(spec, (MLPSpec, ModelSpec)):
            raise TypeError(f"StackedModel stacks an MLPSpec or a ModelSpec, not "
                            f"{type(spec).__name__}")
        if len(init_seeds) < 1:
            raise ValueError("StackedModel needs at least one member (init_seeds is empty)")
        self.spec, self.k = spec, len(init_seeds)
        models = [spec.build(int(s)) for s in init_seeds]  # the one-model init code, sliced
        params = [list(m.parameters()) for m in models]
        self.shapes = [tuple(p.shape) for p in params[0]]
        # Each parameter keeps its one-model memory layout (the CNN's are channels_last): a
        # convolution picks its algorithm, and so its summation order, from the layouts.
        self.strides = [tuple(p.stride()) for p in params[0]]
        self.offsets, total = [], 0
        for shape in self.shapes:
            self.offsets.append(total)
            total += math.prod(shape)
        self.numel = total
        self.row = -(-total // ALIGN) * ALIGN
        self.weight = torch.zeros((self.k, self.row), dtype=torch.float32, device=device)
        self.leaves = [self._view(self.weight, i) for i in range(len(self.shapes))]
        with torch.no_grad():
            torch._foreach_copy_(self.leaves, [torch.stack([ps[i].detach() for ps in params])
                                               .to(self.weight.device)
                                               for i in range(len(self.shapes))])
        for leaf in self.leaves:
            leaf.requires_grad_(True)
        # False: torch's pooling ops (same results, slower); the fused ones are numba, CPU only.
        self.fused_pool = self.weight.device.type == "cpu"

    def _view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        return buffer.as_strided((self.k, *self.shapes[i]), (self.row, *self.strides[i]),
                                 self.offsets[i])

    def grad_views(self, grad: torch.Tensor) -> list[torch.Tensor]:
        """The stacked parameters' places in a (K, P) gradient arena."""
        return [self._view(grad, i) for i in range(len(self.shapes))]

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights as its one-model `state_dict` holds them (copies)."""
        names = [name for name, _ in self.spec.build(0).named_parameters()]
        return {name: leaf[k].detach().clone() for name, leaf in zip(names, self.leaves)}

    def forward(self, x: torch.Tensor, dropout: torch.Generator | None = None,
                active: np.ndarray | None = None) -> torch.Tensor:
        """Logits (K, B, classes). Members with `active[k]` False may skip their work (the CNN
        does): their logits are then meaningless but finite."""
        if isinstance(self.spec, MLPSpec):
            return _mlp_forward(self.leaves, x)
        return _cnn_forward(self.leaves, x, self.spec, dropout, self.fused_pool, active)

    __call__ = forward


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(K, B, in) or a shared (B, in) -> (K, B, out): member k's `F.linear(h_k, w_k, b_k)`."""
    if h.dim() == 2:
        h = h.expand(w.shape[0], *h.shape)
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def _mlp_forward(leaves: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = x.reshape(x.shape[0], -1)
    pairs = list(zip(leaves[0::2], leaves[1::2]))
    for w, b in pairs[:-1]:
        h = torch.relu(_linear(h, w, b))
    return _linear(h, *pairs[-1])


def _cnn_forward(leaves: list[torch.Tensor], x: torch.Tensor, spec: ModelSpec,
                 dropout: torch.Generator | None, fused: bool,
                 active: np.ndarray | None) -> torch.Tensor:
    """The reference CNN (`engine.tasks.training.CNN.forward`) for K members at once.

    Every layer runs per member, with the one-model ops: on this CPU the CNN is compute bound
    in its convolutions, and one grouped convolution (groups=K, conv2) or one K-times-wider
    conv1 measured no faster than K separate ones (their backward passes slower), and `bmm`
    for the small dense layers gains little. Per-member ops make a member bit-for-bit what it
    is alone, and let frozen members skip their work (zero logits). What the batch shares is
    the data, the dropout masks (drawn once at one member's size from the shared generator, in
    the one-model order) and the loop around them."""
    w1, b1, w2, b2, wf1, bf1, wf2, bf2 = leaves
    k, n = w1.shape[0], x.shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    train1 = dropout is not None and spec.dropout1 != 0.0
    keep = _keep_below(spec.dropout1)
    fused = fused and keep is not None and _pool_kernels() is not None
    size = spec.image_size - 4
    pooled = size // 2
    drawn = None
    if train1:
        if fused:
            drawn = _random_bytes(n * spec.conv2 * size * size // 4, dropout)
            drawn = drawn.view(n, pooled, pooled, spec.conv2)
        else:
            drawn = _scaled_mask(n * spec.conv2 * pooled * pooled, spec.dropout1, dropout)
            drawn = drawn.view(n, pooled, pooled, spec.conv2).permute(0, 3, 1, 2)
    mask2 = None
    if dropout is not None and spec.dropout2 != 0.0:
        mask2 = _scaled_mask(n * spec.dense, spec.dropout2, dropout).view(n, spec.dense)
    scale1, scale2 = 1.0 / (1.0 - spec.dropout1), 1.0 / (1.0 - spec.dropout2)
    logits = []
    for j in range(k):
        if active is not None and not active[j]:
            logits.append(x.new_zeros(n, spec.classes))
            continue
        h = F.relu(F.conv2d(x, w1[j], b1[j]), inplace=True)
        h = F.conv2d(h, w2[j], b2[j])
        if fused:
            h = _PoolReluDropout.apply(h, drawn, keep if train1 else 256,
                                       scale1 if train1 else 1.0)
        elif train1:
            h = _ReluDropout.apply(F.max_pool2d(h, 2), drawn, scale1)
        else:
            h = torch.relu(F.max_pool2d(h, 2))
        h = F.linear(h.permute(0, 2, 3, 1).reshape(n, -1), wf1[j], bf1[j])  # Keras's flatten
        h = torch.relu(h) if mask2 is None else _ReluDropout.apply(h, mask2, scale2)
        logits.append(F.linear(h, wf2[j], bf2[j]))
    return torch.stack(logits)
