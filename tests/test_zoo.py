"""The optimizer zoo against torch.optim, against its papers' algorithms, and against the AutoLR
papers' formulas (docs/protocol.md, "Named optimizers").

Parity: the same small CNN (1,819 parameters in 6 tensors, biases included), from the same initial
weights, on the same generated batches (no data set needed), trained for 200 steps by
`EvolvedOptimizer(zoo.X(...))` and by `torch.optim.X` (its default single-tensor path on the CPU).
The weights must agree to a relative difference under 1e-5 (per tensor: max |a - b| / max |b|).
They cannot agree bit for bit: torch's CPU kernels use fused multiply-adds (`add_(alpha=)`,
`lerp_`) and compute Adam's bias corrections in double on the host, while the programs round
every op in float32. Lion and AdaBelief have no torch.optim counterpart: their papers' algorithms
are written out below in plain torch (`PaperLion`, `PaperAdaBelief`), and the zoo is held to those
in the same way. Triton runs in its CPU interpreter (TRITON_INTERPRET=1): the arena makes it
one launch per step, so it trains the same model for the same 200 steps in about 3 s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codegen import backends
from codegen.ir import Program, evaluate
from kernels import EvolvedOptimizer, zoo

BACKENDS = tuple(backends.BACKENDS)  # the registry's: a new backend is tested here too
RTOL = 1e-5

# name -> (program, torch optimizer factory, lr); default and non-default hyperparameters.
CASES = {
    "sgd": (zoo.sgd, lambda p, lr: torch.optim.SGD(p, lr=lr), 0.05),
    "momentum": (zoo.momentum, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), 0.01),
    "momentum-0.5": (lambda: zoo.momentum(0.5),
                     lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.5), 0.02),
    "nesterov": (zoo.nesterov,
                 lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True), 0.01),
    "nesterov-0.7": (lambda: zoo.nesterov(0.7),
                     lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.7, nesterov=True), 0.02),
    "rmsprop": (zoo.rmsprop, lambda p, lr: torch.optim.RMSprop(p, lr=lr), 1e-3),
    "rmsprop-0.9": (lambda: zoo.rmsprop(alpha=0.9, eps=1e-6),
                    lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-6), 3e-3),
    "adam": (zoo.adam, lambda p, lr: torch.optim.Adam(p, lr=lr), 1e-3),
    "adam-0.8": (lambda: zoo.adam(betas=(0.8, 0.99), eps=1e-6),
                 lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.8, 0.99), eps=1e-6), 3e-3),
    # torch's Adagrad defaults: lr_decay=0 and initial_accumulator_value=0 (the only ones the zoo has)
    "adagrad": (zoo.adagrad, lambda p, lr: torch.optim.Adagrad(p, lr=lr), 0.01),
    "adagrad-1e-3": (lambda: zoo.adagrad(eps=1e-3),
                     lambda p, lr: torch.optim.Adagrad(p, lr=lr, eps=1e-3), 0.03),
    "lion": (zoo.lion, lambda p, lr: PaperLion(p, lr), 3e-4),
    "lion-0.95": (lambda: zoo.lion(betas=(0.95, 0.98)),
                  lambda p, lr: PaperLion(p, lr, betas=(0.95, 0.98)), 1e-3),
    "adabelief": (zoo.adabelief, lambda p, lr: PaperAdaBelief(p, lr), 1e-3),
    "adabelief-0.8": (lambda: zoo.adabelief(betas=(0.8, 0.99), eps=1e-6),
                      lambda p, lr: PaperAdaBelief(p, lr, betas=(0.8, 0.99), eps=1e-6), 3e-3),
}


class PaperLion(torch.optim.Optimizer):
    """Lion as Chen et al. 2023 write it (Algorithm 2), in plain float32 torch:
    c = b1*m + (1-b1)*g; p <- p - lr*(sign(c) + wd*p); m <- b2*m + (1-b2)*g."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (beta1, beta2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                g, m = p.grad, self.state[p].setdefault("m", torch.zeros_like(p))
                c = beta1 * m + (1 - beta1) * g
                p.sub_(lr * (torch.sign(c) + wd * p))
                m.copy_(beta2 * m + (1 - beta2) * g)


