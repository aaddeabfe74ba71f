"""The on-disk kernel cache: warm loads across processes, corruption, concurrency, `show`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import marshal
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kernels
from codegen import backends, cache
from codegen.ir import Program

PROGRAM = """alpha: mul(0.1, sub(alpha, grad))
beta: mul(0.001, sub(beta, square(grad)))
sigma: -1.0
weight: mul(lr, div(div(alpha, sub(1.0, pow(0.9, sigma))), add(sqrt(div(beta, sub(1.0, pow(0.999, sigma)))), 1e-08)))"""

# Compiles and runs one step in a fresh interpreter; prints timing and numba's cache statistics.
CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import numba, torch, kernels
    t1 = time.perf_counter()
    k = kernels.compile(sys.argv[1], "numba")
    w, g = torch.ones(1000), torch.full((1000,), 0.5)
    states = {s: torch.zeros(1000) for s in k.tensor_states}
    k(w, g, states, 0.01, k.advance_scalars({}, 0.01))
    t2 = time.perf_counter()
    from codegen.backends.numba import kernel_fn
    stats = kernel_fn(k.module).stats  # the serial loop: this child runs one Numba thread
    print(json.dumps({"seconds": t2 - t1, "hits": sum(stats.cache_hits.values()),
                      "misses": sum(stats.cache_misses.values()), "w": w[0].item()}))
""")


def run_child(program: str, root: Path) -> dict:
    env = dict(os.environ, AUTOLR_CACHE=str(root), NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, program], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_second_compile_in_a_fresh_process_loads_from_disk(tmp_path, capsys):
    cold = run_child(PROGRAM, tmp_path)
    source = cache.kernel_path(Program.parse(PROGRAM).hash, "numba", tmp_path)
    mtime = source.stat().st_mtime_ns
    warm = run_child(PROGRAM, tmp_path)
    with capsys.disabled():
        print(f"\n  numba compile + first step: cold {cold['seconds'] * 1e3:.0f} ms, "
              f"warm (from disk) {warm['seconds'] * 1e3:.0f} ms")
    assert cold["misses"] == 1 and cold["hits"] == 0
    assert warm["hits"] == 1 and warm["misses"] == 0  # machine code came from numba's cache
    assert source.stat().st_mtime_ns == mtime  # the source was not rewritten
    assert warm["w"] == cold["w"]


