#!/usr/bin/env python3
"""Check and time AutoLR's Triton path on a CUDA GPU, in a few minutes, printing one table.

    python3 bench/gpu/run.py              # from the repository root, with the machine's own
                                          # torch (>= 2.11) and triton (3.6); no install step
    python3 bench/gpu/run.py --interpret  # a CPU dry run of every section at toy sizes, in
                                          # Triton's interpreter (how this script is tested)

1. Correctness: the Triton kernel of every zoo program and of 50 seeded random programs
   (tests/randprog.py) against the torch backend on the same GPU, one step from identical inputs
   (ordinary values at three scales plus edge values: 0, -0, +-inf, NaN, huge, tiny), three input
   sets each. Judged only where the float32 reference agrees with a float64 one (elsewhere
   rounding decides the answer). A program without exp/log/pow must give the same NaN/inf
   positions and values within 1e-4; one with them may differ by the GPU's approximate
   transcendentals (ex2/lg2.approx), counted as "approx" and failing only when more than 1% of
   its elements differ beyond 1e-2. Triton flushes float32 subnormals to zero on NVIDIA GPUs and
   torch does not, so an element also passes when Triton matches the float32 reference evaluated
   with every operand and result flushed (counted as "ftz").
2. Kernel step at 1M/10M/100M elements: the Adam and ADES programs against
   torch.optim.Adam(fused=True) on one parameter of that size and a device copy, in GB/s of the
   bytes each must move (triton.testing.do_bench: median, L2 flushed between runs).
3. A full optimizer step on the Fashion-MNIST CNN (1.2M parameters) and a 50M-parameter MLP:
   EvolvedOptimizer(zoo.adam()/zoo.ades(), backend="triton") against torch's fused and foreach Adam.
4. Per-segment launches (how batched training runs one program at many lr scales or seeds): the
   Triton `kernel_segments` of zoo programs over 64 segments with 64 different lrs, held bit for
   bit to the same kernel run on each segment alone, and its time against those 64 launches.
5. Batched training: candidates per hour of population-batched training (engine.tasks.batched
   `train_batch`, K = 64 and 256 members of the micro tier's 784-64-32-10 MLP stacked, each
   member's Triton kernel on its arena row) against the same candidates trained one at a time
   (`fit` with an EvolvedOptimizer on the Triton backend, timed on 16 of them), 90 steps of batch
   100 on random images, 8 zoo programs at several lrs; the ratio, and how far the batched
   accuracies are from the one-at-a-time ones (reduction-order noise only).

Without a GPU it says so, checks that everything imports and that every kernel's Triton source
generates and compiles as Python, and exits 0. Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Nothing is pip-installed on the GPU machine; section 5 lives beside this file.
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

N_RANDOM = 50
N_CHECK = 5003  # not a multiple of the block: the masked tail is checked too
TRIALS = 3
RTOL, RTOL_APPROX, APPROX_SHARE = 1e-4, 1e-2, 0.01
TRANSCENDENTAL = {"exp", "log", "pow"}
MB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true",
                        help="dry run on the CPU in Triton's interpreter, at toy sizes")
    return parser.parse_args(argv)


try:
    import numpy as np
    import torch

    import kernels  # imports no triton: main() picks the interpreter first if asked
    from codegen import cache
    from codegen.ir import (COMPARISON_SYMBOLS, REFERENCE_IMPL, STATES, Call, Const, Program,
                            Var, reference_step, walk)
    from kernels import EvolvedOptimizer, zoo
    from numerics import close
    from randprog import random_inputs, random_program
    from batch_training import batched_rows  # section 5, beside this file
except ImportError as exc:  # numpy is the one dependency torch does not bring along
    print(f"error: cannot import what the check needs ({exc}); AutoLR needs numpy and torch",
          file=sys.stderr)
    sys.exit(1)


# ---- the programs -------------------------------------------------------------------------------

def programs() -> list[tuple[str, Program]]:
    out = [(f"zoo.{name}", factory()) for name, factory in zoo.ZOO.items()]
    out.append(("zoo.adam(0.8, 0.99)", zoo.adam(betas=(0.8, 0.99), eps=1e-6)))
    out += [(f"random #{seed}", random_program(random.Random(seed))) for seed in range(N_RANDOM)]
    return out


def uses_transcendentals(program: Program) -> bool:
    return any(isinstance(n, Call) and n.op in TRANSCENDENTAL
               for expr in program.deltas().values() if expr is not None for n in walk(expr))


def generate_only(progs) -> int:
    """What can be checked without a GPU: every Triton source generates and is valid Python."""
    for name, program in progs:
        source = cache.source(program, "triton")
        compile(source, f"<triton kernel of {name}>", "exec")
    return len(progs)


# ---- 1. correctness: triton against the torch backend --------------------------------------------

def run_backend(kernel, device, weight, grad, states, lr, scalars) -> dict[str, np.ndarray]:
    w = torch.tensor(weight, device=device)
    st = {s: torch.tensor(states[s], device=device) for s in kernel.tensor_states}
    kernel(w, torch.tensor(grad, device=device), st, lr, scalars)
    out = {"weight": w.cpu().numpy()}
    out.update({s: t.cpu().numpy() for s, t in st.items()})
    return out


def flush(x):
    """Subnormal float32 values to a zero of the same sign, as the GPU's .ftz arithmetic does."""
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), x), x)


