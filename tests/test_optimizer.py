"""EvolvedOptimizer as a torch optimizer: arena launches, skipped parameters, zero_grad, saving and
resuming bit for bit, LR schedulers, param groups, and every error a user can hit.

All on small generated tensors (no data set); Adam is the program of choice because it has the
most state (two tensors and a per-parameter step counter), and torch.optim.Adam is the referee.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels.runtime
from codegen import backends
from codegen.ir import ParseError, Program, reference_step
from kernels import EvolvedOptimizer, zoo

BACKENDS = tuple(backends.BACKENDS)  # the registry's: a new backend is tested here too


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches (the size of each)."""
    from kernels.arena import Arena
    calls: list[int] = []
    original = Arena.launch

    def counting(self, launch, *args):
        calls.append(launch.end - launch.start)
        return original(self, launch, *args)

    monkeypatch.setattr(Arena, "launch", counting)
    return calls


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-thread"])
def numba_threads(request):
    """Numba's thread count: with threads, gradients spread over several tensors (torch's
    default zero_grad()) take one multi launch; in a one-thread process, a launch each."""
    import numba
    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"numba runs at most {numba.config.NUMBA_NUM_THREADS} thread(s) here")
    before, torch_before = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(request.param)
    torch.set_num_threads(torch_before)  # numba's OpenMP layer may have reset torch's
    yield request.param
    numba.set_num_threads(before)
    torch.set_num_threads(torch_before)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4),
                               torch.nn.Tanh(), torch.nn.Linear(4, 2))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = data(step)
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, opt, steps: range, set_to_none: bool = True, scheduler=None) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=set_to_none)
        loss_of(model, step).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_close_models(a, b, rtol=1e-5):
    for p, q in zip(a.parameters(), b.parameters()):
        diff = ((p - q).abs().max() / q.abs().max()).item()
        assert diff < rtol, f"relative difference {diff:.2e}"


def assert_equal_models(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---- the arena: one launch per step --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_one_launch_per_step_for_the_whole_group(backend, launches):
    model = mlp()
    opt = EvolvedOptimizer(model.parameters(), zoo.adam(), backend=backend, lr=1e-3)
    train(model, opt, range(3))
    first, *_, last = model.parameters()
    span = (last.data_ptr() - first.data_ptr()) // 4 + last.numel()  # with 64-byte alignment
    assert span < sum(p.numel() for p in model.parameters()) + 16 * 6
    assert launches == [span] * 3


def test_auto_backend_is_numba_for_cpu_parameters():
    model = mlp()
    opt = EvolvedOptimizer(model.parameters(), zoo.sgd(), lr=0.1)
    train(model, opt, range(1))
    assert opt._arenas[0].kernel.backend == "numba"


def test_parameters_and_grads_become_views_of_one_buffer():
    model = mlp()
    opt = EvolvedOptimizer(model.parameters(), zoo.momentum(), backend="numba", lr=0.1)
    train(model, opt, range(1), set_to_none=False)
    params = list(model.parameters())
    base = params[0].data_ptr()
    offsets = [p.data_ptr() - base for p in params]
    assert all(offset % 64 == 0 for offset in offsets)  # each starts on a cache line
    assert all(b - a >= 4 * p.numel() and b - a < 4 * p.numel() + 64
               for a, b, p in zip(offsets, offsets[1:], params))
    grad_ptrs = [p.grad.data_ptr() for p in params]
    train(model, opt, range(1, 3), set_to_none=False)  # backward accumulates into the arena
    assert [p.grad.data_ptr() for p in params] == grad_ptrs
    assert all(opt.state[p]["alpha"].shape == p.shape for p in params)


def test_set_to_none_false_zeroes_the_arena_in_place():
    model = mlp()
    opt = EvolvedOptimizer(model.parameters(), zoo.sgd(), backend="numba", lr=0.1)
    train(model, opt, range(1))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("set_to_none", [True, False])
def test_matches_torch_adam_with_either_zero_grad(set_to_none):
    ours, theirs = mlp(), mlp()
    train(ours, EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-2),
          range(30), set_to_none)
    train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-2), range(30), set_to_none)
    assert_close_models(ours, theirs)


