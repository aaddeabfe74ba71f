"""The benchmark suite as a user runs it (`pytest --benchmark-only`), checked without timing
anything: what it collects, what it leaves out, the closing table of ratios, and the helpers that
keep its figures honest (untimed set-up, figures of the same round)."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def load_benchlib():
    spec = importlib.util.spec_from_file_location("benchlib_under_test", BENCH / "benchlib.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchlib = load_benchlib()


def run_pytest(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_benchmark_only_collects_the_default_benchmarks_and_no_test():
    result = run_pytest(ROOT, "--benchmark-only", "--collect-only", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    items = [line for line in result.stdout.splitlines() if "::" in line]
    assert items, result.stdout
    assert all(line.startswith("bench/") for line in items), items
    assert not any("test_epoch_ablation" in line or "[mlp50m" in line for line in items), items
    assert "SKIPPED" not in result.stdout
    # Deselected are the long benchmarks alone: tests/ was not even collected.
    long_ones = re.search(r"(\d+) long benchmarks .* --bench-long runs them", result.stdout)
    assert long_ones, result.stdout
    assert f"({long_ones[1]} deselected)" in result.stdout, result.stdout


# A toy repository: the real pytest configuration and bench/ plumbing, toy benchmarks and a test.
TOY_BENCH = '''
import pytest
import torch


def test_fast(benchmark):
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update(speedup_vs_stock=2.5, seconds=1.0)


@pytest.mark.bench_long
def test_slow(benchmark):
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info["speedup_vs_stock"] = 9.75


def test_sets_one_thread(benchmark):
    torch.set_num_threads(1)
    benchmark(lambda: None)


def test_threads_are_back(benchmark):
    benchmark(lambda: None)
    assert torch.get_num_threads() == int(__import__("os").environ["TOY_THREADS"])
'''


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "bench").mkdir()
    for name in ("conftest.py", "benchlib.py"):
        shutil.copy(BENCH / name, tmp_path / "bench")
    (tmp_path / "bench" / "bench_toy.py").write_text(TOY_BENCH)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_plain.py").write_text("def test_plain():\n    pass\n")
    return tmp_path


def test_benchmark_only_ends_with_the_ratio_table_and_runs_no_test(toy_repo: Path, monkeypatch):
    import torch

    monkeypatch.setenv("TOY_THREADS", str(torch.get_num_threads()))
    result = run_pytest(toy_repo, "--benchmark-only")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "test_plain" not in out and "skipped" not in out.lower(), out
    assert "3 passed, 1 deselected" in out, out
    table = out[out.index("ratios to peers"):]
    assert re.search(r"toy::fast\s+2\.50x\s+stock torch / ours", table), table
    assert "9.75" not in table  # the long one did not run
    assert "1 long benchmarks (marked bench_long) not run" in table
    # --bench-long adds it
    result = run_pytest(toy_repo, "--benchmark-only", "--bench-long", "-k", "slow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"toy::slow\s+9\.75x", result.stdout), result.stdout


def test_without_benchmark_only_the_tests_still_run_and_print_no_table(toy_repo: Path,
                                                                       monkeypatch):
    import torch

    monkeypatch.setenv("TOY_THREADS", str(torch.get_num_threads()))
    result = run_pytest(toy_repo, "--benchmark-disable", "-v")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "tests/test_plain.py::test_plain PASSED" in out, out
    assert "bench/bench_toy.py::test_fast PASSED" in out, out
    assert "test_slow" not in out and "1 long benchmarks" in out, out
    assert "ratios to peers" not in out


def test_the_ratio_table_lists_known_ratios_once_per_benchmark():
    rows = [
        ("kernels::program_kernel[adam-1M]",
         {"GB_per_s": 80.0, "fraction_of_bandwidth_limit": 0.871, "speedup_vs_fused_adam": 1.234}),
        ("kernels::fused_adam[1M]", {}),
        ("training::epoch[2]", {"speedup_vs_stock": 2.69, "recorded_tf_over_ours": 1.68,
                                "best_s": 2.97}),
    ]
    lines = benchlib.ratio_table(rows)
    assert lines[0].split() == ["benchmark", "ratio", "to", "its", "peer"]
    body = lines[1:]
    assert len(body) == 4  # GB/s and seconds are not ratios; the empty row has none
    assert body[0].startswith("kernels::program_kernel[adam-1M]")
    assert "1.23x" in body[0] and "fused Adam" in body[0] and "same algorithm" in body[0]
    assert body[1].startswith(" ") and "0.87 " in body[1] and "bandwidth limit" in body[1]
    assert body[2].startswith("training::epoch[2]") and "2.69x" in body[2]
    assert "1.68x" in body[3] and "recorded" in body[3]
    assert max(map(len, lines)) <= 100
    assert benchlib.ratio_table([("a", {"seconds": 1.0})]) == []


def test_ades_against_fused_adam_is_labelled_as_two_algorithms():
    assert benchlib.peer_ratio_key("adam", "fused") == "speedup_vs_fused_adam"
    key = benchlib.peer_ratio_key("ades", "fused")
    assert key == "speedup_vs_fused_adam_different_algorithm"
    assert "different algorithm" in benchlib.RATIOS[key][1]
    assert "different algorithm" in benchlib.RATIOS[benchlib.peer_ratio_key("ades", "foreach")][1]


def extra_info_keys(path: Path) -> set[str]:
    """String keys a benchmark module writes into `extra_info` (item, update(k=...) or a dict)."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Attribute) and node.value.attr == "extra_info" \
                and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "update" and isinstance(node.func.value, ast.Attribute) \
                and node.func.value.attr == "extra_info":
            keys.update(k.arg for k in node.keywords if k.arg)
            for arg in node.args:
                if isinstance(arg, ast.Dict):
                    keys.update(k.value for k in arg.keys if isinstance(k, ast.Constant))
    return keys


def test_every_ratio_a_benchmark_records_reaches_the_table_and_tf_is_marked_recorded():
    keys = set().union(*(extra_info_keys(p) for p in BENCH.glob("bench_*.py")))
    assert "speedup_vs_stock" in keys  # the parse finds what the modules write
    ratios = {k for k in keys if re.search(r"speedup|_over_|fraction_of", k)}
    assert ratios <= set(benchlib.RATIOS), ratios - set(benchlib.RATIOS)
    assert all(k.startswith("recorded_") for k in keys if "tf" in k.split("_")), keys


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleaved_timing_leaves_a_rows_setup_out_as_pedantic_does():
    clock, calls = FakeClock(), []

    def make_grads() -> None:  # the untimed part: 100 "seconds"
        calls.append("setup")
        clock.now += 100.0

    def step() -> None:
        calls.append("step")
        clock.now += 1.0

    def peer() -> None:
        clock.now += 2.0

    best = benchlib.interleaved_best({"ours": step, "peer": peer}, repeat=3, warmup=1,
                                     setups={"ours": make_grads}, clock=clock)
    assert best == {"ours": 1.0, "peer": 2.0}
    assert calls == ["setup", "step"] * 4  # before every call of ours, warm-up included


def test_rounds_report_the_counter_of_the_fastest_round():
    clock, faults = FakeClock(), iter([0, 500, 500, 510, 510, 530])
    durations = iter([3.0, 1.0, 2.0])

    def epoch() -> None:
        clock.now += next(durations)

    rounds = benchlib.Rounds(epoch, counter=lambda: next(faults), clock=clock)
    for _ in range(3):
        rounds()
    assert rounds.best() == (1.0, 10)
    with pytest.raises(ValueError):
        benchlib.Rounds(epoch, counter=lambda: 0).best()
