"""The optimizer zoo: named optimizers written as ALR programs.

Each function returns a Program whose weight update is multiplied by the runtime input ``lr``, so
``EvolvedOptimizer(params, zoo.adam(), lr=1e-3)`` behaves like
``torch.optim.Adam(params, lr=1e-3)``.
The human optimizers follow torch's single-tensor implementations op for op wherever the ALR form
(``state <- state - delta``) allows it; where torch computes ``new = f(state)`` directly, the
program writes ``delta = sub(state, f(state))``, which gives ``f(state)`` exactly whenever the
subtraction is exact (Sterbenz: the new value within a factor of two of the old) and within an
ulp otherwise. Torch's host-side double-precision bias corrections become float32 ``pow`` of a
step counter (``sigma``, a uniform state advanced by ``sigma: -1.0``).

The programs are built from text, so ``print(zoo.adam())`` reads like the update it computes.
Optimizers with no torch.optim counterpart (Lion, AdaBelief) follow their papers' algorithms,
written out in plain torch in tests/test_zoo.py.
"""

from __future__ import annotations

import math

import numpy as np

from codegen.ir import Program, format_float

__all__ = ["ZOO", "adabelief", "adagrad", "ades", "adam", "bias_correction", "lion", "momentum",
           "nesterov", "rmsprop", "sgd", "sign", "signum"]


def _c(value: float) -> str:
    """A hyperparameter as program text: rounded to float32 as torch rounds a Python float scalar
    when it meets a float32 tensor (so `1 - beta` is computed in double first, as torch does)."""
    return format_float(float(np.float32(value)))


def _check(name: str, value: float, low: float, high: float = math.inf, *,
           high_open: bool = True, low_open: bool = False) -> None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (isinstance(value, (int, float)) and above and below):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"invalid {name}: {value!r} (expected a number in {lo}{low}, {high}{hi})")


def _ema(state: str, decay: float, x: str) -> str:
    # torch: state.mul_(decay).add_(x) / .addcmul_(...): new = decay*state + x, as a delta.
    return f"sub({state}, add(mul({_c(decay)}, {state}), {x}))"


def sgd() -> Program:
    """Plain SGD: ``p <- p - lr * g``."""
    return Program.parse("weight: mul(lr, grad)")


def momentum(momentum: float = 0.9) -> Program:  # noqa: A002 - torch's own keyword
    """Heavy-ball momentum as torch.optim.SGD(momentum=mu): ``buf <- mu*buf + g``,
    ``p <- p - lr*buf``.
    Torch's first step sets ``buf = g``, which is what ``mu*0 + g`` gives."""
    _check("momentum", momentum, 0.0)
    return Program.parse(f"alpha: {_ema('alpha', momentum, 'grad')}\n"
                         "weight: mul(lr, alpha)")


def nesterov(momentum: float = 0.9) -> Program:  # noqa: A002
    """torch.optim.SGD(momentum=mu, nesterov=True): ``buf <- mu*buf + g``,
    ``p <- p - lr*(g + mu*buf)``."""
    _check("momentum", momentum, 0.0, low_open=True)  # torch: Nesterov needs a momentum
    return Program.parse(f"alpha: {_ema('alpha', momentum, 'grad')}\n"
                         f"weight: mul(lr, add(grad, mul({_c(momentum)}, alpha)))")


def rmsprop(alpha: float = 0.99, eps: float = 1e-8) -> Program:
    """torch.optim.RMSprop (not centred, no momentum): ``v <- a*v + (1-a)*g*g``,
    ``p <- p - lr*g / (sqrt(v) + eps)``. The square average lives in the alpha slot."""
    _check("alpha", alpha, 0.0)
    _check("eps", eps, 0.0)
    v = _ema("alpha", alpha, f"mul(mul({_c(1 - alpha)}, grad), grad)")
    return Program.parse(f"alpha: {v}\n"
                         f"weight: div(mul(lr, grad), add(sqrt(alpha), {_c(eps)}))")