def test_a_parameter_without_grad_is_skipped_as_torch_skips_it(launches, numba_threads):
    """The middle layer is frozen for a while: its grad is None, so torch neither creates nor
    advances its state. Ours splits the launch around it, and the step counters then differ per
    parameter, which the arena must honour (one launch per run of agreeing counters; with
    threads, one multi launch per set of agreeing counters once gradients are fresh)."""
    ours, theirs = mlp(), mlp()
    opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    for model in (ours, theirs):
        model[2].requires_grad_(False)
    train(ours, opt_ours, range(4))
    train(theirs, opt_theirs, range(4))
    # before and after the frozen layer (with threads: after the first step, one multi launch)
    assert len(launches) == (4 * 2 if numba_threads == 1 else 2 + 3)
    middle = ours[2].weight
    assert middle not in opt_ours.state or not opt_ours.state[middle]
    for model in (ours, theirs):
        model[2].requires_grad_(True)
    launches.clear()
    train(ours, opt_ours, range(4, 10))
    train(theirs, opt_theirs, range(4, 10))
    # counters 10 | 6 | 10: three runs; with threads, two sets of agreeing counters
    assert len(launches) == 6 * (3 if numba_threads == 1 else 2)
    assert float(opt_ours.state[middle]["sigma"]) == 6.0
    assert float(opt_ours.state[ours[0].weight]["sigma"]) == 10.0
    assert_close_models(ours, theirs)
    assert set(opt_ours.state_dict()["state"]) == set(opt_theirs.state_dict()["state"])


def test_a_step_counter_written_in_place_is_honoured_at_the_next_step(launches, numba_threads):
    """The arena remembers the uniform states it left and plans from that; a user who writes
    one parameter's counter in place (as one may with torch Adam's `step`) must be noticed."""
    ours, theirs = mlp(), mlp()
    opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    train(ours, opt_ours, range(3))
    train(theirs, opt_theirs, range(3))
    launches.clear()
    opt_ours.state[ours[2].weight]["sigma"].fill_(40.0)
    opt_theirs.state[theirs[2].weight]["step"].fill_(40.0)
    train(ours, opt_ours, range(3, 6))
    train(theirs, opt_theirs, range(3, 6))
    # counters 4 | 41 | 4, then on: three runs; with threads, two sets of agreeing counters
    assert len(launches) == 3 * (3 if numba_threads == 1 else 2)
    assert float(opt_ours.state[ours[2].weight]["sigma"]) == 43.0
    assert_close_models(ours, theirs)


def test_a_user_assigned_grad_is_used_and_moved_into_the_arena():
    p = torch.nn.Parameter(torch.ones(3, 2))
    q = torch.nn.Parameter(torch.ones(4))
    opt = EvolvedOptimizer([p, q], zoo.sgd(), backend="numba", lr=0.5)
    p.grad = torch.full((2, 3), 2.0).t()  # not contiguous: copied in whatever its strides
    q.grad = torch.full((4,), 4.0)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, 2)) and torch.equal(q.detach(), -torch.ones(4))
    assert p.grad.data_ptr() + 64 == q.grad.data_ptr()  # now arena views, 64-byte aligned