def evaluate_ftz(node, env):
    if isinstance(node, Const):
        return flush(np.float32(node.value))
    if isinstance(node, Var):
        return flush(env[node.name])
    args = [evaluate_ftz(a, env) for a in node.args]
    with np.errstate(all="ignore"):
        result = REFERENCE_IMPL[node.op](*args)
    return result if node.op in COMPARISON_SYMBOLS else flush(result)


def reference_step_ftz(program: Program, weight, grad, state, lr):
    """codegen.ir.reference_step in float32 with flush-to-zero after every op."""
    env = {"grad": flush(grad), "lr": flush(np.float32(lr))}
    env.update({s: flush(np.asarray(state.get(s, 0.0), np.float32)) for s in STATES})
    for s in STATES:
        delta = getattr(program, s)
        if delta is not None:
            with np.errstate(all="ignore"):
                env[s] = flush(env[s] - evaluate_ftz(delta, env))
    w = flush(weight)
    if program.weight is not None:  # the IR's lr rule, as reference_step applies it
        delta = program.weight if program.reads_lr else Call("mul", (Var("lr"), program.weight))
        with np.errstate(all="ignore"):
            w = flush(w - evaluate_ftz(delta, env))
    return w, env


def check_program(name: str, program: Program, device, n: int, seed: int) -> dict:
    """One program, TRIALS input sets: counts of elements judged, mismatched and skipped."""
    canonical = program.canonical()
    triton_k = kernels.compile(canonical, "triton")
    torch_k = kernels.compile(canonical, "torch")
    approx = uses_transcendentals(canonical)
    rng = np.random.default_rng(seed)
    result = {"name": name, "program": program, "approx": approx, "judged": 0, "bad": 0,
              "soft": 0, "ftz": 0, "skipped": 0, "example": ""}
    for _ in range(TRIALS):
        weight, grad = random_inputs(rng, n), random_inputs(rng, n)
        states = {s: random_inputs(rng, n) for s in triton_k.tensor_states}
        lr = float(rng.choice([1.0, 0.01, 3.0, 0.0, -0.5]))
        old = {s: float(rng.choice([0.0, 1.0, 7.0])) for s in triton_k.scalar_states}
        new = triton_k.advance_scalars(old, lr)
        got = run_backend(triton_k, device, weight, grad, states, lr, new)
        want = run_backend(torch_k, device, weight, grad, states, lr, new)
        ref_state = {**states, **old}
        ref32 = reference_step(canonical, weight, grad, ref_state, lr)
        ref64 = reference_step(canonical, weight, grad, ref_state, lr, dtype=np.float64)
        ftz = reference_step_ftz(canonical, weight, grad, ref_state, lr)
        for key in got:
            pick = (lambda ref: ref[0]) if key == "weight" else (lambda ref: ref[1][key])
            r32 = np.asarray(pick(ref32), np.float32)
            with np.errstate(over="ignore"):
                r64 = np.asarray(pick(ref64)).astype(np.float32)
            conditioned = close(r32, r64, 1e-5)
            tol = RTOL_APPROX if approx else RTOL
            flushed = close(got[key], np.broadcast_to(pick(ftz), (n,)), tol)
            strict = close(got[key], want[key], RTOL)
            ok = close(got[key], want[key], tol) | flushed
            result["judged"] += int(conditioned.sum())
            result["skipped"] += int((~conditioned).sum())
            result["soft"] += int((conditioned & ~strict & ok & ~flushed).sum())
            result["ftz"] += int((conditioned & ~close(got[key], want[key], tol) & flushed).sum())
            hard = conditioned & ~ok
            result["bad"] += int(hard.sum())
            if hard.any() and not result["example"]:
                i = int(np.flatnonzero(hard)[0])
                inputs = {"grad": grad[i], **{s: states[s][i] for s in states}, **old}
                result["example"] = (f"{key}[{i}]: triton {got[key][i]!r} torch {want[key][i]!r}"
                                     f" reference {r32[i]!r}; inputs {inputs}, lr {lr}")
    limit = APPROX_SHARE * result["judged"] if approx else 0
    result["failed"] = result["bad"] > limit
    return result