def test_corrupt_cache_file_is_regenerated_never_imported(tmp_path):
    program = Program.parse(PROGRAM)
    path = cache.kernel_path(program.hash, "torch", tmp_path)
    cache.load(program, "torch", tmp_path)
    good = path.read_text()
    # A file that would raise on import if it were ever executed.
    path.write_text(good.replace("import torch", "raise SystemExit('imported a corrupt kernel')", 1))
    with pytest.warns(cache.CacheWarning, match="differs from the kernel generated"):
        module = cache.load(program, "torch", tmp_path)
    assert path.read_text() == good
    assert module.TENSOR_STATES == ("alpha", "beta")
    path.write_text(good[: len(good) // 2])  # truncated
    with pytest.warns(cache.CacheWarning):
        cache.load(program, "torch", tmp_path)
    assert path.read_text() == good


def restamp(path: Path, body: str) -> None:
    """Write `body` under a stamp recomputed for it, as someone who edits a cached kernel can."""
    version = path.read_text().split(" sha256=", 1)[0]
    path.write_text(f"{version} sha256={hashlib.sha256(body.encode()).hexdigest()}\n{body}")


def compile_in_child(program: str, backend: str, root: Path) -> subprocess.CompletedProcess:
    """kernels.compile in a fresh interpreter, as an engine worker calls it."""
    code = f"import kernels; kernels.compile({program!r}, {backend!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, AUTOLR_CACHE=str(root), NUMBA_NUM_THREADS="1"))


@pytest.mark.parametrize("backend", tuple(backends.BACKENDS))
def test_an_edited_and_restamped_kernel_is_never_executed(tmp_path, backend):
    program = Program.parse(PROGRAM)
    path = cache.kernel_path(program.hash, backend, tmp_path)
    cache.load(program, backend, tmp_path)
    good = path.read_text()
    marker = tmp_path / "marker"
    restamp(path, f"open({str(marker)!r}, 'w').write('executed')\n" + good.split("\n", 1)[1])
    child = compile_in_child(PROGRAM, backend, tmp_path)
    assert not marker.exists()
    assert child.returncode == 0, child.stderr
    assert "differs from the kernel generated for its program" in child.stderr
    assert path.read_text() == good
    # And in this process, where the module is already loaded: the file is still checked.
    restamp(path, good.split("\n", 1)[1] + f"open({str(marker)!r}, 'w').write('executed')\n")
    with pytest.warns(cache.CacheWarning, match="differs from the kernel generated"):
        cache.load(program, backend, tmp_path)
    assert not marker.exists() and path.read_text() == good


def test_a_planted_pyc_beside_a_kernel_is_never_executed(tmp_path):
    """An import would run a `.pyc` whose header matches the source's mtime and size instead
    of the source: the cache runs the text it generated."""
    program = Program.parse(PROGRAM)
    path = cache.kernel_path(program.hash, "torch", tmp_path)
    cache.load(program, "torch", tmp_path)
    marker = tmp_path / "marker"
    code = compile(f"open({str(marker)!r}, 'w').write('executed')", str(path), "exec")
    stat = path.stat()
    pyc = Path(importlib.util.cache_from_source(str(path)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(importlib.util.MAGIC_NUMBER + struct.pack("<III", 0, int(stat.st_mtime),
                                                              stat.st_size) + marshal.dumps(code))
    child = compile_in_child(PROGRAM, "torch", tmp_path)
    assert not marker.exists()
    assert child.returncode == 0, child.stderr


def test_a_file_from_another_generator_version_is_replaced_silently(tmp_path, recwarn):
    program = Program.parse(PROGRAM)
    path = cache.kernel_path(program.hash, "numba", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("# autolr-kernel v0-000000000000 sha256=" + "0" * 64 + "\nraise SystemExit\n")
    cache.load(program, "numba", tmp_path)
    assert path.read_text() == cache.source(program, "numba")
    assert not [w for w in recwarn if issubclass(w.category, cache.CacheWarning)]


def test_two_processes_compiling_the_same_program_at_once(tmp_path):
    program = PROGRAM.replace("0.001", "0.002")  # not compiled by any other test
    env = dict(os.environ, AUTOLR_CACHE=str(tmp_path), NUMBA_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, program], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["w"] == results[1]["w"]
    files = list((tmp_path / "numba").glob("*.py"))
    assert len(files) == 1 and not list((tmp_path / "numba").glob(".*.tmp"))


def test_compile_is_memoised_in_process():
    a = kernels.compile(PROGRAM, "torch")
    b = kernels.compile(Program.parse(PROGRAM.replace("mul(0.1, sub(alpha, grad))",
                                                      "mul(sub(alpha, grad), 0.1)")), "torch")
    assert a is b


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*numba, triton, torch"):
        kernels.compile(PROGRAM, "cuda")


def test_show_prints_generated_source_and_rejects_bad_text(tmp_path):
    env = dict(os.environ, AUTOLR_CACHE=str(tmp_path))
    ok = subprocess.run([sys.executable, "-m", "codegen", "show", PROGRAM, "--backend", "triton"],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "@triton.jit" in ok.stdout and "tl.store(weight_ptr + offsets" in ok.stdout
    assert "program hash: " + Program.parse(PROGRAM).hash in ok.stdout
    file = tmp_path / "adam.txt"
    file.write_text(PROGRAM)
    from_file = subprocess.run([sys.executable, "-m", "codegen", "show", str(file)],
                               capture_output=True, text=True, env=env)
    assert from_file.returncode == 0 and "numba.prange" in from_file.stdout
    bad = subprocess.run([sys.executable, "-m", "codegen", "show", "weight: foo(grad)"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "line 1, column 9: unknown op 'foo'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("arg, words", [
    ("", "the program is empty"),
    ("   ", "the program is empty"),
    ("{tmp}", "{tmp} is a directory"),
    ("{tmp}/missing.txt", "no such program file: {tmp}/missing.txt"),
    ("{tmp}/binary.txt", "not UTF-8 text"),
    ("weight: " + "sqrt(" * 500 + "grad" + ")" * 500, "column 329: expression deeper than 64 levels"),
    ("weight: mul(grad, 1e400)", "column 19: constant 1e400 does not fit a float32"),
    ("weight: mul(\u0661, grad)", "column 13: non-ASCII digit"),
    ("alpha: grad; weight: foo(alpha)", "column 22: unknown op 'foo'"),
])
def test_show_refuses_bad_arguments_in_one_line(arg, words, tmp_path, capsys):
    from codegen.__main__ import main

    (tmp_path / "binary.txt").write_bytes(b"weight: \xff\xfe")
    arg, words = arg.replace("{tmp}", str(tmp_path)), words.replace("{tmp}", str(tmp_path))
    assert main(["show", arg]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert words in err


def test_show_takes_the_one_line_form(capsys):
    from codegen.__main__ import main

    assert main(["show", "; ".join(PROGRAM.splitlines()), "--backend", "torch"]) == 0
    assert capsys.readouterr().out == cache.source(Program.parse(PROGRAM), "torch")


def test_kernels_touch_only_live_data():
    """A dead state is never loaded or stored; a step counter is a scalar, not a tensor."""
    src = cache.source(Program.parse(PROGRAM + "\n"), "numba")
    assert "sigma_buf" not in src and "sigma = f32(sigma)" in src
    dead = Program.parse("alpha: grad\nbeta: add(beta, grad)\nweight: mul(lr, grad)")
    src = cache.source(dead, "triton")
    assert "alpha_ptr" not in src and "beta_ptr" not in src
    no_grad = Program.parse("alpha: -1.0\nweight: mul(lr, alpha)")
    src = cache.source(no_grad, "numba")
    assert "grad_buf[i]" not in src


def test_the_generator_digest_covers_every_backend_file(tmp_path):
    """Editing a backend file, or adding one, changes the stamp, so old cache entries are
    replaced: the digest reads codegen/backends/ itself, not a list someone must keep."""
    import shutil

    copy = tmp_path / "codegen"
    shutil.copytree(Path(cache.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert cache._generator_digest(copy) == cache.STAMP_VERSION.split("-")[1]
    with open(copy / "backends" / "torch.py", "a") as f:
        f.write("# edited\n")
    edited = cache._generator_digest(copy)
    assert edited != cache.STAMP_VERSION.split("-")[1]
    (copy / "backends" / "another.py").write_text("BACKEND = None\n")
    assert cache._generator_digest(copy) not in (edited, cache.STAMP_VERSION.split("-")[1])
