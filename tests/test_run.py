"""`python -m engine.run` end to end on the smoke preset, kills and resumes, and user errors.

The runs are real (subprocesses training the smoke task, serial executor, tiny populations);
they use the Fashion-MNIST files when installed and otherwise generated IDX files with a
learnable pattern per class (said in the output of -rs as a skip reason never: both work).
"""

from __future__ import annotations

import collections
import csv
import gzip
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.fitness import outcomes
from engine.app import session as run_module
from engine.app import show as show_module
from engine.tasks.data import DataNotFoundError, find_data_dir
from engine.evolution.grammar import ALR_GRAMMAR, load_grammar
from engine.rundir import end_line
from engine.modes import ALR, DLR
from engine.evolution.seeds import SeedError, SeedProgram, read_seed_file, snap

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The subprocesses' environment: this session's kernel cache, and data (real or made)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")
    try:
        find_data_dir("train")
    except DataNotFoundError:
        directory = tmp_path_factory.mktemp("fmnist")
        rng = np.random.default_rng(0)
        labels = np.arange(2000) % 10
        images = rng.integers(0, 60, size=(2000, 28, 28))
        for c in range(10):  # a bright bar per class: learnable in a few epochs
            images[labels == c, 2 * c + 3: 2 * c + 6, 4:24] += 150
        _write_idx(directory / "train-images-idx3-ubyte.gz", images)
        _write_idx(directory / "train-labels-idx1-ubyte.gz", labels)
        env["AUTOLR_DATA"] = str(directory)
    return env