def wide(seed: int = 0) -> torch.nn.Module:
    """One weight above DIRECT_MIN elements, between small ones."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.Tanh(),
                               torch.nn.Linear(300, 240), torch.nn.Tanh(), torch.nn.Linear(240, 2))


def test_large_fresh_gradients_are_updated_where_they_lie(launches, numba_threads):
    """After torch's default zero_grad() the big weight's new gradient is read where it lies (no
    copy). With numba's threads every fresh gradient is: one multi launch a step over all six
    tensors. In one thread the small ones are copied into the arena and the big one gets a
    launch of its own: three launches. The same answer either way."""
    from kernels.arena import DIRECT_MIN
    ours, theirs = wide(), wide()
    assert ours[2].weight.numel() >= DIRECT_MIN > ours[0].weight.numel()
    opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for step in range(6):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x + step), y).backward()
            fresh, small = model[2].weight.grad, model[0].weight.grad
            opt.step()
            if opt is opt_ours and step > 0:
                assert model[2].weight.grad is fresh  # not copied, not rebound
                assert (model[0].weight.grad is small) == (numba_threads > 1)
    # first step: everything copied in, one launch
    assert len(launches) == 1 + 5 * (3 if numba_threads == 1 else 1)
    assert_close_models(ours, theirs)


def test_set_to_none_false_settles_into_one_launch_for_large_tensors(launches):
    model = wide()
    opt = EvolvedOptimizer(model.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    train(model, opt, range(4), set_to_none=False)
    assert len(launches) == 4


def test_moving_a_parameter_out_of_the_arena_rebuilds_it():
    ours, theirs = mlp(), mlp()
    opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    train(ours, opt_ours, range(3))
    train(theirs, opt_theirs, range(3))
    for model in (ours, theirs):
        model[0].weight.data = model[0].weight.data.clone()  # what module._apply does
    train(ours, opt_ours, range(3, 8))
    train(theirs, opt_theirs, range(3, 8))
    assert_close_models(ours, theirs)
    assert ours[0].weight.data_ptr() + 4 * 64 == ours[0].bias.data_ptr()  # back in an arena


def test_channels_last_parameters_keep_their_layout():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = EvolvedOptimizer(conv.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    for _ in range(2):
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[conv.weight]["alpha"].stride() == conv.weight.stride()


def test_the_step_bumps_the_version_counter_like_torch():
    """Stepping between forward and backward is an error in torch; it must stay one."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = EvolvedOptimizer([p], zoo.sgd(), backend="numba", lr=0.1)
    p.grad = torch.ones(5)
    loss = (p * p).sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    model = mlp()
    opt = EvolvedOptimizer(model.parameters(), zoo.sgd(), backend="numba", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert second.item() < first.item()


# ---- groups, schedulers, saving ------------------------------------------------------------------

def test_param_groups_with_their_own_lr_match_torch():
    ours, theirs = mlp(), mlp()

    def groups(model):
        return [{"params": model[0].parameters(), "lr": 3e-2}, {"params": model[2].parameters()}]

    opt_ours = EvolvedOptimizer(groups(ours), zoo.adam(), backend="numba", lr=1e-2)
    opt_theirs = torch.optim.Adam(groups(theirs), lr=1e-2)
    opt_ours.add_param_group({"params": ours[4].parameters(), "lr": 5e-3})
    opt_theirs.add_param_group({"params": theirs[4].parameters(), "lr": 5e-3})
    train(ours, opt_ours, range(20))
    train(theirs, opt_theirs, range(20))
    assert [g["lr"] for g in opt_ours.param_groups] == [3e-2, 1e-2, 5e-3]
    assert_close_models(ours, theirs)


def test_step_lr_drives_lr_exactly_as_for_torch_adam():
    ours, theirs = mlp(), mlp()
    opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    sched_ours = torch.optim.lr_scheduler.StepLR(opt_ours, step_size=3, gamma=0.5)
    sched_theirs = torch.optim.lr_scheduler.StepLR(opt_theirs, step_size=3, gamma=0.5)
    for step in range(10):
        train(ours, opt_ours, range(step, step + 1), scheduler=sched_ours)
        train(theirs, opt_theirs, range(step, step + 1), scheduler=sched_theirs)
        assert opt_ours.param_groups[0]["lr"] == opt_theirs.param_groups[0]["lr"]
        assert sched_ours.get_last_lr() == sched_theirs.get_last_lr()
    assert opt_ours.param_groups[0]["lr"] == 1e-2 * 0.5 ** 3
    assert_close_models(ours, theirs)


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=80,
                                                    cycle_momentum=False),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=2e-2, step_size_up=7,
                                                  cycle_momentum=False)],
    ids=["OneCycleLR", "CyclicLR"])
