"""EvolvedOptimizer's torch.optim options: what `lr` does to a program that never reads it, decoupled
weight decay (AdamW) and maximize, parameter dtypes, and a parameter listed twice.

Every option is checked on every backend (Triton in its CPU interpreter) against a referee that does
not share the code under test: torch.optim.AdamW, the program with `mul(lr, ...)` written into its
text, or the float32 kernels with the weight rounded by torch.
"""

from __future__ import annotations

import pytest
import torch

from codegen.ir import Program
from kernels import EvolvedOptimizer, zoo

BACKENDS = ("numba", "torch", "triton")
# An evolved-looking program: a momentum with its own step size, no `lr` anywhere.
EVOLVED = "alpha: mul(0.5, sub(alpha, grad))\nweight: div(mul(0.05, alpha), add(sqrt(abs(alpha)), 0.1))"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4),
                               torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)


def train(model, opt, steps: int, scheduler=None, start: int = 0) -> None:
    dtype = next(model.parameters()).dtype
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(((p.double() - q.double()).abs().max() / q.double().abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters()))


def assert_equal_models(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---- lr on a program that never reads it -----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scales_the_weight_update_of_a_program_that_never_reads_it(backend):
    """Under lr=1e-3 and CosineAnnealingLR, bit for bit the program with `mul(lr, ...)` written
    into its weight update; and not what lr=1.0 gives."""
    program = Program.parse(EVOLVED)
    assert not program.reads_lr
    written = Program.parse(EVOLVED.replace("weight: div(", "weight: mul(lr, div(") + ")")
    assert written.reads_lr
    a, b, c = mlp(), mlp(), mlp()
    opt_a = EvolvedOptimizer(a.parameters(), program, 1e-3, backend=backend)
    opt_b = EvolvedOptimizer(b.parameters(), written, 1e-3, backend=backend)
    opt_c = EvolvedOptimizer(c.parameters(), program, 1.0, backend=backend)
    steps = 40
    train(a, opt_a, steps, torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=steps))
    train(b, opt_b, steps, torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=steps))
    train(c, opt_c, steps)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] != 1e-3
    assert_equal_models(a, b)
    assert relative_difference(a, c) > 1e-2


# ---- weight decay and maximize ---------------------------------------------------------------------

ADAMW = {  # name -> (betas, eps, lr, weight decay, maximize); torch's defaults, then others
    "defaults": ((0.9, 0.999), 1e-8, 1e-3, 1e-2, False),
    "non-default": ((0.8, 0.99), 1e-6, 3e-3, 0.3, False),
    "maximize": ((0.9, 0.95), 1e-8, 2e-3, 0.1, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ADAMW)
def test_adam_with_weight_decay_matches_torch_adamw(case, backend):
    betas, eps, lr, wd, maximize = ADAMW[case]
    ours, theirs, start = mlp(), mlp(), mlp()
    opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(betas, eps), lr, weight_decay=wd,
                                maximize=maximize, backend=backend)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr, betas, eps, weight_decay=wd,
                                   maximize=maximize)
    train(ours, opt_ours, 200)
    train(theirs, opt_theirs, 200)
    assert relative_difference(theirs, start) > 1e-2
    diff = relative_difference(ours, theirs)
    assert diff < 1e-5, f"{case} on {backend}: relative difference {diff:.2e}"


def test_weight_decay_per_group_and_switched_during_training_matches_adamw():
    """Each group's lr and weight decay reach its own launch; turning weight decay (and maximize)
    on and off between steps switches the kernel, as torch reads its groups at every step."""
    ours, theirs = mlp(), mlp()

    def groups(model):
        return [{"params": model[0].parameters(), "weight_decay": 0.5, "lr": 2e-3},
                {"params": model[2].parameters()}, {"params": model[4].parameters(), "lr": 5e-3}]

    opt_ours = EvolvedOptimizer(groups(ours), zoo.adam(), 1e-3, weight_decay=0.1, backend="numba")
    opt_theirs = torch.optim.AdamW(groups(theirs), 1e-3, weight_decay=0.1)
    switches = ({}, {"weight_decay": 0.0}, {"maximize": True}, {"weight_decay": 0.2})
    for k, switch in enumerate(switches):
        for opt in (opt_ours, opt_theirs):
            opt.param_groups[1].update(switch)
        train(ours, opt_ours, 10, start=10 * k)
        train(theirs, opt_theirs, 10, start=10 * k)
    assert relative_difference(ours, theirs) < 1e-5


def test_weight_decay_is_fused_into_the_one_launch(monkeypatch):
    from kernels.arena import Arena
    calls = []
    original = Arena.launch
    monkeypatch.setattr(Arena, "launch", lambda self, *a: calls.append(a[-1]) or original(self, *a))
    model = mlp()
    opt = EvolvedOptimizer(model.parameters(), zoo.adam(), 1e-3, weight_decay=0.1,
                           backend="numba")
    train(model, opt, 2)
    assert calls == [(1.0 - 1e-3 * 0.1,)] * 2  # one launch a step, the factor as torch's
    assert opt._arenas[0].kernel.plan.decay


def test_maximize_climbs_what_minimize_descends():
    up, down = mlp(), mlp()
    train(up, EvolvedOptimizer(up.parameters(), EVOLVED, 0.3, maximize=True, backend="numba"), 5)
    train(down, EvolvedOptimizer(down.parameters(), EVOLVED.replace("sub(alpha, grad)",
                                                                    "add(alpha, grad)"),
                                 0.3, backend="numba"), 5)
    assert_equal_models(up, down)  # negating grad is exact: the same as writing add(alpha, grad)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"weight_decay": -0.1}, ValueError, r"invalid weight_decay value weight_decay = -0.1"),
    ({"weight_decay": float("nan")}, ValueError, r"weight_decay = nan"),
    ({"weight_decay": "0.1"}, TypeError, r"weight_decay must be a number, not str"),
    ({"maximize": 1}, TypeError, r"maximize must be True or False, not int"),
])
def test_bad_weight_decay_or_maximize_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        EvolvedOptimizer(mlp().parameters(), zoo.adam(), 1e-3, **kwargs)


def test_bad_weight_decay_in_a_group_is_refused_and_the_group_not_kept():
    model = mlp()
    opt = EvolvedOptimizer(model[0].parameters(), zoo.adam(), 1e-3, backend="numba")
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['weight_decay'\] = -1"):
        opt.add_param_group({"params": model[2].parameters(), "weight_decay": -1})
    assert len(opt.param_groups) == 1


def test_a_state_dict_saved_without_the_options_loads_with_torchs_defaults():
    model = mlp()
    opt = EvolvedOptimizer(model.parameters(), zoo.adam(), 1e-3, backend="numba")
    train(model, opt, 2)
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["weight_decay"], group["maximize"]
    opt.load_state_dict(old)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[0]["maximize"] is False
    train(model, opt, 1)


# ---- a parameter listed twice ----------------------------------------------------------------------

def test_a_parameter_listed_twice_is_refused_at_construction():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"parameter 1 of param_groups\[0\] is parameter 0 again"):
        EvolvedOptimizer([p, p], zoo.adam(), 1e-3)
    opt = EvolvedOptimizer([p], zoo.adam(), 1e-3)
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        opt.add_param_group({"params": [p]})
