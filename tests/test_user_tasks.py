"""A user's own task (engine.tasks.SupervisedTask): evolved through the CLI and engine.search,
every bad reference and failed pre-flight check as exit 2 and one line, and a results store
that never answers for a task file that changed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.app.session import main
from engine.tasks import SupervisedTask, TaskError
from engine.tasks.registry import FAMILIES, resolve, worker_task

ROOT = Path(__file__).resolve().parents[1]

TOY = textwrap.dedent('''
    import os

    import torch
    from engine.tasks import SupervisedTask

    EPOCHS = 3

    def load():
        with open(__file__ + ".loads", "a") as log:  # which processes loaded the data
            log.write(f"{os.getpid()}\\n")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(240, 6, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long()
        return {"train": (x[:160], y[:160]), "val": (x[160:200], y[160:200]),
                "test": (x[200:], y[200:])}

    def build():
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def task():
        return SupervisedTask(name="toy", data=load, model=build, batch_size=20,
                              epochs=EPOCHS, patience=2)
''')


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    path = tmp_path / "tasks" / "toy.py"  # outside the package
    path.parent.mkdir()
    path.write_text(TOY)
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOLR_CACHE", str(tmp_path / "cache"))


def _run_args(tmp_path: Path, ref: str, *extra: str) -> list[str]:
    return ["--task", ref, "--preset", "smoke", "--population", "6", "--generations", "1",
            "--out", str(tmp_path / "run"), "--store", str(tmp_path / "store.sqlite"), *extra]


def test_a_task_file_is_evolved_through_the_cli_on_the_local_pool(tmp_path, toy):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "engine.run", "--mode", "alr",
                           *_run_args(tmp_path, f"{toy}:task", "--executor", "local",
                                      "--workers", "2")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["best"]["fitness"] > 0.5
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == summary["task"] == f"{toy}:task"
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"the task `{toy}:task`" in report and "the task's metric on its validation" in report
    assert f"task {toy}:task" in done.stdout  # the display's first line names it
    trained = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()
               if '"evaluation"' in line]
    assert any(e["source"] == "trained" and e["reason"] is None for e in trained)
    # The parent's check and each worker process loaded the data once, however many they trained.
    loads = Path(f"{toy}.loads").read_text().split()
    assert len(set(loads)) == len(loads) <= 3 and sum(e["source"] == "trained" for e in trained) > 3


def test_engine_search_runs_in_process_and_resumes(tmp_path, toy):
    import engine

    result = engine.search(f"{toy}:task", mode="alr", generations=1, population=6,
                           out=tmp_path / "api", executor="local", workers=2, seed=0,
                           preset="smoke", store=tmp_path / "store.sqlite")
    assert result.status == "finished" and result.run_dir == tmp_path / "api"
    assert 0.5 < result.fitness <= 1.0 and result.baseline is not None
    assert str(result.best) and (result.run_dir / "best_optimizer.py").is_file()
    again = engine.search(f"{toy}:task", out=tmp_path / "api", resume=True, generations=2,
                          store=tmp_path / "store.sqlite", workers=2)
    assert again.summary["generations_done"] == 2 and again.fitness >= result.fitness
    with pytest.raises(engine.SearchError, match="no file"):
        engine.search(str(tmp_path / "nope.py") + ":task", out=tmp_path / "x")


def test_engine_search_serial_leaves_the_process_as_it_was(tmp_path, toy):
    import engine

    torch.set_num_threads(2)
    result = engine.search(f"{toy}:task", generations=1, population=6, out=tmp_path / "s",
                           executor="serial", preset="smoke", store=tmp_path / "store.sqlite")
    assert result.status == "finished"
    assert torch.get_num_threads() == 2  # the serial executor had set it to 1 for training
    # A resume after the task file changed would mix two tasks' fitnesses in one run: refused.
    toy.write_text(TOY.replace("manual_seed(0)", "manual_seed(1)"))
    with pytest.raises(engine.SearchError, match="changed since the run started"):
        engine.search(f"{toy}:task", out=tmp_path / "s", resume=True, generations=2,
                      executor="serial", store=tmp_path / "store.sqlite")


def test_device_flag_errors_are_exit_2(tmp_path, capsys, toy):
    if not torch.cuda.is_available():
        for args in (_run_args(tmp_path, f"{toy}:task", "--device", "cuda"),
                     ["--preset", "smoke", "--device", "cuda", "--out", str(tmp_path / "p")]):
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "torch sees no CUDA GPU" in err
        assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()


def test_device_flag_moves_a_presets_cnn(tmp_path):
    """--device applies to the presets' Fashion-MNIST CNN too: the preset's Task carries it to
    every worker (not in its digest: the store's key stays the preset's), and its data goes
    there ("meta" stands in for a GPU on a machine without one)."""
    import pickle

    from engine.tasks.protocol import get_task, prepare

    task = get_task("smoke", "meta")
    assert pickle.loads(pickle.dumps(task)).device == "meta"
    assert task.digest == get_task("smoke").digest and task == get_task("smoke")
    assert prepare(task, 0).val[0].device.type == "meta"
    assert prepare(get_task("smoke", "cpu"), 0).val[0].device.type == "cpu"
    args = ["--preset", "smoke", "--device", "cpu", "--population", "4", "--generations", "1",
            "--executor", "serial", "--no-seed-zoo", "--out", str(tmp_path / "r"),
            "--store", str(tmp_path / "store.sqlite")]
    assert main(args) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["device"] == "cpu"


def test_dlr_drives_sgd_on_the_task(toy):
    from codegen.ir import Schedule
    from engine import modes

    _, ref = resolve(f"{toy}:task")
    result = modes.get("dlr").train(ref, Schedule.parse("0.1"), seed=0, time_limit=None,
                                    backend="numba")
    assert result.reason is None and result.fitness > 0.5
    assert result.trials[0].fit.lr == pytest.approx([0.1] * result.trials[0].fit.epochs)


BAD_FILES = {
    "no_val": ('{"train": (x, y)}', "no 'val' split"),
    "lengths": ('{"train": (x, y[:-1]), "val": (x, y)}', "has 20 inputs but 19 targets"),
    "columns": ('{"train": (x, y * 5), "val": (x, y)}', "model output has 2 columns, targets "
                "need 6"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_each_failed_check_is_exit_2_and_one_line(tmp_path, capsys, case):
    data, message = BAD_FILES[case]
    path = tmp_path / f"{case}.py"
    path.write_text(textwrap.dedent(f'''
        import torch
        from engine.tasks import SupervisedTask

        def load():
            x, y = torch.randn(20, 4), torch.arange(20) % 2
            return {data}

        def task():
            return SupervisedTask(name="{case}", data=load,
                                  model=lambda: torch.nn.Linear(4, 2))
    '''))
    assert main(_run_args(tmp_path, f"{path}:task")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and f"task '{case}'" in err
    assert not (tmp_path / "run").exists()  # nothing left that blocks a retry


def test_bad_model_loss_and_metric_are_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent('''
        import torch
        from engine.tasks import SupervisedTask

        def load():
            x, y = torch.randn(20, 4), torch.randn(20)
            return {"train": (x, y), "val": (x, y)}

        def boom():
            raise RuntimeError("no GPU here")

        def raising():
            return SupervisedTask(name="raising", data=load, model=boom, loss="mse",
                                  metric="neg_loss")

        def not_scalar():
            return SupervisedTask(name="not-scalar", data=load,
                                  model=lambda: torch.nn.Linear(4, 1),
                                  loss=lambda out, target: (out.squeeze(1) - target) ** 2,
                                  metric="neg_loss")

        def accuracy_of_mse():
            return SupervisedTask(name="acc", data=load, model=lambda: torch.nn.Linear(4, 1),
                                  loss="mse", metric="accuracy")
    '''))
    for attr, message in [("raising", "model() raised RuntimeError: no GPU here"),
                          ("not_scalar", "the loss must be a scalar tensor"),
                          ("accuracy_of_mse", "metric 'accuracy' needs class outputs")]:
        assert main(_run_args(tmp_path, f"{path}:{attr}")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_each_bad_reference_is_exit_2_and_one_line(tmp_path, capsys):
    path = tmp_path / "refs.py"
    path.write_text("import torch\nNUMBER = 3\ndef not_a_task():\n    return 3\n"
                    "def raises():\n    raise KeyError('x')\n")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    cases = [
        ("mytask", "must be FILE.py:CALLABLE"),
        (f"{tmp_path}/missing.py:task", "no file"),
        (f"{path}:absent", "has no 'absent'"),
        (f"{path}:NUMBER", "not a zero-argument callable"),
        (f"{path}:not_a_task", "returned int, not an engine.tasks.SupervisedTask"),
        (f"{path}:raises", "raises() raised KeyError"),
        (f"{broken}:task", "raised ModuleNotFoundError while loading"),
        ("no_such_pkg.tasks:task", "cannot import module 'no_such_pkg.tasks'"),
        (f"{path}:1x", "is not a Python name"),
    ]
    for ref, message in cases:
        assert main(_run_args(tmp_path, ref)) == 2, ref
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (ref, err)
        assert err.startswith("engine.run: error:")


def test_a_store_hit_is_refused_after_the_task_file_changes(tmp_path, toy):
    from engine.exec import SerialExecutor
    from engine.fitness.evaluator import Evaluator
    from engine.fitness.store import Store
    from engine.modes import ALR
    from kernels import zoo

    adam = str(zoo.adam())

    def evaluate():
        _, ref = resolve(f"{toy}:task")
        with Store(tmp_path / "store.sqlite") as store:
            [answer] = Evaluator(ALR, ref, 0, store, SerialExecutor()).evaluate([adam])
        return ref, answer

    first_ref, first = evaluate()
    assert first.source == "trained"
    assert evaluate()[1].source == "store"  # unchanged: answered from the store
    # Another data set, the same settings: only the file's content tells them apart.
    toy.write_text(TOY.replace("manual_seed(0)", "manual_seed(1)"))
    edited_ref, edited = evaluate()
    assert edited_ref.digest != first_ref.digest and edited.source == "trained"
    # A worker holding the old reference refuses the edited file rather than train on it.
    with pytest.raises(TaskError, match="changed since the run checked it"):
        worker_task(first_ref)


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path, toy):
    from engine.app.config import build_parser, new_config
    from engine.app.flagfile import with_config_file

    (tmp_path / "run.toml").write_text(f'task = "{toy}:task"\npopulation = 7\n'
                                       'generations = 3\nseed-zoo = false\ndevice = "cpu"\n')
    parser = build_parser()
    argv = ["--config", str(tmp_path / "run.toml"), "--generations", "2", "--out",
            str(tmp_path / "a")]
    config = new_config(with_config_file(parser, parser.parse_args(argv)), argv)
    assert (config.task, config.evolution.population, config.evolution.generations,
            config.seed_zoo, config.device) == (f"{toy}:task", 7, 2, False, "cpu")
    # A previous run's config.json starts the same run again, in a new directory.
    (tmp_path / "config.json").write_text(json.dumps(config.to_json()))
    argv = ["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "b")]
    again = new_config(with_config_file(parser, parser.parse_args(argv)), argv)
    assert (again.task, again.evolution, again.seed_zoo) == (config.task, config.evolution,
                                                              False)
    (tmp_path / "bad.json").write_text('{"populaton": 3}')
    with pytest.raises(Exception, match="unknown flag 'populaton'"):
        with_config_file(parser, parser.parse_args(["--config", str(tmp_path / "bad.json")]))


def test_builtin_families_resolve_and_pass_the_check():
    from engine.tasks.supervised import check_task

    for name in FAMILIES:
        if name in ("fmnist-cnn", "fmnist-mlp"):  # the presets; Fashion-MNIST's own tests
            continue
        task, ref = resolve(name)
        assert isinstance(task, SupervisedTask) and ref.name == name
        data = check_task(task)
        assert data.test is not None  # engine.compare can take every family
    assert resolve("charlm")[0].metric == "neg_loss" and resolve("diabetes")[0].loss == "mse"


HELD_OUT = {"wine-mlp": ((106, 36, 36), 13, 3), "cancer-mlp": ((341, 114, 114), 30, 2),
            "digits-cnn": ((997, 350, 450), (1, 8, 8), 10)}


@pytest.mark.parametrize("name", HELD_OUT)
def test_held_out_families_have_three_disjoint_stratified_splits(name):
    """What engine.compare needs of a held-out task: train / val / test, disjoint, every class in
    each, standardised with the training split's statistics only, and a model that trains."""
    from engine.tasks.compare_tasks import get_task, load_test_split, train_val
    from engine.tasks.supervised import check_task

    sizes, shape, classes = HELD_OUT[name]
    task, _ = resolve(name)
    data = check_task(task)
    splits = (data.train, data.val, data.test)
    assert tuple(len(y) for _, y in splits) == sizes
    assert all(set(y.tolist()) == set(range(classes)) for _, y in splits)
    assert all(x.dtype == torch.float32 and x.shape[1:] == (
        (shape,) if isinstance(shape, int) else shape) for x, _ in splits)
    rows = [{tuple(r.tolist()) for r in x.reshape(len(x), -1)} for x, _ in splits]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    if name != "digits-cnn":  # standardised on train: mean 0, sd 1 there, not elsewhere
        assert torch.allclose(data.train[0].mean(0), torch.zeros(shape), atol=1e-5)
        assert not torch.allclose(data.test[0].mean(0), torch.zeros(shape), atol=1e-3)
    else:  # digits-mlp's images and split, through convolutions
        assert any(isinstance(m, torch.nn.Conv2d) for m in task.model().modules())
        mlp = check_task(resolve("digits-mlp")[0])
        for (x, y), (x_mlp, y_mlp) in zip(splits, (mlp.train, mlp.val, mlp.test)):
            assert torch.allclose(x.reshape(len(x), -1), x_mlp) and torch.equal(y, y_mlp)
    compare = get_task(name)  # engine.compare takes it, test split apart
    assert compare.source == "supervised"
    assert len(train_val(compare, 0).val[1]) == sizes[1]
    assert len(load_test_split(compare, 0)[1]) == sizes[2]


