"""EvolvedOptimizer's torch.optim options: what `lr` does to a program that never reads it, decoupled
weight decay (AdamW) and maximize, parameter dtypes, and a parameter listed twice.

Every option is checked on every backend (Triton in its CPU interpreter) against a referee that does
not share the code under test: torch.optim.AdamW, the program with `mul(lr, ...)` written into its
text, or the float32 kernels with the weight rounded by torch.
"""

from __future__ import annotations

import pytest
import torch

from codegen import backends
from codegen.ir import Program
from kernels import EvolvedOptimizer, zoo

BACKENDS = tuple(backends.BACKENDS)  # the registry's: a new backend is tested here too
HALF = tuple(b for b in BACKENDS if "float16" in backends.get(b).dtypes)
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


# ---- dtypes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_parameters_compute_in_float64(backend):
    """zoo.adam with weight decay on float64 parameters follows torch's float64 AdamW far more
    closely than float32 arithmetic can (its constants are float32 values, hence not exact)."""
    ours, theirs, single = mlp(dtype=torch.float64), mlp(dtype=torch.float64), mlp()
    opt = EvolvedOptimizer(ours.parameters(), zoo.adam(), 1e-2, weight_decay=0.1, backend=backend)
    train(ours, opt, 100)
    train(theirs, torch.optim.AdamW(theirs.parameters(), 1e-2, weight_decay=0.1), 100)
    train(single, EvolvedOptimizer(single.parameters(), zoo.adam(), 1e-2, weight_decay=0.1,
                                   backend=backend), 100)
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert all(s["alpha"].dtype == s["beta"].dtype == torch.float64 for s in opt.state.values())
    diff64, diff32 = relative_difference(ours, theirs), relative_difference(single, theirs)
    assert diff64 < 1e-6 and diff64 < diff32 / 10, (diff64, diff32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("backend", HALF)
def test_half_parameters_keep_float32_states_and_round_the_weight_once(backend, dtype):
    """The same steps on float32 copies of the weights, rounded to the half dtype after every
    step (by torch), give the same weights bit for bit: float32 math, one rounding on store.
    Triton's interpreter truncates to bfloat16 (a GPU rounds to nearest, as torch does), so
    there the copies are truncated instead."""
    def rounded(f: torch.Tensor) -> torch.Tensor:
        if (backend, dtype) == ("triton", torch.bfloat16):
            return (f.view(torch.int32) & -65536).view(torch.float32)  # keep the top 16 bits
        return f.to(dtype).float()

    torch.manual_seed(0)
    half = [torch.nn.Parameter(torch.randn(40, 3).to(dtype)),
            torch.nn.Parameter(torch.randn(5).to(dtype))]
    full = [torch.nn.Parameter(p.detach().float()) for p in half]
    opt_half = EvolvedOptimizer(half, zoo.adam(), 1e-2, weight_decay=0.1, backend=backend)
    opt_full = EvolvedOptimizer(full, zoo.adam(), 1e-2, weight_decay=0.1, backend=backend)
    for step in range(20):
        gen = torch.Generator().manual_seed(step)
        for h, f in zip(half, full):
            h.grad = torch.randn(h.shape, generator=gen).to(dtype)
            f.grad = h.grad.float()
        opt_half.step()
        opt_full.step()
        with torch.no_grad():
            for f in full:
                f.copy_(rounded(f))
    for h, f in zip(half, full):
        assert h.dtype == dtype and opt_half.state[h]["alpha"].dtype == torch.float32
        assert torch.equal(h.float(), f)


def test_half_parameters_on_numba_are_refused_and_auto_picks_torch_on_the_cpu():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"numba backend updates float32, float64 parameters.*"
                                        r"torch.bfloat16.*backend='torch'"):
        EvolvedOptimizer([p], zoo.adam(), 1e-3, backend="numba")
    opt = EvolvedOptimizer([p], zoo.adam(), 1e-3)
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    opt.step()
    assert opt._arenas[0].kernel.backend == "torch" and p.dtype == torch.bfloat16


def test_a_group_of_mixed_dtypes_is_refused_with_the_fix():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"one dtype.*torch.float32.*torch.float64.*separate"):
        EvolvedOptimizer([a, b], zoo.adam(), 1e-3)
    EvolvedOptimizer([{"params": [a]}, {"params": [b]}], zoo.adam(), 1e-3)


def test_half_parameters_save_and_load_their_float32_states_exactly():
    """torch's load_state_dict casts state to the parameter's dtype; float32 states of bfloat16
    parameters must come back unrounded, so a resumed run continues bit for bit."""
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(7).to(torch.bfloat16))]

    def steps(params, opt, k):
        for step in k:
            params[0].grad = torch.randn(7, generator=torch.Generator().manual_seed(step)).to(
                torch.bfloat16)
            opt.step()

    ref = make()
    opt_ref = EvolvedOptimizer(ref, zoo.adam(), 1e-2, backend="torch")
    steps(ref, opt_ref, range(6))
    first = make()
    opt_first = EvolvedOptimizer(first, zoo.adam(), 1e-2, backend="torch")
    steps(first, opt_first, range(3))
    saved = opt_first.state_dict()
    resumed = [torch.nn.Parameter(first[0].detach().clone())]
    opt_resumed = EvolvedOptimizer(resumed, zoo.adam(), 1e-2, backend="torch")
    opt_resumed.load_state_dict(saved)
    assert opt_resumed.state[resumed[0]]["beta"].dtype == torch.float32
    steps(resumed, opt_resumed, range(3, 6))
    assert torch.equal(resumed[0], ref[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fresh_gradients_in_the_multi_launch_step_exactly_as_gradients_in_the_arena(dtype):
    """With numba's threads, torch's default zero_grad() steps through `kernel_multi`, reading
    each gradient where it lies (here also a view into one shared buffer, as DDP's bucket views
    are), and `zero_grad(set_to_none=False)` through `kernel`: same body, so the same bits, with
    weight decay and maximize, in float32 and float64."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba runs one thread here: no multi launch")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        models = [mlp(dtype=dtype) for _ in range(2)]
        opts = [EvolvedOptimizer(m.parameters(), zoo.adam(), backend="numba", lr=1e-2,
                                 weight_decay=0.1, maximize=True) for m in models]
        for step in range(5):
            gen = torch.Generator().manual_seed(100 + step)
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)
            for model, opt, fresh in zip(models, opts, (True, False)):
                opt.zero_grad(set_to_none=fresh)
                torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
                if fresh and step % 2:  # the gradients as views into one buffer, at an offset
                    params = list(model.parameters())
                    flat = torch.cat([torch.zeros(3, dtype=dtype)]
                                     + [p.grad.reshape(-1) for p in params])
                    offset = 3
                    for p in params:
                        p.grad = flat[offset:offset + p.numel()].view(p.shape)
                        offset += p.numel()
                opt.step()
        multi = [launch for plan in opts[0]._arenas[0].plans.values() for launch in plan.launches
                 if launch.parts]
        assert multi, "the fresh gradients never took the multi launch"
        assert_equal_models(*models)
    finally:
        numba.set_num_threads(before)