def test_per_step_schedulers_match_torch_adam(make):
    """lr changes every step and must reach every launch fresh (cached launch plans, memoised
    step counters; test_the_host_advance_of_scalar_states_is_the_kernels covers a counter that
    reads lr). cycle_momentum needs a `momentum` or `betas` group key, which a program with its
    constants built in does not have; torch says so when asked."""
    ours, theirs = mlp(), mlp()
    opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-3)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    train(ours, opt_ours, range(80), scheduler=make(opt_ours))
    train(theirs, opt_theirs, range(80), scheduler=make(opt_theirs))
    assert opt_ours.param_groups[0]["lr"] == opt_theirs.param_groups[0]["lr"]
    assert_close_models(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_and_restored_optimizer_continues_bit_for_bit(backend):
    program = zoo.adam()
    reference = mlp()
    opt_ref = EvolvedOptimizer(reference.parameters(), program, backend=backend, lr=1e-2)
    train(reference, opt_ref, range(12))

    first = mlp()
    opt_first = EvolvedOptimizer(first.parameters(), program, backend=backend, lr=1e-2)
    train(first, opt_first, range(5))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, saved)
    del first, opt_first
    saved.seek(0)
    checkpoint = torch.load(saved)

    resumed = mlp(seed=99)  # different initial weights: all must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = EvolvedOptimizer(resumed.parameters(), program, backend=backend, lr=0.5)
    opt_resumed.load_state_dict(checkpoint["opt"])
    assert opt_resumed.param_groups[0]["lr"] == 1e-2
    train(resumed, opt_resumed, range(5, 12))
    assert_equal_models(resumed, reference)
    for p, q in zip(resumed.parameters(), reference.parameters()):
        for key in ("alpha", "beta", "sigma"):
            assert torch.equal(opt_resumed.state[p][key], opt_ref.state[q][key])


def test_state_dict_looks_like_torch_adams():
    ours, theirs = mlp(), mlp()
    opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    train(ours, opt_ours, range(3))
    train(theirs, opt_theirs, range(3))
    mine, torchs = opt_ours.state_dict(), opt_theirs.state_dict()
    assert mine["param_groups"][0]["params"] == torchs["param_groups"][0]["params"]
    assert set(mine["state"]) == set(torchs["state"])
    for index, state in mine["state"].items():
        assert set(state) == {"alpha", "beta", "sigma"}
        sigma, step = state["sigma"], torchs["state"][index]["step"]
        assert sigma.dtype == step.dtype == torch.float32 and sigma.dim() == 0
        assert sigma.item() == step.item() == 3
        assert state["alpha"].shape == torchs["state"][index]["exp_avg"].shape
    assert "mul(0.1, sub(alpha, grad))" in mine["program"]
    copy.deepcopy(mine)


def test_loading_another_programs_state_is_refused():
    model = mlp()
    adam = EvolvedOptimizer(model.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    train(model, adam, range(1))
    other = EvolvedOptimizer(mlp().parameters(), zoo.rmsprop(), backend="numba", lr=1e-2)
    with pytest.raises(ValueError, match="another program"):
        other.load_state_dict(adam.state_dict())


def test_the_optimizer_pickles_with_its_program():
    model = mlp()
    opt = EvolvedOptimizer(model.parameters(), zoo.adam(), backend="numba", lr=1e-2)
    train(model, opt, range(2))
    clone_model, clone = pickle.loads(pickle.dumps((model, opt)))
    assert clone.program == opt.program and clone.backend == "numba"
    # Param groups: the same hyperparameters, over the clone's own parameters.
    assert [{k: v for k, v in g.items() if k != "params"} for g in clone.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert [p for g in clone.param_groups for p in g["params"]] == list(clone_model.parameters())
    # State: every tensor and step counter, per parameter, bit for bit.
    pairs = list(zip(model.parameters(), clone_model.parameters(), strict=True))
    assert all(opt.state[p] and opt.state[p].keys() == clone.state.get(q, {}).keys()
               for p, q in pairs)
    for p, q in pairs:
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(clone.state[q][key])), key
    # And it goes on as the original does.
    train(model, opt, range(2, 5))
    train(clone_model, clone, range(2, 5))
    assert_equal_models(model, clone_model)


# ---- errors ----------------------------------------------------------------------------------

def test_integer_parameters_are_refused_with_the_fix():
    p = torch.ones(3, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"float32, float64, float16 and bfloat16.*torch.int32"):
        EvolvedOptimizer([p], zoo.adam())


def test_a_device_the_backend_cannot_run_on_is_refused():
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match=r"numba backend runs on CPU tensors.*meta.*backend="):
        EvolvedOptimizer([p], zoo.sgd(), backend="numba")