def test_wine_is_trained_on_the_brier_score():
    """Held out by its loss: sum_c (p_c - onehot_c)^2, averaged; bounded by 2 per example, so
    one confident mistake cannot send exp(-loss) to 0 as it does cross-entropy's."""
    from engine.tasks.families.wine_mlp import brier

    task = resolve("wine-mlp")[0]
    assert task.loss is brier and task.metric == "neg_loss"
    out = torch.tensor([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0], [0.0, 50.0, 0.0]])
    target = torch.tensor([0, 1, 1])
    # uniform: (2/3)^2 + 2 (1/3)^2 = 2/3; confidently wrong: 2; confidently right: 0.
    assert float(brier(out, target)) == pytest.approx((2 / 3 + 2 + 0) / 3, abs=1e-6)


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Evolve an optimizer for your own model"):]
    return re.search(r"```python\n(# mytask\.py\n.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_verbatim(tmp_path):
    import engine

    (tmp_path / "mytask.py").write_text(_readme_example())
    result = engine.search(f"{tmp_path / 'mytask.py'}:task", generations=1, population=6,
                           out=tmp_path / "run", workers=2, preset="smoke",
                           store=tmp_path / "store.sqlite")
    assert result.status == "finished" and result.fitness > 0.5
    assert result.summary["best"]["fitness"] == result.fitness


def test_engine_compare_takes_a_task_file(tmp_path, toy, capsys):
    from engine.compare.cli import main as compare

    out = tmp_path / "cmp"
    assert compare(["weight: mul(0.01, sign(grad))", "--task", f"{toy}:task", "--seeds", "2",
                    "--trials", "2", "--optimizers", "adam", "--workers", "1", "--out",
                    str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["task"]["name"] == "toy"
    assert all(0.5 < s["test_acc"] <= 1.0 for row in report["rows"] for s in row["seeds"])
    no_test = tmp_path / "no_test.py"
    no_test.write_text(TOY.replace(',\n            "test": (x[200:], y[200:])}', "}"))
    capsys.readouterr()
    assert compare(["weight: mul(0.01, grad)", "--task", f"{no_test}:task"]) == 2
    assert "no 'test' split (engine.compare measures on it)" in capsys.readouterr().err