def bias_correction(beta: float) -> str:
    """Program text for ``1 - beta**sigma``, accurate in float32 for beta near 1.

    The plain ``sub(1.0, pow(beta, sigma))`` cancels: ``beta**t`` is within a rounding error of 1
    early on, so ``1 - 0.999**1`` comes out 1.3e-5 off in relative terms (and float32 0.999 is
    not 0.999), enough to move Adam's trajectory away from torch's (which computes this in double
    on the host). Kahan's expm1 trick fixes both: with ``x = t*ln(beta)`` (ln taken in double)
    and ``u = exp(x)``, ``(1 - u) * x / log(u)`` is ``1 - beta**t`` to a few ulps, because
    ``log(u)`` carries the same rounding as ``u``. ``x`` is clamped at -80, where ``beta**t`` is
    below 1e-34 and the answer is 1, so ``u`` never underflows to 0 (which would give 0/-inf)."""
    if beta == 0.0:
        return "1.0"
    x = f"max(-80.0, mul({_c(math.log(beta))}, sigma))"
    return f"div(mul(sub(1.0, exp({x})), {x}), log(exp({x})))"


def adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Program:
    """torch.optim.Adam: alpha is the first moment m, beta the second v, sigma the step count t::

        m <- m - (1-b1)*(m - g)                       (torch: m.lerp_(g, 1-b1))
        v <- b2*v + (1-b2)*g*g
        t <- t + 1
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    torch's lerp computes ``m + w*(g - m)`` for a weight ``w = 1-b1 < 0.5``, which the first line
    reproduces bit for bit; for ``b1 <= 0.5`` torch switches formula and the two differ by an ulp.
    The bias corrections ``1 - b^t`` are written out by :func:`bias_correction`; as with every
    program, the kernels compute these step-count-only subexpressions once per launch, not per
    element (they are loop-invariant).
    """
    beta1, beta2 = betas
    _check("beta1", beta1, 0.0, 1.0)
    _check("beta2", beta2, 0.0, 1.0)
    _check("eps", eps, 0.0)
    step_size = f"div(lr, {bias_correction(beta1)})"
    denom = f"add(div(sqrt(beta), sqrt({bias_correction(beta2)})), {_c(eps)})"
    return Program.parse(
        f"alpha: mul({_c(1 - beta1)}, sub(alpha, grad))\n"
        f"beta: {_ema('beta', beta2, f'mul(mul({_c(1 - beta2)}, grad), grad)')}\n"
        "sigma: -1.0\n"
        f"weight: div(mul({step_size}, alpha), {denom})")


def adagrad(eps: float = 1e-10) -> Program:
    """torch.optim.Adagrad with its defaults (``lr_decay=0``, ``initial_accumulator_value=0``;
    states start at zero): ``s <- s + g*g``, ``p <- p - lr*g / (sqrt(s) + eps)``. The sum of
    squares lives in the alpha slot."""
    _check("eps", eps, 0.0)
    return Program.parse("alpha: neg(mul(grad, grad))\n"
                         f"weight: div(mul(lr, grad), add(sqrt(alpha), {_c(eps)}))")


def adabelief(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-16) -> Program:
    """AdaBelief (Zhuang et al. 2020, Algorithm 2, with bias correction, no AMSGrad, no
    rectification): alpha is m, beta the belief s, sigma the step count t::

        m <- b1*m + (1-b1)*g
        s <- b2*s + (1-b2)*(g - m)^2 + eps            (eps inside s, as Algorithm 2 writes it)
        t <- t + 1
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps)

    This is the variant of the authors' own code (``exp_avg_var.add_(eps)`` before the square
    root, ``eps`` again after it), and their default ``eps=1e-16``. The bias corrections are
    written as Adam's are (:func:`bias_correction`)."""
    beta1, beta2 = betas
    _check("beta1", beta1, 0.0, 1.0)
    _check("beta2", beta2, 0.0, 1.0)
    _check("eps", eps, 0.0)
    belief = f"add(add(mul({_c(beta2)}, beta), mul({_c(1 - beta2)}, square(sub(grad, alpha)))), " \
             f"{_c(eps)})"
    step_size = f"div(lr, {bias_correction(beta1)})"
    denom = f"add(div(sqrt(beta), sqrt({bias_correction(beta2)})), {_c(eps)})"
    return Program.parse(
        f"alpha: {_ema('alpha', beta1, f'mul({_c(1 - beta1)}, grad)')}\n"
        f"beta: sub(beta, {belief})\n"
        "sigma: -1.0\n"
        f"weight: div(mul({step_size}, alpha), {denom})")