def check_all(progs, device, n: int, budget_s: float) -> list[dict]:
    """Every program, unless checking (mostly Triton's compiles) eats the time budget first."""
    start, results = time.perf_counter(), []
    for i, (name, program) in enumerate(progs):
        if time.perf_counter() - start > budget_s:
            print(f"  time budget spent: {len(progs) - i} programs left unchecked")
            break
        try:
            results.append(check_program(name, program, device, n, seed=i))
        except Exception as exc:  # a kernel that fails to compile or run is a failed check
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            results.append({"name": name, "program": program, "approx": False, "judged": 0,
                            "bad": 0, "soft": 0, "ftz": 0, "skipped": 0, "failed": True,
                            "example": f"{type(exc).__name__}: {first}"})
    return results


# ---- timing -------------------------------------------------------------------------------------

def timer_ms(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_ms(fn, reps: int = 3) -> float:  # --interpret: toy sizes, a plain median
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

    return cpu_ms


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def kernel_rows(device, sizes: list[int], ms_of) -> list[tuple]:
    rows = []
    programs_ = {"adam program": (zoo.adam(), 7), "ades program": (zoo.ades(), 5)}
    for n in sizes:
        size = f"{n // 10**6}M" if n >= 10**6 else f"{n // 1000}k"
        gen = torch.Generator(device=device).manual_seed(0)
        copy_src = torch.randn(n, device=device, generator=gen)
        copy_dst = torch.empty_like(copy_src)
        copy_ms = ms_of(lambda: copy_dst.copy_(copy_src))
        copy_bw = gbps(8 * n, copy_ms)
        del copy_src, copy_dst
        param = torch.nn.Parameter(torch.randn(n, device=device, generator=gen))
        param.grad = torch.randn(n, device=device, generator=gen) * 1e-3
        fused = torch.optim.Adam([param], lr=1e-3, fused=True)
        fused_ms = ms_of(fused.step)
        del param, fused
        for name, (program, arrays) in programs_.items():
            kernel = kernels.compile(program, "triton")
            w = torch.randn(n, device=device, generator=gen)
            g = torch.randn(n, device=device, generator=gen) * 1e-3
            st = {s: torch.zeros(n, device=device) for s in kernel.tensor_states}
            scalars = kernel.advance_scalars({}, 1e-3)
            ms = ms_of(lambda: kernel(w, g, st, 1e-3, scalars))
            bw = gbps(4 * arrays * n, ms)
            rows.append(("kernel", name, size, ms, bw, fused_ms / ms, bw / copy_bw, ""))
            del w, g, st
        rows.append(("kernel", "torch Adam(fused=True)", size, fused_ms, gbps(28 * n, fused_ms),
                     1.0, gbps(28 * n, fused_ms) / copy_bw, ""))
        rows.append(("kernel", "device copy", size, copy_ms, copy_bw, None, 1.0, "the limit"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


SEGMENTS = 64
SEGMENT_LRS = tuple(float(v) for v in np.geomspace(1e-4, 1.0, SEGMENTS))


def segment_rows(device, length: int, ms_of) -> list[tuple]:
    """One kernel_segments launch against one kernel call per segment: equal bit for bit (the
    segmented launch changes only where the scalars come from), and how much time it saves."""
    rows = []
    bounds = np.array([(k * (length + 5), k * (length + 5) + length) for k in range(SEGMENTS)],
                      np.int64)  # gaps between segments, which neither path may touch
    total = int(bounds[-1, 1]) + 5
    for name, program in (("adam", zoo.adam()), ("lion", zoo.lion()), ("ades", zoo.ades())):
        kernel = kernels.compile(program, "triton")
        gen = torch.Generator(device=device).manual_seed(1)
        weight0 = torch.randn(total, device=device, generator=gen)
        grad = torch.randn(total, device=device, generator=gen) * 1e-3
        scalars = [kernel.advance_scalars({}, lr) for lr in SEGMENT_LRS]
        table = torch.tensor([[lr, *(s[k] for k in kernel.scalar_states)]
                              for lr, s in zip(SEGMENT_LRS, scalars)], device=device)
        segs = torch.from_numpy(bounds).to(device)

        def fresh():
            return weight0.clone(), {s: torch.full((total,), 0.01, device=device)
                                     for s in kernel.tensor_states}

        w1, st1 = fresh()
        one = lambda: kernel.module.kernel_segments(  # noqa: E731
            segs, table, w1, grad, *(st1[s] for s in kernel.tensor_states))
        one()
        w2, st2 = fresh()
        views = [(slice(int(a), int(b)), lr, sc) for (a, b), lr, sc in
                 zip(bounds, SEGMENT_LRS, scalars)]

        def each():
            for where, lr, sc in views:
                kernel(w2[where], grad[where], {s: st2[s][where] for s in st2}, lr, sc)

        each()
        same = bool(torch.equal(w1, w2)) and all(torch.equal(st1[s], st2[s]) for s in st1)
        one_ms, each_ms = ms_of(one), ms_of(each)
        nbytes = 4 * (2 + 2 * len(kernel.tensor_states)) * SEGMENTS * length
        size = f"{SEGMENTS}x{length // 1000}k" if length >= 1000 else f"{SEGMENTS}x{length}"
        rows.append(("segments", f"{name}: one launch", size, one_ms, gbps(nbytes, one_ms),
                     None, None, "bit for bit" if same else "FAILED: differs from per-segment"))
        rows.append(("segments", f"{name}: {SEGMENTS} launches", size, each_ms,
                     gbps(nbytes, each_ms), None, None, f"{each_ms / one_ms:.1f}x slower"))
        if not same:
            raise AssertionError(f"kernel_segments of {name} differs from per-segment launches")
    return rows


def fmnist_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(9216, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10))


def wide_mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(3)))


