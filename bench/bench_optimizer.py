"""A full optimizer step: EvolvedOptimizer (numba backend) against torch's fused and foreach Adam.

Why it matters: users train their own networks with what AutoLR evolves, and the engine trains
every candidate, so the step must cost no more than torch's best Adam. Two models:

* the reference Fashion-MNIST CNN of REFERENCE.md (Conv 32 3x3 -> Conv 64 3x3 -> maxpool ->
  dense 128 -> dense 10): 1,199,882 parameters in 8 tensors;
* a wide MLP, three 4096x4096 layers: 50,343,936 parameters in 6 tensors.

Rows per model (one `group=`): `EvolvedOptimizer(zoo.adam())` and `EvolvedOptimizer(zoo.ades())`
with gradients already in the arena (what a loop with `zero_grad(set_to_none=False)` gives),
the Adam program again when every step starts from fresh gradient tensors (after torch's default
`zero_grad()`: small ones are copied into the arena, large ones get a launch of their own),
`torch.optim.Adam(fused=True)` and `torch.optim.Adam(foreach=True)`. Gradients are set once, not
computed: the step alone is timed. `extra_info` holds each of our rows' speedup over fused and
foreach Adam (their time / ours) from a second timing that alternates our step with theirs round
by round (best of 50 rounds for the CNN, 10 for the MLP), so that the ratios compare steps that
saw the same, often shared, machine. Run:

    .venv/bin/python -m pytest bench/bench_optimizer.py --benchmark-only
"""

from __future__ import annotations

import gc

import pytest
import torch

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


def record_ratios(benchmark, peers, interleaved, model: str, ours) -> None:
    if benchmark.stats is None:  # --benchmark-disable
        return
    best = interleaved({"ours": ours, "fused": peers(model, "fused"),
                        "foreach": peers(model, "foreach")}, repeat=ROUNDS[model], warmup=1)
    benchmark.extra_info["speedup_vs_fused_adam"] = round(best["fused"] / best["ours"], 3)
    benchmark.extra_info["speedup_vs_foreach_adam"] = round(best["foreach"] / best["ours"], 3)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("program", ["adam", "ades"])
def test_evolved_optimizer_step(benchmark, peers, interleaved, program, model):
    net = model_with_grads(model)
    opt = EvolvedOptimizer(net.parameters(), zoo.ZOO[program](), backend="numba", lr=LR)
    opt.step()  # compiles, builds the arena, moves the gradients into it
    benchmark.group = f"optimizer step: {MODELS[model][1]}"
    benchmark.name = f"EvolvedOptimizer({program}) numba"
    benchmark.pedantic(opt.step, rounds=ROUNDS[model], iterations=1, warmup_rounds=1)
    record_ratios(benchmark, peers, interleaved, model, opt.step)


@pytest.mark.parametrize("model", MODELS)
def test_evolved_optimizer_step_from_fresh_grads(benchmark, peers, interleaved, model):
    """The step after torch's default zero_grad(): backward made new gradient tensors; the step
    copies the small ones into the arena and launches once per large one where it lies."""
    net = model_with_grads(model)
    fresh = [p.grad.clone() for p in net.parameters()]
    opt = EvolvedOptimizer(net.parameters(), zoo.adam(), backend="numba", lr=LR)
    opt.step()

    def new_grads():
        for p, g in zip(net.parameters(), fresh):
            p.grad = g

    benchmark.group = f"optimizer step: {MODELS[model][1]}"
    benchmark.name = "EvolvedOptimizer(adam) numba, fresh grads"
    benchmark.pedantic(opt.step, setup=new_grads, rounds=ROUNDS[model], iterations=1,
                       warmup_rounds=1)

    def fresh_step():
        new_grads()
        opt.step()

    record_ratios(benchmark, peers, interleaved, model, fresh_step)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_torch_adam_step(benchmark, kind, model):
    step = torch_adam_step(model, **{kind: True})
    benchmark.group = f"optimizer step: {MODELS[model][1]}"
    benchmark.name = f"torch Adam({kind}=True)"
    benchmark.pedantic(step, rounds=ROUNDS[model], iterations=1, warmup_rounds=1)