def lion(betas: tuple[float, float] = (0.9, 0.99)) -> Program:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2)
    without weight decay (``EvolvedOptimizer(weight_decay=...)`` adds the paper's decoupled
    decay)::

        c <- b1*m + (1-b1)*g
        p <- p - lr * sign(c)
        m <- b2*m + (1-b2)*g

    The momentum m lives in the alpha slot. A program updates its states before the weight reads
    them, so the weight sees the new m, not the m that c needs; it recovers that one as
    ``(m_new - (1-b2)*g) / b2``, which is the old m bit for bit in most elements and an ulp away in
    the rest. c, computed from it in the paper's order, so equals the paper's c in most elements
    and can differ in sign only where c is within rounding of zero. That recovery divides by b2,
    so b2 must be positive (b2 = 0 would make m the last gradient, and c unrecoverable)."""
    beta1, beta2 = betas
    _check("beta1", beta1, 0.0, 1.0)
    _check("beta2", beta2, 0.0, 1.0, low_open=True)
    old_m = f"div(sub(alpha, mul({_c(1 - beta2)}, grad)), {_c(beta2)})"
    c = f"add(mul({_c(beta1)}, {old_m}), mul({_c(1 - beta1)}, grad))"
    return Program.parse(f"alpha: {_ema('alpha', beta2, f'mul({_c(1 - beta2)}, grad)')}\n"
                         f"weight: mul(lr, sign({c}))")


def ades(beta1: float = 0.08922, beta2: float = 0.0891) -> Program:
    """ADES, as evolved (docs/protocol.md, "Named optimizers"), one state y in the alpha slot::

        y <- y - (1-beta1) * (y + (y + beta2) * (y + g))
        p <- p + lr * y

    At lr=1 (the optimizer's default) this is the paper's ``p <- p + y`` exactly."""
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"invalid {name}: {value!r} (expected a finite number)")
    return Program.parse(
        f"alpha: mul({_c(1 - beta1)}, add(alpha, mul(add(alpha, {_c(beta2)}), add(alpha, grad))))\n"
        "weight: neg(mul(lr, alpha))")


def sign() -> Program:
    """Sign: ``p <- p - lr * sign(g)``. The evolved step size (0.0009 on Fashion-MNIST, 0.000502
    on CIFAR-10) is the caller's ``lr``."""
    return Program.parse("weight: mul(lr, sign(grad))")


def signum(momentum: float = 0.9) -> Program:  # noqa: A002 - the paper's own name
    """signSGD with momentum, "Signum" (Bernstein et al. 2018, "signSGD: Compressed Optimisation
    for Non-Convex Problems", Algorithm 3, without weight decay)::

        m <- beta*m + (1-beta)*g
        p <- p - lr * sign(m)

    The momentum m lives in the alpha slot; unlike Lion, the weight reads the new m, so the
    program is the algorithm op for op."""
    _check("momentum", momentum, 0.0, 1.0)
    return Program.parse(f"alpha: {_ema('alpha', momentum, f'mul({_c(1 - momentum)}, grad)')}\n"
                         "weight: mul(lr, sign(alpha))")


# name -> factory, for CLIs and tests that iterate over the zoo.
ZOO = {"sgd": sgd, "momentum": momentum, "nesterov": nesterov, "rmsprop": rmsprop,
       "adam": adam, "adagrad": adagrad, "adabelief": adabelief, "lion": lion, "ades": ades,
       "sign": sign, "signum": signum}