def test_triton_on_cpu_outside_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"triton backend runs on CUDA.*backend='numba'"):
        EvolvedOptimizer(mlp().parameters(), zoo.sgd(), backend="triton")


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        EvolvedOptimizer(mlp().parameters(), zoo.sgd(), backend="cuda")


def test_sparse_gradients_are_refused_with_the_alternative():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = EvolvedOptimizer(emb.parameters(), zoo.adam(), backend="numba", lr=1e-3)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"dense gradients.*sparse=False.*SparseAdam"):
        opt.step()


@pytest.mark.parametrize("lr, error, match", [
    (-1e-3, ValueError, r"invalid learning rate lr = -0.001"),
    (float("nan"), ValueError, r"invalid learning rate lr = nan"),
    (float("inf"), ValueError, r"finite number >= 0"),
    ("1e-3", TypeError, r"lr must be a number, not str"),
])
def test_bad_lr_is_refused(lr, error, match):
    with pytest.raises(error, match=match):
        EvolvedOptimizer(mlp().parameters(), zoo.adam(), lr=lr)


def test_bad_lr_in_a_param_group_or_from_a_user_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] = -1"):
        EvolvedOptimizer([{"params": model[0].parameters()},
                          {"params": model[2].parameters(), "lr": -1}], zoo.sgd(), lr=0.1)
    opt = EvolvedOptimizer(model.parameters(), zoo.sgd(), backend="numba", lr=0.1)
    with pytest.raises(ValueError, match="invalid learning rate"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": -0.5})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["lr"] = -0.1
    loss_of(model, 0).backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] = -0.1"):
        opt.step()


def test_program_text_that_does_not_parse_gives_the_parse_error():
    with pytest.raises(ParseError, match=r"line 2, column 16: expected .,., found .alpha."):
        EvolvedOptimizer(mlp().parameters(), "alpha: mul(0.1, grad)\nweight: mul(lr alpha)")


def test_a_program_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="Program or its text, not int"):
        EvolvedOptimizer(mlp().parameters(), 42)


# ---- bench/gpu/run.py where there is no GPU ------------------------------------------------------

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "run.py"