class PaperAdaBelief(torch.optim.Optimizer):
    """AdaBelief as Zhuang et al. 2020 write it (Algorithm 2 with bias correction; no AMSGrad, no
    rectification, no weight decay), in plain float32 torch. The variant: eps is added to s_t as
    it is stored (Algorithm 2's s_t = b2*s + (1-b2)*(g-m)^2 + eps, the authors' code's
    exp_avg_var.add_(eps)), s_hat = s_t / (1 - b2^t) with no second eps inside, and eps again
    outside the square root."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                state, g = self.state[p], p.grad
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), s=torch.zeros_like(p))
                state["t"] += 1
                t, m, s = state["t"], state["m"], state["s"]
                m.copy_(beta1 * m + (1 - beta1) * g)
                s.copy_(beta2 * s + (1 - beta2) * (g - m) ** 2 + eps)
                m_hat, s_hat = m / (1 - beta1 ** t), s / (1 - beta2 ** t)
                p.sub_(lr * m_hat / (torch.sqrt(s_hat) + eps))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(steps)]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(((p - q).abs().max() / q.abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_zoo_matches_torch_optim(name, backend):
    program, torch_opt, lr = CASES[name]
    steps = 200
    data = batches(steps)
    ours, theirs, start = small_cnn(), small_cnn(), small_cnn()
    train(ours, EvolvedOptimizer(ours.parameters(), program(), backend=backend, lr=lr), data)
    train(theirs, torch_opt(theirs.parameters(), lr), data)
    moved = relative_difference(theirs, start)
    assert moved > 1e-2, f"the weights hardly moved ({moved:.1e}): the comparison would be vacuous"
    diff = relative_difference(ours, theirs)
    print(f"{name} on {backend}: {steps} steps, max relative difference {diff:.2e}")
    assert diff < RTOL, f"{name} on {backend}: relative difference {diff:.2e} after {steps} steps"


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_with_weight_decay_is_the_papers(backend):
    """Lion's weight decay as its paper defines it, p <- p - lr*(sign(c) + wd*p), is
    EvolvedOptimizer's decoupled weight decay: p*(1 - lr*wd) - lr*sign(c), the same up to
    rounding. wd = 1.0 at lr = 1e-3 shrinks the weights by a fifth over 200 steps: visible."""
    steps, lr, wd = 200, 1e-3, 1.0
    data = batches(steps)
    ours, theirs, undecayed = small_cnn(), small_cnn(), small_cnn()
    train(ours, EvolvedOptimizer(ours.parameters(), zoo.lion(betas=(0.95, 0.98)), lr=lr,
                                 weight_decay=wd, backend=backend), data)
    train(theirs, PaperLion(theirs.parameters(), lr, betas=(0.95, 0.98), weight_decay=wd), data)
    train(undecayed, PaperLion(undecayed.parameters(), lr, betas=(0.95, 0.98)), data)
    assert relative_difference(theirs, undecayed) > 1e-2  # the decay matters: not vacuous
    diff = relative_difference(ours, theirs)
    assert diff < RTOL, f"Lion with weight decay on {backend}: relative difference {diff:.2e}"


def test_small_cnn_is_the_size_the_docstring_says():
    params = list(small_cnn().parameters())
    assert len(params) == 6 and sum(p.numel() for p in params) == 1819


# ---- the AutoLR papers' own optimizers, step by step against hand-written numpy ---------------

def ades_numpy(y: np.ndarray, w: np.ndarray, g: np.ndarray, beta1: float, beta2: float):
    """ADES (docs/protocol.md, "Named optimizers"): y <- y - (1-beta1)*(y + (y + beta2)*(y + g));
    w <- w + y (float32)."""
    f = np.float32
    y = y - f(1 - beta1) * (y + (y + f(beta2)) * (y + g))
    return y, w + y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("betas", [(0.08922, 0.0891), (0.8762, 0.7613)])
def test_ades_is_the_papers_formula(backend, betas):
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (3,), (2, 2, 2)]
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32)))
              for s in shapes]
    w = [p.detach().numpy().copy() for p in params]
    y = [np.zeros(s, np.float32) for s in shapes]
    opt = EvolvedOptimizer(params, zoo.ades(*betas), backend=backend)  # lr=1: the paper's form
    for _ in range(6):
        grads = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in shapes]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        for i, p in enumerate(params):
            y[i], w[i] = ades_numpy(y[i], w[i], grads[i], *betas)
            np.testing.assert_array_equal(opt.state[p]["alpha"].numpy(), y[i])
            np.testing.assert_array_equal(p.detach().numpy(), w[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_is_lr_times_sign_of_grad(backend):
    gen = torch.Generator().manual_seed(8)  # the same case every run: a failure can be replayed
    params = [torch.nn.Parameter(torch.randn(7, generator=gen)),
              torch.nn.Parameter(torch.randn(2, 3, generator=gen))]
    opt = EvolvedOptimizer(params, zoo.sign(), backend=backend, lr=0.0009)
    for _ in range(3):
        expected = []
        for p in params:
            g = torch.randn(p.shape, generator=gen)
            g.view(-1)[0] = 0.0  # sign(0) = 0: the weight stays
            p.grad = g
            expected.append(p.detach().numpy() - np.float32(0.0009) * np.sign(g.numpy()))
        opt.step()
        for p, want in zip(params, expected):
            np.testing.assert_array_equal(p.detach().numpy(), want)


# ---- the programs themselves ------------------------------------------------------------------

@pytest.mark.parametrize("name", zoo.ZOO)
def test_zoo_programs_round_trip_and_scale_the_weight_update_by_lr(name):
    program = zoo.ZOO[name]()
    assert isinstance(program, Program)
    assert Program.parse(str(program)) == program
    assert "lr" in str(program.weight)
    assert program.reads_grad_in_weight()


def test_zoo_state_layout():
    assert zoo.sgd().live_states() == zoo.sign().live_states() == ()
    assert zoo.ades().tensor_states() == zoo.momentum().tensor_states() == ("alpha",)
    assert zoo.adam().tensor_states() == ("alpha", "beta")
    assert zoo.adam().uniform_states() == ("sigma",)  # the step counter: a host scalar
    assert zoo.lion().tensor_states() == zoo.adagrad().tensor_states() == ("alpha",)
    assert zoo.adabelief().tensor_states() == ("alpha", "beta")
    assert zoo.adabelief().uniform_states() == ("sigma",)


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.99, 0.9999, 0.5, 1e-3])
def test_bias_correction_is_accurate_where_one_minus_pow_cancels(beta):
    expr = Program.parse(f"weight: mul(sigma, {zoo.bias_correction(beta)})").weight.args[1]
    steps = np.array([1, 2, 3, 10, 100, 1000, 5000, 1e5, 1e7], np.float32)
    got = evaluate(expr, {"sigma": steps})
    want = 1 - np.power(beta, steps.astype(np.float64))
    assert np.all(np.abs(got - want) <= 3e-7 * want), (got, want)
    naive = evaluate(Program.parse(f"weight: sub(1.0, pow({beta}, sigma))").weight,
                     {"sigma": steps})
    if beta >= 0.99:  # what the naive form would cost: 1 - 0.999**1 is 1e-5 off
        assert np.max(np.abs(naive - want) / want) > 1e-6


def test_bias_correction_of_zero_beta_is_one():
    assert zoo.bias_correction(0.0) == "1.0"
    assert str(zoo.adam(betas=(0.0, 0.999)).weight).startswith("div(mul(div(lr, 1.0)")


@pytest.mark.parametrize("call, bad", [
    (lambda: zoo.adam(betas=(1.0, 0.999)), "beta1"),
    (lambda: zoo.adam(betas=(0.9, -0.1)), "beta2"),
    (lambda: zoo.adam(eps=-1e-8), "eps"),
    (lambda: zoo.momentum(-0.1), "momentum"),
    (lambda: zoo.nesterov(0.0), "momentum"),
    (lambda: zoo.rmsprop(alpha=-1.0), "alpha"),
    (lambda: zoo.rmsprop(eps=float("nan")), "eps"),
    (lambda: zoo.ades(beta1=math.inf), "beta1"),
    (lambda: zoo.lion(betas=(0.9, 0.0)), "beta2"),  # m_{t-1} is recovered by dividing by beta2
    (lambda: zoo.lion(betas=(1.0, 0.99)), "beta1"),
    (lambda: zoo.adagrad(eps=-1.0), "eps"),
    (lambda: zoo.adabelief(betas=(0.9, 1.0)), "beta2"),
    (lambda: zoo.adabelief(eps=-1e-16), "eps"),
])
def test_bad_hyperparameters_name_the_value(call, bad):
    with pytest.raises(ValueError, match=bad):
        call()