def engine_run(args, env, *, cwd, timeout=600, check=True):
    result = subprocess.run([sys.executable, "-m", "engine.run", *map(str, args)], env=env,
                            cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def smoke(mode, out, store, *extra):
    return ["--mode", mode, "--preset", "smoke", "--executor", "serial", "--out", out,
            "--store", store, *extra]


def history_rows(run_dir):
    with open(run_dir / "history.csv", newline="") as handle:
        return [{k: row[k] for k in ("generation", "index", "hash", "fitness", "program")}
                for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def alr_run(tmp_path_factory, env):
    """An uninterrupted smoke ALR run (the reference for the kill/resume test)."""
    base = tmp_path_factory.mktemp("alr")
    result = engine_run(smoke("alr", base / "run", base / "store.sqlite"), env, cwd=base)
    return base / "run", result


# -- a whole run, and what it leaves ----------------------------------------------------------------

@pytest.mark.slow
def test_a_run_on_the_local_pool_trains_its_candidates(env, tmp_path):
    """The default executor, as `make run` uses it. Its workers are spawned, so each re-imports
    engine.run (and with it Numba) before it is told to use one thread: Numba then refused
    every compile, and every candidate failed with the floor fitness, while serial runs and the
    executor tests (whose main module imports no Numba) passed."""
    args = ["--mode", "alr", "--preset", "smoke", "--executor", "local", "--workers", "2",
            "--generations", "1", "--population", "4", "--no-seed-zoo", "--out", tmp_path / "run",
            "--store", tmp_path / "store.sqlite"]
    engine_run(args, env, cwd=tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counts = summary["evaluations"]
    raised = {k: v for k, v in counts["reasons"].items() if k.startswith("raised")}
    assert not raised, raised
    assert summary["baseline"]["reason"] is None and summary["baseline"]["fitness"] > 0.1


@pytest.mark.slow
def test_alr_run_writes_every_output(alr_run):
    run_dir, result = alr_run
    assert "writing to" in result.stdout and "finished" in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["mode"] == "alr" and config["preset"] == "smoke"
    assert set(config["seeds"]) == {"adam", "rmsprop", "momentum", "adagrad", "adabelief", "lion"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["generations_done"] == 3
    assert {"torch", "numba", "python"} <= set(summary["versions"])
    best, base, counts = summary["best"], summary["baseline"], summary["evaluations"]
    assert best["fitness"] == max(g["best"] for g in summary["per_generation"])
    assert base["name"] == "Adam (lr=1e-3)" and 0.1 < base["fitness"] <= 1
    # smoke runs the funnel: the best's score at its tier (an accuracy) meets the baseline's,
    # not its funnel fitness (2 * tier level + score)
    assert summary["best_minus_baseline"] == pytest.approx(best["score"] - base["fitness"])
    assert counts["requested"] == sum(counts["outcomes"].values())
    assert counts["requested"] == sum(g["evaluated"] for g in summary["per_generation"])
    assert counts["trainings"] >= 3 and summary["wall_seconds"] > 0
    for g in summary["per_generation"]:
        assert g["worst"] <= g["median"] <= g["best"]

    rows = history_rows(run_dir)
    with open(run_dir / "history.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["generation", "index", "elite", "hash", "fitness", "source", "reason",
                      "size", "program"]
    assert len(rows) == 3 * 6
    fame = json.loads((run_dir / "hall_of_fame.json").read_text())
    assert 1 <= len(fame) <= 10 and len({e["hash"] for e in fame}) == len(fame)
    assert fame[0]["hash"] == best["hash"]
    assert [e["fitness"] for e in fame] == sorted((e["fitness"] for e in fame), reverse=True)
    assert best["hash"] in (run_dir / "hall_of_fame.md").read_text()
    for name in ("fitness", "curves", "size"):
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:8] == PNG
    report = (run_dir / "report.md").read_text()
    assert "plots/fitness.png" in report and "plots/curves.png" in report
    assert best["hash"] in report and "Adam (lr=1e-3)" in report
    for backend in ("numba", "triton"):
        source = (run_dir / "kernels" / f"01-{best['hash']}.{backend}.py").read_text()
        assert f"program hash: {best['hash']}" in source
    assert len(list((run_dir / "kernels").glob("*.py"))) == 2 * len(fame)
    assert (run_dir / "best_optimizer.py").is_file()
    # The text every reader of programs accepts (README: open(".../best_program.txt").read()).
    from codegen.ir import Program

    text = (run_dir / "best_program.txt").read_text()
    assert Program.parse(text).hash == best["hash"]
    import torch

    import kernels

    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 0.5)
    kernels.EvolvedOptimizer([w], text, backend="torch").step()


# Passes screening (finite on the five probe steps: alpha = 0, 1, 5, 41, 1763...) and then
# overflows within a few training steps: a divergence in every smoke run that seeds it.
DIVERGES = "alpha: neg(square(add(alpha, 1.0)))\nweight: mul(alpha, grad)\n"


@pytest.fixture(scope="module")
def diverging_run(tmp_path_factory, env):
    """A smoke ALR run seeded with a program that diverges, logging to TensorBoard."""
    base = tmp_path_factory.mktemp("diverging")
    (base / "seeds.txt").write_text(DIVERGES)
    # Without the zoo's six seeds: smoke's population of 6 holds them or this one, not both.
    result = engine_run(smoke("alr", base / "run", base / "store.sqlite", "--seed-programs",
                              base / "seeds.txt", "--no-seed-zoo", "--tensorboard", base / "tb",
                              "--tiers", "off"),  # the funnel would stop it at the micro tier
                        env, cwd=base)
    return base / "run", base / "tb", result


KIND_COUNT = re.compile(r"\b(" + "|".join(k.name for k in outcomes.KINDS) + r") (\d+)\b")


@pytest.mark.slow
def test_display_summary_report_and_show_count_outcomes_alike(diverging_run, capsys,
                                                               monkeypatch):
    run_dir, _, result = diverging_run
    shown: dict[str, int] = dict.fromkeys(outcomes.NAMES, 0)
    generation_lines = [line for line in result.stdout.splitlines() if line.startswith("gen ")]
    assert len(generation_lines) == 3
    for line in generation_lines:
        for kind, n in KIND_COUNT.findall(line[line.index("("):]):
            shown[kind] += int(n)
    summary = json.loads((run_dir / "summary.json").read_text())
    counted = summary["evaluations"]["outcomes"]
    assert counted["diverged"] >= 1 and counted == shown
    assert sum(counted.values()) == summary["evaluations"]["requested"]
    report = (run_dir / "report.md").read_text()
    table = dict(re.findall(r"^\| (\w+) \| (\d+) \| ", report, re.M))
    assert {k: int(table[k]) for k in outcomes.NAMES} == counted
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line: nothing wrapped
    assert show_module.main([str(run_dir)]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if "answered:" in line]
    in_show = dict.fromkeys(outcomes.NAMES, 0)
    in_show.update({k: int(n) for k, n in KIND_COUNT.findall(line)})
    assert in_show == counted


@pytest.mark.slow
def test_tensorboard_logs_each_generation(diverging_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, tb, _ = diverging_run
    summary = json.loads((run_dir / "summary.json").read_text())
    events = EventAccumulator(str(tb))
    events.Reload()

    def values(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    per_generation = summary["per_generation"]
    assert values("fitness/best") == [(g["generation"], pytest.approx(g["best"]))
                                      for g in per_generation]
    assert values("fitness/median") == [(g["generation"], pytest.approx(g["median"]))
                                        for g in per_generation]
    for kind, n in summary["evaluations"]["outcomes"].items():
        assert sum(v for _, v in values(f"outcomes/{kind}")) == n, kind
    assert [s for s, _ in values("time/generation_s")] == [0, 1, 2]
    [*_, last] = events.Tensors("best_program/text_summary")
    text = last.tensor_proto.string_val[0].decode()
    assert summary["best"]["program"].splitlines()[0] in text
    assert f"fitness {summary['best']['fitness']:.4f}" in text


def test_tensorboard_missing_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    # A None entry in sys.modules is how Python marks a module as not importable.
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "run"
    code = run_module.main(["--preset", "smoke", "--out", str(out), "--store",
                            str(tmp_path / "s.sqlite"), "--tensorboard", str(tmp_path / "tb")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--tensorboard needs the tensorboard package" in err and "pip install" in err
    assert not out.exists() and not (tmp_path / "tb").exists()  # nothing blocks a retry


def test_tensorboard_directory_that_cannot_be_made_is_one_line_and_exit_2(capsys, tmp_path):
    pytest.importorskip("tensorboard")  # the `test` extra installs it; without it see above
    (tmp_path / "file").write_text("")
    code = run_module.main(["--preset", "smoke", "--out", str(tmp_path / "run"), "--store",
                            str(tmp_path / "s.sqlite"), "--tensorboard",
                            str(tmp_path / "file" / "tb")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--tensorboard" in err and "cannot write there" in err
    assert not (tmp_path / "run").exists()


BEST_OPTIMIZER_CHECK = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import best_optimizer
ours = {m for m in sys.modules if m.split(".")[0] in ("engine", "kernels", "codegen")}
assert not ours, ours  # standalone: nothing of AutoLR was imported

def train(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 26 * 26, 10))
    model.to(memory_format=torch.channels_last)
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.cat([p.detach().flatten() for p in model.parameters()]), losses

mine, losses = train(best_optimizer.BestOptimizer)
plain, _ = train(lambda p: best_optimizer.BestOptimizer(p, backend="torch"))
import kernels
theirs, _ = train(lambda p: kernels.EvolvedOptimizer(p, best_optimizer.PROGRAM))
print(json.dumps({"numba": torch.allclose(mine, theirs, rtol=0, atol=1e-6),
                  "torch": torch.allclose(plain, theirs, rtol=0, atol=1e-6),
                  "moved": not torch.equal(mine, train(lambda p: torch.optim.SGD(p, lr=0))[0]),
                  "losses": losses}))
"""


@pytest.mark.slow
def test_best_optimizer_trains_like_the_evolved_optimizer(alr_run, env, tmp_path):
    run_dir, _ = alr_run
    result = subprocess.run([sys.executable, "-c", BEST_OPTIMIZER_CHECK, str(run_dir)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdict["numba"] and verdict["torch"] and verdict["moved"], verdict


@pytest.mark.slow
def test_dlr_run_writes_a_schedule(tmp_path, env):
    run_dir = tmp_path / "run"
    engine_run(smoke("dlr", run_dir, tmp_path / "store.sqlite"), env, cwd=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "dlr" and summary["baseline"]["name"] == "SGD, constant lr 0.01"
    assert summary["baseline"]["program"] == "0.01"
    for name in ("config.json", "history.csv", "hall_of_fame.json", "hall_of_fame.md",
                 "report.md", "plots/fitness.png", "plots/size.png", "plots/curves.png"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "kernels").exists()  # schedules have no kernels
    check = ("import sys, json; sys.path.insert(0, sys.argv[1]); import best_optimizer as b, torch\n"
             "opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=b.INITIAL_LR)\n"
             "s = b.BestSchedule(opt); lrs = []\n"
             "for e in range(4): lrs.append(opt.param_groups[0]['lr']); opt.step(); s.step()\n"
             "print(json.dumps({'schedule': b.SCHEDULE, 'lrs': lrs}))")
    result = subprocess.run([sys.executable, "-c", check, str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    from codegen.ir import Schedule

    schedule, lr, want = Schedule.parse(out["schedule"]), 0.01, []
    for epoch in range(4):
        lr = schedule(epoch, lr)
        want.append(lr)
    assert out["lrs"] == want
    assert schedule.hash == summary["best"]["hash"]
    text = (run_dir / "best_program.txt").read_text()
    assert isinstance(Schedule.parse(text), Schedule)
    assert Schedule.parse(text).hash == summary["best"]["hash"]


# -- stopping and resuming --------------------------------------------------------------------------

def wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def events(run_dir):
    try:
        lines = (run_dir / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


@pytest.mark.slow
def test_sigkill_mid_generation_then_resume_gives_the_uninterrupted_run(alr_run, env, tmp_path):
    """Separate stores: the resumed run gets nothing from the reference run, so equal histories
    show that the checkpoint resumes the search exactly *and* that a candidate trained before the
    kill, after it, or in another run gets the same fitness."""
    reference, _ = alr_run
    run_dir = tmp_path / "run"
    args = smoke("alr", run_dir, tmp_path / "store.sqlite")
    process = subprocess.Popen([sys.executable, "-m", "engine.run", *map(str, args)], env=env,
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def in_generation_1():
        return any(e.get("event") == "evaluation" and e["generation"] == 1
                   for e in events(run_dir))

    try:
        assert wait_for(in_generation_1, process), "the run never reached generation 1"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    before = events(run_dir)
    assert not any(e.get("event") == "generation" and e["generation"] == 1 for e in before), \
        "generation 1 finished before the kill: the test did not kill mid-generation"
    assert not (run_dir / "summary.json").exists()
    show = subprocess.run([sys.executable, "-m", "engine.show", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0 and "1 of 3 generations checkpointed" in show.stdout

    engine_run(["--resume", "--out", run_dir], env, cwd=tmp_path)
    assert history_rows(run_dir) == history_rows(reference)
    ours = json.loads((run_dir / "summary.json").read_text())
    theirs = json.loads((reference / "summary.json").read_text())
    assert ours["best"] == theirs["best"] and ours["per_generation"] != []
    assert [g["best"] for g in ours["per_generation"]] == [g["best"] for g in theirs["per_generation"]]
    assert ours["sessions"] == 2 and ours["baseline"]["fitness"] == theirs["baseline"]["fitness"]


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_that_command_finishes(env, tmp_path):
    run_dir = tmp_path / "run"
    args = smoke("dlr", run_dir, tmp_path / "store.sqlite")
    process = subprocess.Popen([sys.executable, "-m", "engine.run", *map(str, args)], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert wait_for(lambda: any(e.get("event") == "evaluation" for e in events(run_dir)), process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Resume with:" in stderr
    command = shlex.split(stderr.strip().splitlines()[-1])
    assert command[-3:] == ["--resume", "--out", str(run_dir)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_time_budget_stops_cleanly_and_resume_continues(env, tmp_path):
    run_dir = tmp_path / "run"
    args = smoke("dlr", run_dir, tmp_path / "store.sqlite", "--time-budget", "0.3")
    result = engine_run(args, env, cwd=tmp_path)
    assert "Stopped before generation 0 finished" in result.stdout
    assert any(e.get("event") == "stopped" for e in events(run_dir))
    # Resuming may extend the run (and the new length is what config.json says from then on).
    engine_run(["--resume", "--out", run_dir, "--time-budget", "10m", "--generations", "3"], env,
               cwd=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["generations_done"] == 3
    assert json.loads((run_dir / "config.json").read_text())["evolution"]["generations"] == 3


def test_a_line_cut_short_by_a_kill_is_ended_before_the_next_session(tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text('{"event": "session"}\n{"event": "evalu')
    end_line(log)
    end_line(log)
    assert log.read_text() == '{"event": "session"}\n{"event": "evalu\n'


# -- seeds -----------------------------------------------------------------------------------------

def test_zoo_adam_is_not_derivable_but_its_paper_ops_form_is():
    from kernels import zoo

    grammar = load_grammar(ALR_GRAMMAR)
    with pytest.raises(SeedError, match="exp"):
        snap(SeedProgram("zoo adam", str(zoo.adam())), grammar, ALR, 17)
    texts = {s.name: snap(s, grammar, ALR, 17) for s in ALR.zoo_seeds()}
    assert "pow(0.89294785, sigma)" in texts["adam"] and "lr" not in texts["adam"]
    assert texts["momentum"].endswith("weight: mul(0.010503844, alpha)")  # lr 0.01, snapped
    # Lion needs sign, which the paper's grammar lacks: its seed spells it in the paper's ops.
    with pytest.raises(SeedError, match="sign"):
        snap(SeedProgram("zoo lion", str(zoo.lion())), grammar, ALR, 17)
    assert "sign" not in texts["lion"] and "sqrt(square(add(mul(0.91078293, alpha)" in texts["lion"]
    assert texts["lion"].splitlines()[-1].startswith("weight: mul(0.00027961473, div(")  # lr 3e-4
    assert texts["adagrad"].startswith("alpha: neg(mul(grad, grad))")
    assert "square(sub(grad, alpha))" in texts["adabelief"]


def test_paper_ops_seeds_compute_what_the_zoo_computes():
    """Before snapping, the Lion and AdaBelief seeds are the zoo's optimizers in other ops: Lion's
    steps are the same (sign(c) as c / sqrt(c*c) is exact), AdaBelief's within the bias
    corrections' float32 pow."""
    from codegen.ir import Program, evaluate, reference_step
    from engine.evolution.seeds import ADABELIEF_PAPER_OPS, LION_PAPER_OPS
    from kernels import zoo

    c = np.concatenate([np.geomspace(1e-18, 1e18, 2001), [0.0]]).astype(np.float32)
    c = np.concatenate([c, -c, np.random.default_rng(0).standard_normal(10_000, np.float32)])
    spelled = Program.parse("weight: div(grad, sqrt(square(grad)))").weight
    np.testing.assert_array_equal(evaluate(spelled, {"grad": c}), np.sign(c))
    rng = np.random.default_rng(1)
    for seed, program, lr, tolerance in ((LION_PAPER_OPS, zoo.lion(), 1e-3, 0.0),
                                         (ADABELIEF_PAPER_OPS, zoo.adabelief(), 1e-3, 1e-5)):
        seed = Program.parse(seed)
        start = w = v = rng.standard_normal(500).astype(np.float32)
        state_w, state_v = {}, {}
        for _ in range(50):
            g = rng.standard_normal(500).astype(np.float32) * 0.1 + 0.01
            w, state_w = reference_step(seed, w, g, state_w, lr=lr)
            v, state_v = reference_step(program, v, g, state_v, lr=lr)
        assert np.abs(v - start).max() > 1e-2  # the weights moved
        assert np.abs(w - v).max() <= tolerance * np.abs(v).max(), program  # as tests/test_zoo.py


def test_snapping_and_seed_files(tmp_path):
    grammar = load_grammar(ALR_GRAMMAR)
    path = tmp_path / "seeds.txt"
    path.write_text("# sgd\nweight: mul(lr, grad)\n\n# a comment\n# decayed\n"
                    "alpha: mul(0.1, sub(alpha, grad))\nweight: mul(-2, alpha)\n")
    seeds = read_seed_file(path, lr=0.05)
    assert [s.name for s in seeds] == ["sgd", "a comment"] and seeds[1].where.endswith("line 4")
    assert snap(seeds[0], grammar, ALR, 17).splitlines()[-1] == "weight: mul(0.05072436, grad)"
    assert "mul(neg(1.0), alpha)" in snap(seeds[1], grammar, ALR, 17)
    from engine.evolution.grammar import DLR_GRAMMAR

    dlr = load_grammar(DLR_GRAMMAR)
    text = snap(SeedProgram("s", "if(epoch < 4.4, 0.05, if(lr > 0.001, 0.01, 0.02))"), dlr, DLR, 8)
    assert text == "if(epoch < 4, 0.049545456, if(lr > 0.0011090909, 0.010190909, 0.020281818))"
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(SeedError, match="no programs"):
        read_seed_file(tmp_path / "empty.txt")


@pytest.mark.slow
def test_snapped_zoo_seeds_train_decently(tmp_path):
    """The snapped seeds are worth seeding with: each learns (chance is 0.1), and snapped Adam
    is close to the real Adam at lr=1e-3 on the same protocol."""
    import kernels
    from engine.tasks.protocol import alr_fitness, get_task
    from engine.tasks.training import configure_process

    configure_process(1)
    grammar, task = load_grammar(ALR_GRAMMAR), get_task("smoke")
    fitness = {}
    for seed in ALR.zoo_seeds():
        program = snap(seed, grammar, ALR, 17)
        fitness[seed.name] = alr_fitness(
            task, lambda p: kernels.EvolvedOptimizer(p, program, backend="numba")).fitness
    real = ALR.baseline()[1]
    adam = alr_fitness(task, lambda p: kernels.EvolvedOptimizer(p, real, backend="numba")).fitness
    print(fitness, adam)
    assert all(f > 0.2 for f in fitness.values()), fitness
    assert abs(fitness["adam"] - adam) < 0.05


# -- errors a user can make: one line on stderr, exit status 2 -------------------------------------

def one_line_error(capsys, argv, match):
    assert run_module.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("engine.run: error: "), err
    assert "Traceback" not in err and match in err, err
    return err


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, alr_run_config):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, ["--mode", "xyz"], "invalid choice: 'xyz'")
    one_line_error(capsys, ["--preset", "huge"], "invalid choice: 'huge'")
    one_line_error(capsys, ["--time-budget", "soon"], "not a duration")
    one_line_error(capsys, ["--population", "0"], "must be at least 1")
    # An output directory that holds another run, or is not a run at all.
    one_line_error(capsys, ["--mode", "dlr", "--preset", "smoke", "--out", alr_run_config],
                   "already holds a different run")
    one_line_error(capsys, ["--mode", "alr", "--preset", "smoke", "--out", alr_run_config],
                   "already holds this run; pass --resume")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    one_line_error(capsys, ["--out", tmp_path / "junk"], "holds no AutoLR run")
    # --resume without a run, or changing what a run cannot change.
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["--resume", "--out", tmp_path / "empty"], "no run to resume")
    one_line_error(capsys, ["--resume"], "--resume needs --out")
    one_line_error(capsys, ["--resume", "--out", alr_run_config, "--population", "9"],
                   "differs from the run's 6")
    # Grammars: broken, or for the other mode.
    bad = tmp_path / "bad.bnf"
    bad.write_text("<start> ::= weight: <e>\n<e> ::= grad | <missing>\n")
    err = one_line_error(capsys, ["--grammar", bad], "bad.bnf:2")
    assert "missing" in err
    from engine.evolution.grammar import DLR_GRAMMAR

    one_line_error(capsys, ["--mode", "alr", "--grammar", DLR_GRAMMAR], "are not ALR programs")
    # Seed programs that cannot enter the population.
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("# mine\nweight: exp(grad)\n")
    one_line_error(capsys, ["--seed-programs", seeds], "seed program 'mine'")
    seeds.write_text("weight: mul(grad\n")
    one_line_error(capsys, ["--seed-programs", seeds], "line 1")
    one_line_error(capsys, ["--seed-programs", tmp_path / "nope.txt"], "cannot read it")
    one_line_error(capsys, ["--preset", "smoke", "--population", "2"], "do not fit")
    # Data that is not there.
    monkeypatch.setenv("AUTOLR_DATA", str(tmp_path / "no-data"))
    one_line_error(capsys, ["--preset", "smoke", "--out", tmp_path / "x"], "AUTOLR_DATA=")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


@pytest.fixture
def alr_run_config(tmp_path):
    """A directory that looks like a started smoke ALR run (config only: no training needed)."""
    out = tmp_path / "started"
    args = run_module.build_parser().parse_args(["--preset", "smoke", "--out", str(out)])
    config = run_module.new_config(args, [])
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config.to_json()))
    return out


def test_errors_end_to_end_have_no_traceback(env, tmp_path):
    result = engine_run(["--mode", "sgd"], env, cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "invalid choice: 'sgd'" in result.stderr
    result = engine_run(["--preset", "smoke"], dict(env, AUTOLR_DATA=str(tmp_path)),
                        cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "Fashion-MNIST" in result.stderr or "AUTOLR_DATA" in result.stderr


@pytest.mark.parametrize("seed", [2**63, -1])
def test_a_seed_out_of_range_is_refused_before_anything_is_written(env, tmp_path, seed):
    """2**63 overflowed SQLite at the first store lookup, after the run directory was made (so
    neither a retry nor --resume worked); -1 made every training raise in a "finished" run."""
    result = engine_run(["--seed", seed, *smoke("alr", tmp_path / "run", tmp_path / "s.sqlite")],
                        env, cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{seed} is out of range" in result.stderr
    assert "0 to 9223372036854775807" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no store


def test_a_store_that_is_a_directory_or_damaged_is_one_line_and_no_run_is_made(env, tmp_path):
    """A damaged store was a StoreError traceback (exit 1) at some lookup; `--store DIR` advised
    moving the user's directory. Both stop before the run directory is made."""
    import random

    from engine.fitness.store import Record, Store

    stores = tmp_path / "stores"
    stores.mkdir()
    damaged = tmp_path / "damaged.sqlite"
    with Store(damaged) as store:
        for n in range(300):
            store.put(Record(hash=f"h{n:04d}", task="t", protocol="p", seed=0, fitness=0.5,
                             source="trained", program="weight: grad\n" * 40))
    data = bytearray(damaged.read_bytes())
    data[4096:8192] = random.Random(1).randbytes(4096)
    damaged.write_bytes(bytes(data))
    for store, says in ((stores, "is a directory"), (damaged, "store is damaged")):
        result = engine_run(smoke("alr", tmp_path / "run", store), env, cwd=tmp_path,
                            check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert says in result.stderr and "--store " in result.stderr, result.stderr
        assert ("mv " in result.stderr) == (store == damaged), result.stderr
        assert not (tmp_path / "run").exists()


def test_the_largest_seed_is_accepted_and_fits_the_store(tmp_path):
    from engine.app.config import MAX_SEED
    from engine.fitness.store import Store

    assert run_module.build_parser().parse_args(["--seed", str(MAX_SEED)]).seed == MAX_SEED
    with Store(tmp_path / "s.sqlite") as store:
        assert store.lookup("h", "smoke", "alr", MAX_SEED) is None


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--mode", "--preset", "--seed", "--out", "--resume", "--executor", "--workers",
                 "--ray-address", "--generations", "--population", "--grammar",
                 "--seed-programs", "--seed-zoo", "--time-budget", "--time-limit", "--store"):
        assert flag in text, flag


@pytest.mark.slow
def test_show_prints_a_finished_run(alr_run, capsys):
    run_dir, _ = alr_run
    assert show_module.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["hash"][:10] in out and "hall of fame" in out and "finished" in out
    assert show_module.main([str(run_dir / "nope")]) == 2


# -- the fidelity-tier funnel ------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_runs_the_funnel_and_every_output_shows_it(alr_run, env):
    run_dir, result = alr_run
    summary = json.loads((run_dir / "summary.json").read_text())
    tiers = summary["tiers"]
    assert [t["name"] for t in tiers] == ["micro", "quick"]
    assert tiers[0]["evaluated"] > tiers[1]["evaluated"] >= 1
    assert tiers[0]["promoted"] == tiers[1]["evaluated"]
    assert summary["evaluations"]["outcomes"]["micro"] >= 1
    assert summary["best"]["tier"] in ("micro", "quick") and 0 <= summary["best"]["score"] <= 1
    # One task, one scale: best.tasks lists it with Adam's score at the same seeds.
    assert summary["best"]["lr_scale"] == 1.0
    nearest = summary["best"]["nearest_seed"]  # a tree edit distance to one of the run's seeds
    assert nearest["name"] in json.loads((run_dir / "config.json").read_text())["seeds"]
    assert nearest["distance"] >= 0
    [task] = summary["best"]["tasks"]
    assert task["task"] == "smoke" and task["baseline"] == summary["baseline"]["fitness"]
    assert "## Fidelity tiers" in (run_dir / "report.md").read_text()
    lines = [line for line in result.stdout.splitlines() if line.startswith("gen ")]
    assert len(lines) == 3 and all(re.search(r"funnel \d+ micro > \d+ quick ", l) for l in lines)
    # The best is shown as its score at the tier it reached, never as 2 * level + score.
    assert all(re.search(r"best [01]\.\d{4} (micro|quick)  median ", l) for l in lines), lines
    shown = collections.Counter()
    for line in lines:
        for kind, n in KIND_COUNT.findall(line[line.index("("):]):
            shown[kind] += int(n)
    assert {k: v for k, v in summary["evaluations"]["outcomes"].items() if v} == dict(shown)
    assert (run_dir / "funnel.jsonl").exists()
    show = subprocess.run([sys.executable, "-m", "engine.show", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "fidelity tiers" in show.stdout, show.stdout


@pytest.mark.slow
def test_tiers_off_trains_every_candidate_as_before(env, tmp_path):
    run_dir = tmp_path / "run"
    engine_run(smoke("alr", run_dir, tmp_path / "store.sqlite", "--tiers", "off"), env,
               cwd=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "tiers" not in summary and summary["evaluations"]["outcomes"]["micro"] == 0
    assert summary["best"]["lr_scale"] == 1.0 and len(summary["best"]["tasks"]) == 1
    assert "tiers" not in json.loads((run_dir / "config.json").read_text())
    assert not (run_dir / "funnel.jsonl").exists()
    result = engine_run(["--resume", "--out", run_dir, "--tiers", "on"], env, cwd=tmp_path,
                        check=False)
    assert result.returncode == 2 and "--tiers on differs" in result.stderr


@pytest.mark.slow
def test_time_budget_mid_funnel_then_resume_gives_the_uninterrupted_run(alr_run, env, tmp_path):
    """The budget runs out inside generation 0's funnel (checked after every tier's scoring:
    after the micro tier, or after the quick one where the micro tier took under a second);
    the resume reuses funnel.jsonl's rows and ends as the run that was never stopped."""
    reference, _ = alr_run
    run_dir = tmp_path / "run"
    result = engine_run(smoke("alr", run_dir, tmp_path / "store.sqlite", "--time-budget", "1"),
                        env, cwd=tmp_path)
    assert "Stopped before generation 0 finished" in result.stdout
    from engine.fitness.funnel import read_state

    state = read_state(run_dir / "funnel.jsonl")
    assert "micro" in {key[1] for key in state.rows}
    assert state.counts == []  # stopped inside the funnel: generation 0's counts never saved
    engine_run(["--resume", "--out", run_dir, "--time-budget", "10m"], env, cwd=tmp_path)
    assert history_rows(run_dir) == history_rows(reference)
    ours = json.loads((run_dir / "summary.json").read_text())
    assert ours["best"] == json.loads((reference / "summary.json").read_text())["best"]