def optimizer_rows(device, models: dict, ms_of) -> list[tuple]:
    rows = []
    for model_name, make in models.items():
        def net_with_grads():
            torch.manual_seed(0)
            with device:  # built where it trains: no 200 MB of CPU init for the MLP
                net = make()
            for p in net.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            return net

        with torch.device("meta"):
            size = f"{sum(p.numel() for p in make().parameters()) / 1e6:.1f}M params"
        timings = {}
        for kind in ("fused", "foreach"):
            opt = torch.optim.Adam(net_with_grads().parameters(), lr=1e-3, **{kind: True})
            timings[f"torch Adam({kind}=True)"] = ms_of(opt.step)
            del opt
        for program in ("adam", "ades"):
            opt = EvolvedOptimizer(net_with_grads().parameters(), zoo.ZOO[program](),
                                   backend="triton", lr=1e-3)
            opt.step()  # compile, build the arena
            timings[f"EvolvedOptimizer({program})"] = ms_of(opt.step)
            del opt
        fused_ms = timings["torch Adam(fused=True)"]
        for name, ms in timings.items():
            rows.append((f"step {model_name}", name, size, ms, None, fused_ms / ms, None, ""))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- the table ---------------------------------------------------------------------------------

def print_table(rows: list[tuple]) -> None:
    header = ("what", "case", "size", "ms", "GB/s", "x fused Adam", "of copy BW", "note")

    def fmt(v, i):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}" if i == 3 else f"{v:.0f}" if i == 4 else f"{v:.2f}"
        return str(v)

    cells = [header] + [tuple(fmt(v, i) for i, v in enumerate(r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells[1:]:
        print(line(c))


def check_rows(results: list[dict]) -> list[tuple]:
    rows = []
    exact = [r for r in results if not r["approx"]]
    approx = [r for r in results if r["approx"]]
    for label, group in (("no exp/log/pow", exact), ("with exp/log/pow", approx)):
        failed = [r for r in group if r["failed"]]
        note = (f"{sum(r['judged'] for r in group)} elements judged, "
                f"{sum(r['bad'] for r in group)} beyond tolerance, "
                f"{sum(r['soft'] for r in group)} approx (1e-4..1e-2), "
                f"{sum(r['ftz'] for r in group)} flushed subnormals (ftz), "
                f"{sum(r['skipped'] for r in group)} ill-conditioned or subnormal skipped; "
                + (f"FAILED: {', '.join(r['name'] for r in failed)}" if failed else "ok"))
        rows.append(("check", f"triton vs torch, {label}", f"{len(group)} programs",
                     None, None, None, None, note))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    # Generated kernels go to a fresh cache unless the caller chose one, never a stale one.
    os.environ.setdefault("AUTOLR_CACHE", tempfile.mkdtemp(prefix="autolr-gpu-"))
    import triton

    print(f"AutoLR GPU check: torch {torch.__version__}, triton {triton.__version__}, "
          f"numpy {np.__version__}, kernel cache {os.environ['AUTOLR_CACHE']}")
    progs = programs()
    if not torch.cuda.is_available() and not args.interpret:
        count = generate_only(progs)
        print("NO CUDA GPU PRESENT: nothing to time and no Triton kernel can run here. Checked "
              f"what can be: the packages import, and the Triton source of all {count} programs "
              "(the zoo and 50 random ones) generates and compiles as Python. Run this on a CUDA "
              "machine for the checks and the table (or --interpret for a CPU dry run).")
        return 0
    device = torch.device("cuda" if not args.interpret else "cpu")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # NaN/inf inputs are the point
    ms_of = timer_ms(device)

    n_check = N_CHECK if device.type == "cuda" else 1500
    checked = progs if device.type == "cuda" else progs[:10]
    results = check_all(checked, device, n_check, budget_s=180)
    rows = check_rows(results)
    print(f"correctness: {len(checked)} programs in {time.perf_counter() - start:.0f} s")
    for r in results:
        if r["failed"]:
            print(f"  FAILED {r['name']}: {r['bad']} of {r['judged']} elements, "
                  f"e.g. {r['example']}")
            print("    " + str(r["program"]).replace("\n", "\n    "))

    sizes = [10**6, 10**7, 10**8] if device.type == "cuda" else [10**4]
    models = ({"CNN": fmnist_cnn, "MLP": lambda: wide_mlp(4096)} if device.type == "cuda"
              else {"MLP (toy)": lambda: wide_mlp(64)})
    seg_length = 100_000 if device.type == "cuda" else 200
    batch_args = (([64, 256], (784, 64, 32, 10), 30, 3, 100) if device.type == "cuda"
                  else ([2, 4], (64, 16, 10), 2, 2, 16))
    segments_failed = []
    for section, make_rows in (("kernel", lambda: kernel_rows(device, sizes, ms_of)),
                               ("optimizer", lambda: optimizer_rows(device, models, ms_of)),
                               ("segments", lambda: segment_rows(device, seg_length, ms_of)),
                               ("batched", lambda: batched_rows(device, *batch_args))):
        try:  # one broken section must not cost the rest of the table
            rows += make_rows()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:150]
            rows.append((section, "ERROR", "", None, None, None, None,
                         f"{type(exc).__name__}: {first}"))
            if isinstance(exc, AssertionError):
                segments_failed.append(first)
        print(f"{section} timings done at {time.perf_counter() - start:.0f} s")
    print()
    print_table(rows)
    print(f"\n{time.perf_counter() - start:.0f} s in all. GB/s counts the bytes each step must "
          "move (Adam 28 B/element, ADES 20, copy 8); 'x fused Adam' is its time / ours.")
    return 1 if any(r["failed"] for r in results) or segments_failed else 0


if __name__ == "__main__":
    sys.exit(main())
