"""A full optimizer step: EvolvedOptimizer (numba backend) against torch's fused and foreach Adam.

Why it matters: users train their own networks with what AutoLR evolves, and the engine trains
every candidate, so the step must cost no more than torch's best Adam. Two models:

* the reference Fashion-MNIST CNN, Keras's mnist_cnn as the original AutoLR system trains it
  (Conv 32 3x3 -> Conv 64 3x3 -> maxpool -> dense 128 -> dense 10): 1,199,882 parameters in 8
  tensors;
* a wide MLP, three 4096x4096 layers: 50,343,936 parameters in 6 tensors.

Rows per model (one `group=`): `EvolvedOptimizer(zoo.adam())` and `EvolvedOptimizer(zoo.ades())`
with gradients already in the arena (what a loop with `zero_grad(set_to_none=False)` gives),
the Adam program again when every step starts from fresh gradient tensors (torch's default
`zero_grad()`, then new gradient tensors as backward makes them, untimed: the step alone is
timed), `torch.optim.Adam(fused=True)` and `torch.optim.Adam(foreach=True)`. Gradients are
random, not computed. `extra_info` holds each of our rows' speedup over fused and foreach Adam
(their time / ours) from a second timing that alternates our step with theirs round by round
(best of 50 rounds for the CNN, 10 for the MLP), so that the ratios compare steps that saw the
same, often shared, machine. ADES is a different algorithm from Adam (it moves fewer bytes): its
keys say `different_algorithm`, a comparison of two optimizers' costs, not of two implementations.
The 50M-parameter rows are long (seconds of set-up each, 1.6 GB of peers): `--bench-long`. Run:

    .venv/bin/python -m pytest bench/bench_optimizer.py --benchmark-only --bench-long
"""

from __future__ import annotations

import gc

import pytest
import torch

from benchlib import peer_ratio_key
from kernels import EvolvedOptimizer, zoo

LR = 1e-3
ROUNDS = {"cnn": 50, "mlp50m": 10}  # the minimum of many short steps is the quiet-machine figure


def fmnist_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Dropout(0.25), torch.nn.Flatten(),
        torch.nn.Linear(9216, 128), torch.nn.ReLU(), torch.nn.Dropout(0.5),
        torch.nn.Linear(128, 10))


def wide_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
        torch.nn.Linear(4096, 4096))


MODELS = {"cnn": (fmnist_cnn, "Fashion-MNIST CNN, 1.2M params, 8 tensors"),
          "mlp50m": (wide_mlp, "wide MLP, 50M params, 6 tensors")}
MODEL_PARAMS = ["cnn", pytest.param("mlp50m", marks=pytest.mark.bench_long)]


def model_with_grads(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3  # gradient-sized: no NaN or denormals over repeats
    return model


def torch_adam_step(name: str, **kwargs):
    model = model_with_grads(name)
    return torch.optim.Adam(model.parameters(), lr=LR, **kwargs).step


@pytest.fixture(scope="module")
def peers():
    """torch's fused and foreach Adam steps on their own copies of each model, built once."""
    cache: dict[tuple[str, str], object] = {}

    def get(model: str, kind: str):
        if (model, kind) not in cache:
            if len({m for m, _ in cache} | {model}) > 1:  # the MLP's peers take 1.6 GB: one model
                cache.clear()                              # at a time
                gc.collect()
            cache[(model, kind)] = torch_adam_step(model, **{kind: True})
        return cache[(model, kind)]

    return get


def record_ratios(benchmark, peers, interleaved, model: str, program: str, ours,
                  setup=None) -> None:
    """Our step's speedups over fused and foreach Adam; `setup` (untimed) runs before each of
    our steps, as in the row's pedantic timing."""
    if benchmark.stats is None:  # --benchmark-disable
        return
    best = interleaved({"ours": ours, "fused": peers(model, "fused"),
                        "foreach": peers(model, "foreach")}, repeat=ROUNDS[model], warmup=1,
                       setups={"ours": setup} if setup else None)
    for peer in ("fused", "foreach"):
        benchmark.extra_info[peer_ratio_key(program, peer)] = round(best[peer] / best["ours"], 3)


@pytest.mark.parametrize("model", MODEL_PARAMS)
@pytest.mark.parametrize("program", ["adam", "ades"])
def test_evolved_optimizer_step(benchmark, peers, interleaved, program, model):
    net = model_with_grads(model)
    opt = EvolvedOptimizer(net.parameters(), zoo.ZOO[program](), backend="numba", lr=LR)
    opt.step()  # compiles, builds the arena, moves the gradients into it
    benchmark.group = f"optimizer step: {MODELS[model][1]}"
    benchmark.name = f"EvolvedOptimizer({program}) numba"
    benchmark.pedantic(opt.step, rounds=ROUNDS[model], iterations=1, warmup_rounds=1)
    record_ratios(benchmark, peers, interleaved, model, program, opt.step)


def backward_after_zero_grad(opt: torch.optim.Optimizer, grads: list[torch.Tensor]):
    """A setup that leaves the gradients as `opt.zero_grad()` (torch's default call) and then a
    backward would: a new tensor where `.grad` became None, an accumulation where it stayed."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def setup() -> None:
        opt.zero_grad()
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    return setup


@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_evolved_optimizer_step_from_fresh_grads(benchmark, peers, interleaved, model):
    """The step after torch's default zero_grad(): backward made new gradient tensors; the step
    reads them where they lie, in one multi launch (numba's threads; see kernels.arena). Making
    the gradients is backward's work, not the step's: both timings leave it out."""
    net = model_with_grads(model)
    grads = [p.grad.clone() for p in net.parameters()]
    opt = EvolvedOptimizer(net.parameters(), zoo.adam(), backend="numba", lr=LR)
    opt.step()
    new_grads = backward_after_zero_grad(opt, grads)
    benchmark.group = f"optimizer step: {MODELS[model][1]}"
    benchmark.name = "EvolvedOptimizer(adam) numba, fresh grads"
    benchmark.pedantic(opt.step, setup=new_grads, rounds=ROUNDS[model], iterations=1,
                       warmup_rounds=1)
    record_ratios(benchmark, peers, interleaved, model, "adam", opt.step, setup=new_grads)


@pytest.mark.parametrize("model", MODEL_PARAMS)
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_torch_adam_step(benchmark, kind, model):
    step = torch_adam_step(model, **{kind: True})
    benchmark.group = f"optimizer step: {MODELS[model][1]}"
    benchmark.name = f"torch Adam({kind}=True)"
    benchmark.pedantic(step, rounds=ROUNDS[model], iterations=1, warmup_rounds=1)