def run_gpu_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU paths, even on a GPU machine
    return subprocess.run([sys.executable, str(GPU_SCRIPT), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=GPU_SCRIPT.parents[2])


def test_gpu_script_without_a_gpu_says_so_and_exits_0():
    out = run_gpu_script()
    assert out.returncode == 0, out.stderr
    assert "NO CUDA GPU PRESENT" in out.stdout
    from kernels.zoo import ZOO

    # every zoo program, one Adam with other settings, and 50 random ones generate
    assert f"all {len(ZOO) + 1 + 50} programs" in out.stdout


def test_gpu_script_dry_run_in_the_interpreter():
    out = run_gpu_script("--interpret")
    assert out.returncode == 0, out.stdout + out.stderr
    checks = [line for line in out.stdout.splitlines() if line.startswith("| check")]
    assert len(checks) == 2 and all(line.rstrip(" |").endswith("ok") for line in checks)
    assert "EvolvedOptimizer(adam)" in out.stdout and "device copy" in out.stdout
    # section 5: the batched trainer on Triton kernels against one at a time, both sides' rows
    batched = [line for line in out.stdout.splitlines() if line.startswith("| batched")]
    assert len(batched) == 3 and "one at a time" in batched[0], out.stdout
    assert all("candidates/h" in line for line in batched), batched
    assert "K=4 stacked" in batched[2] and "x one at a time" in batched[2], batched


def test_gpu_check_accepts_what_flush_to_zero_explains():
    spec = importlib.util.spec_from_file_location("autolr_gpu_run", GPU_SCRIPT)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    program = Program.parse("weight: mul(grad, 1e-10)")
    weight, grad = np.zeros(2, np.float32), np.array([1e-30, 1.0], np.float32)
    flushed, _ = run.reference_step_ftz(program, weight, grad, {}, 1.0)
    exact, _ = reference_step(program, weight, grad, {}, 1.0)
    assert exact[0] != 0 and flushed[0] == 0  # 1e-40 is subnormal: the GPU gives 0
    assert flushed[1] == exact[1] == np.float32(-1e-10)


@pytest.mark.parametrize("program", [zoo.adam(), zoo.sgd(), Program.parse(
    "sigma: mul(0.5, sub(sigma, lr))\nweight: mul(sigma, grad)"), Program.parse(
    "alpha: -1.0\nbeta: sub(beta, pow(0.9, alpha))\nweight: mul(beta, grad)")])
def test_the_host_advance_of_scalar_states_is_the_kernels(program):
    """The arena's memoised advance (bytes in, a chain worked out per miss) against the kernel's
    own, step after step, at a steady lr and at one that changes every step."""
    from kernels.arena import CHAIN, Arena
    kernel = kernels.compile(program, "numba")
    arena = Arena(kernel, kernel.scalar_states, [], [], {}, torch.zeros(0))
    names = kernel.scalar_states

    def as_bytes(values):
        return np.array([values[s] for s in names], np.float32).tobytes()

    for old in (0.0, 1.0, 41.0, -3.5, float("nan"), float("inf")):
        for lrs in ([1.0] * (CHAIN + 5), [1e-3, 0.0, 1e-3, 2.0], [0.0] * 3):
            want = got = {s: old for s in names}
            for lr in lrs:
                want = kernel.advance_scalars(want, lr)
                got = arena.advance(as_bytes(got), lr)
                assert {k: float(v).hex() for k, v in got.items()} == \
                       {k: float(v).hex() for k, v in want.items()}


def test_loading_torch_adams_state_is_refused_with_the_reason():
    model = mlp()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, adam, range(1))
    ours = EvolvedOptimizer(mlp().parameters(), zoo.adam(), backend="numba", lr=1e-2)
    with pytest.raises(ValueError, match=r"holds \['exp_avg', 'exp_avg_sq', 'step'\].*another"):
        ours.load_state_dict(adam.state_dict())


@pytest.mark.parametrize("bucket_view", [False, True])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_distributed_data_parallel_trains_like_torch_adam(tmp_path, bucket_view, set_to_none):
    """DDP (one gloo process) all-reduces into its own buckets; with gradient_as_bucket_view the
    gradients *are* bucket views, which the arena must treat as gradients it does not own (copy
    or launch in place) without upsetting DDP's reducer. Warnings are errors here."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = DDP(mlp(), gradient_as_bucket_view=bucket_view)
            theirs = DDP(mlp(), gradient_as_bucket_view=bucket_view)
            opt_ours = EvolvedOptimizer(ours.parameters(), zoo.adam(), backend="numba", lr=1e-2)
            opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2)
            train(ours, opt_ours, range(20), set_to_none=set_to_none)
            train(theirs, opt_theirs, range(20), set_to_none=set_to_none)
        assert_close_models(ours.module, theirs.module)
    finally:
        dist.destroy_process_group()
