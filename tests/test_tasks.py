"""Tasks and training: the paper protocol's pieces, checked on small slices in seconds.

Training tests run on the real Fashion-MNIST when it is installed and on generated, learnable
images otherwise; the parameter id of every such test says which (`real` or `generated`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import resource
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.tasks import protocol as tasks, training
from engine.tasks.data import SYSTEM_DIR, load_fashion_mnist
from engine.tasks.protocol import (
    FLOOR_FITNESS,
    AlrProtocol,
    DataSpec,
    DlrProtocol,
    Task,
    alr_fitness,
    dlr_fitness,
    get_task,
    make_split,
    prepare,
)
from engine.tasks.training import CNN, ModelSpec, loss_accuracy, fit

HAVE_REAL = any((SYSTEM_DIR / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))
SMOKE = get_task("smoke")


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def _generated(directory, n=2000, seed=0):
    """Learnable stand-in data: each class a fixed random pattern plus noise, as IDX files."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 28, 28))
    labels = np.arange(n) % 10
    noise = rng.normal(0, 60, size=(n, 28, 28))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    files = {"train-images-idx3-ubyte": images, "train-labels-idx1-ubyte": labels.astype(np.uint8)}
    for stem, array in files.items():
        header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (directory / f"{stem}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return load_fashion_mnist("train", directory=directory)


@pytest.fixture(scope="module", params=["real" if HAVE_REAL else "generated"])
def dataset(request, tmp_path_factory):
    if request.param == "real":
        return load_fashion_mnist("train", directory=SYSTEM_DIR)
    return _generated(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    training.configure_process(1)  # bit-exact reproducibility holds for a fixed thread count
    yield
    torch.set_num_threads(old)


# --- split and normalisation ------------------------------------------------------------------


def paper_labels() -> np.ndarray:
    if HAVE_REAL:
        return load_fashion_mnist("train", directory=SYSTEM_DIR).labels
    return np.random.default_rng(0).permutation(np.arange(60000) % 10)


def test_paper_split_sizes_and_stratification():
    labels = paper_labels()
    split = make_split(labels, get_task("paper").data, seed=3)
    assert len(split.val) == len(split.fitness) == 3500
    assert len(split.chunks) == 7 and {len(c) for c in split.chunks} <= {7571, 7572}
    everything = np.concatenate([split.val, split.fitness, *split.chunks])
    assert len(everything) == 60000 and len(np.unique(everything)) == 60000  # disjoint, complete
    share = np.bincount(labels, minlength=10) / len(labels)
    for part in (split.val, split.fitness, *split.chunks):
        counts = np.bincount(labels[part], minlength=10)
        assert np.all(np.abs(counts - share * len(part)) <= 1), counts


def test_split_is_fixed_by_the_seed():
    labels, spec = paper_labels(), get_task("paper").data
    a, b, c = make_split(labels, spec, 1), make_split(labels, spec, 1), make_split(labels, spec, 2)
    assert np.array_equal(a.val, b.val) and all(np.array_equal(x, y) for x, y in zip(a.chunks, b.chunks))
    assert not np.array_equal(a.val, c.val)


def test_pool_subset_is_stratified():
    labels = paper_labels()
    split = make_split(labels, SMOKE.data, seed=0)
    assert len(split.val) == 200 and len(split.fitness) == 200
    assert [len(c) for c in split.chunks] == [600, 600]
    for part in (split.val, split.fitness, *split.chunks):
        counts = np.bincount(labels[part], minlength=10)
        assert counts.max() - counts.min() <= 2, counts


def test_bad_protocols_and_seeds_are_refused(dataset):
    with pytest.raises(ValueError, match="abort_below is an accuracy in"):
        AlrProtocol(abort_below=80)
    with pytest.raises(ValueError, match="DlrProtocol.patience must be >= 1, got 0"):
        DlrProtocol(patience=0)
    with pytest.raises(ValueError, match="ModelSpec.dropout1 is a drop probability"):
        ModelSpec(dropout1=1.0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        alr_fitness(SMOKE, adam, seed=-1, dataset=dataset)


def test_task_digest_changes_with_any_field_and_not_between_processes():
    """The digest is part of the results store's key: a preset redefined (here one epoch more)
    must not be answered from fitnesses measured under its old definition."""
    import subprocess
    import sys

    quick = tasks.PRESETS["quick"]
    longer = dataclasses.replace(quick, alr=dataclasses.replace(quick.alr, max_epochs=5))
    assert quick.digest != longer.digest
    assert len({t.digest for t in tasks.PRESETS.values()}) == len(tasks.PRESETS)
    other = subprocess.run([sys.executable, "-c", "from engine.tasks.protocol import PRESETS; "
                            "print(PRESETS['quick'].digest)"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert other == quick.digest


def test_bad_data_specs_are_refused():
    with pytest.raises(ValueError, match="leaves no training chunk"):
        DataSpec(val=100, fitness=100, chunk=100, pool=250)
    with pytest.raises(ValueError, match="has 50 images"):
        make_split(np.arange(50) % 10, SMOKE.data, 0)


def test_one_normalisation_for_every_part(dataset):
    data = prepare(SMOKE, 0, dataset)
    pool = dataset.images[data.split.train].astype(np.float64) / 255
    assert np.allclose(data.mean_image.numpy(), pool.mean(axis=0), atol=1e-6)
    parts = [(data.split.val, data.val), (data.split.fitness, data.fitness)]
    parts += list(zip(data.split.chunks, data.chunks))
    for index, (x, y) in parts:  # every part is images/255 minus the same mean image
        restored = (x[:, 0] + data.mean_image).numpy()
        assert np.allclose(restored, dataset.images[index] / 255, atol=1e-6)
        assert np.array_equal(y.numpy(), dataset.labels[index])
    assert prepare(SMOKE, 0, dataset) is data  # built once per process


# --- model ------------------------------------------------------------------------------------


def test_reference_cnn_shape_and_same_initial_weights():
    model = ModelSpec().build(seed=7)
    params = list(model.parameters())
    assert len(params) == 8 and sum(p.numel() for p in params) == 1_199_882
    again, other = ModelSpec().build(seed=7), ModelSpec().build(seed=8)
    assert all(torch.equal(a, b) for a, b in zip(params, again.parameters()))
    assert not torch.equal(params[0], next(other.parameters()))
    assert all(torch.all(p == 0) for name, p in model.named_parameters() if name.endswith("bias"))


def plain_forward(model: CNN, x: torch.Tensor, masks=(None, None)) -> torch.Tensor:
    """The textbook order (relu, then pool, then dropout) in NCHW, as the reference writes it."""
    h = F.relu(F.conv2d(x, model.conv1.weight.contiguous(), model.conv1.bias))
    h = F.max_pool2d(F.relu(F.conv2d(h, model.conv2.weight.contiguous(), model.conv2.bias)), 2)
    if masks[0] is not None:
        h = h * masks[0]
    h = F.relu(F.linear(h.permute(0, 2, 3, 1).flatten(1), model.fc1.weight, model.fc1.bias))
    if masks[1] is not None:
        h = h * masks[1]
    return F.linear(h, model.fc2.weight, model.fc2.bias)


def test_fast_cnn_computes_the_reference_math():
    """Pool-before-relu, channels_last and fused dropout change speed, not the function."""
    spec = ModelSpec(conv1=8, conv2=16, dense=32)
    model = spec.build(seed=0)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    ours = model(x, dropout=torch.Generator().manual_seed(5))
    # Recover the masks the fused op drew by replaying the generator, then run the plain network.
    gen = torch.Generator().manual_seed(5)
    m1 = training._scaled_mask(64 * 16 * 12 * 12, 0.25, gen).view(64, 12, 12, 16).permute(0, 3, 1, 2)
    m2 = training._scaled_mask(64 * 32, 0.5, gen).view(64, 32)
    assert set(m1.unique().tolist()) == {0.0, float(torch.tensor(4 / 3))}
    assert abs(float((m1 > 0).float().mean()) - 0.75) < 0.02
    reference = plain_forward(model, x, (m1, m2))
    assert torch.allclose(ours, reference, atol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    expected = torch.autograd.grad(reference.square().sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(grads, expected))
    model.eval()
    assert torch.allclose(model(x), plain_forward(model, x), atol=1e-5)  # no dropout when evaluating


BUFFER = 200 * 2**20  # bytes: one big activation's worth

# Run in a fresh process: the heap of a test process that already ran hundreds of tests is
# fragmented in ways no training worker's is, and a freed block may then never fit the next one.
_KEPT_AFTER_FREE = """
import json, resource, sys
import torch
from engine.tasks import training

BUFFER = int(sys.argv[1])

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

def kept_after_free():
    # (bytes still held after a filled BUFFER is freed, bytes the allocation added to the
    # resident set): memory, not page-fault counts, which depend on the kernel's page size.
    before = resident_bytes()
    buffer = torch.empty(BUFFER // 4).fill_(1.0)
    grown = resident_bytes() - before
    peak = resident_bytes()
    del buffer
    return BUFFER - (peak - resident_bytes()), grown

assert training.retain_heap(False)
off = kept_after_free()
assert training.retain_heap(True)
print(json.dumps({"off": off, "on": [kept_after_free() for _ in range(8)]}))
"""


@pytest.mark.skipif(training._libc() is None or not os.path.exists("/proc/self/statm"),
                    reason="no glibc mallopt or /proc here")
def test_retain_heap_keeps_freed_memory_for_the_next_step():
    """What configure_process is for: a big buffer freed stays in the process, and the next one
    of the same size is served from it instead of being mapped (and page-faulted) in afresh."""
    done = subprocess.run([sys.executable, "-c", _KEPT_AFTER_FREE, str(BUFFER)],
                          capture_output=True, text=True, timeout=120, check=True)
    found = json.loads(done.stdout)
    kept, grown = found["off"]
    assert kept < BUFFER / 10 and grown > BUFFER * 0.9  # glibc's default: unmapped on free
    rounds = found["on"]
    assert all(kept > BUFFER * 0.9 for kept, _ in rounds)
    # The kept heap needs a few rounds of fragmentation before a freed block fits the next
    # request (torch allocates 64-byte aligned), then it is reused for good.
    assert all(grown < BUFFER / 10 for _, grown in rounds[-3:]), rounds


@pytest.mark.skipif(training._pool_kernels() is None, reason="numba not installed")
@pytest.mark.parametrize("train", [True, False], ids=["dropout", "eval"])
def test_fused_pool_kernel_is_bit_identical_to_torch(train):
    """The Numba max-pool+ReLU+dropout against torch's ops: same outputs and gradients, bit for bit,
    with ties (first maximum wins) and NaN (it wins) in the windows."""
    inputs = torch.Generator().manual_seed(2)  # one fixed case: a failure can be replayed
    x = torch.randint(-3, 4, (6, 8, 10, 12), generator=inputs).float()  # small integers: ties
    x[0, 0, 0, 0] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(6, 8, 5, 6, generator=inputs).contiguous(memory_format=torch.channels_last)
    results = []
    for fused in (True, False):
        leaf = x.clone().requires_grad_()
        generator = torch.Generator().manual_seed(3) if train else None
        if fused:
            out = training._pool_relu_dropout(leaf, 0.25, generator)
        else:
            out = training._relu_dropout(F.max_pool2d(leaf, 2), 0.25, generator)
        (grad_in,) = torch.autograd.grad(out, leaf, grad)
        results.append((out.detach(), grad_in))
    (out_a, grad_a), (out_b, grad_b) = results
    assert torch.equal(out_a.nan_to_num(-9), out_b.nan_to_num(-9)) and out_a.isnan().any()
    assert torch.equal(grad_a, grad_b)


# --- fit: early stopping, restore, divergence, deadline ---------------------------------------


class Saboteur(torch.optim.Adam):
    """Adam that wrecks the weights after `good_steps` steps, so later epochs are worse."""

    def __init__(self, params, good_steps):
        super().__init__(params, lr=2e-3)
        self.steps, self.good_steps = 0, good_steps

    @torch.no_grad()
    def step(self, closure=None):
        self.steps += 1
        if self.steps <= self.good_steps:
            return super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(self.steps)) * 0.3)


def test_fit_restores_the_best_epoch(dataset, one_thread):
    data = prepare(SMOKE, 0, dataset)
    model = SMOKE.model.build(0)
    result = fit(model, Saboteur(model.parameters(), good_steps=12), data.chunks[0], data.val,
                 seed=0, batch_size=100, max_epochs=6, patience=2)
    assert result.reason is None and result.epochs == result.best_epoch + 3  # stopped by patience
    assert result.val_acc[result.best_epoch] == max(result.val_acc) > result.val_acc[-1]
    assert loss_accuracy(model, *data.val)[1] == result.val_acc[result.best_epoch]  # not the last epoch


def test_fit_stops_on_nan_at_once(dataset):
    data = prepare(SMOKE, 0, dataset)
    model = SMOKE.model.build(0)
    result = fit(model, torch.optim.SGD(model.parameters(), lr=1e6), data.chunks[0], data.val,
                 seed=0, batch_size=100, max_epochs=5, patience=2)
    assert result.reason.startswith("diverged: training loss") and result.epochs == 0


def test_fit_rejects_a_bad_monitor():
    model = SMOKE.model.build(0)
    with pytest.raises(ValueError, match="monitor must be"):
        fit(model, adam(model.parameters()), (None, torch.zeros(1)), (None, None),
            seed=0, batch_size=1, max_epochs=1, patience=1, monitor="acc")


# --- the ALR protocol -------------------------------------------------------------------------


def without_seconds(result):
    """Everything but wall-clock times, which are the only thing allowed to differ between runs."""
    record = result.to_dict()
    record.pop("seconds")
    for trial in record["trials"]:
        trial.pop("seconds")
    return record


def test_alr_is_exactly_reproducible_and_seed_dependent(dataset, one_thread):
    task = dataclasses.replace(SMOKE, alr=dataclasses.replace(SMOKE.alr, max_epochs=2, abort_below=0))
    a = alr_fitness(task, adam, seed=0, dataset=dataset)
    b = alr_fitness(task, adam, seed=0, dataset=dataset)
    c = alr_fitness(task, adam, seed=1, dataset=dataset)
    assert without_seconds(a) == without_seconds(b) and a.reason is None
    assert a.train_loss != c.train_loss
    assert len(a.trials) == 2 and a.fitness == min(a.accuracies)
    assert a.fitness > 0.2  # Adam learns something in 2 epochs of 6 steps


def test_trials_train_on_distinct_chunks_from_the_same_start(dataset, monkeypatch):
    seen, starts = [], []
    real_fit = tasks.fit

    def spy_fit(model, optimizer, train, val, **kw):
        seen.append(train[0])
        return real_fit(model, optimizer, train, val, **kw)

    def factory(params):
        params = list(params)
        starts.append([p.detach().clone() for p in params])
        return adam(params)

    monkeypatch.setattr(tasks, "fit", spy_fit)
    task = dataclasses.replace(SMOKE, alr=dataclasses.replace(SMOKE.alr, max_epochs=1, abort_below=0.0))
    result = alr_fitness(task, factory, seed=0, dataset=dataset)
    alr_fitness(task, factory, seed=0, dataset=dataset)  # a second candidate
    data = prepare(task, 0, dataset)
    assert [t.chunk for t in result.trials] == [0, 1]
    assert torch.equal(seen[0], data.chunks[0][0]) and torch.equal(seen[1], data.chunks[1][0])
    assert not torch.equal(seen[0], seen[1])
    assert len(starts) == 4 and all(all(torch.equal(a, b) for a, b in zip(starts[0], s)) for s in starts)


@pytest.mark.parametrize(
    "scores, trials, fitness",
    [([0.9, 0.85, 0.95], 3, 0.85), ([0.9, 0.7, 0.95], 2, 0.7), ([0.5, 0.9, 0.9], 1, 0.5)],
    ids=["minimum", "abort-second", "abort-first"],
)
def test_fitness_is_the_minimum_and_trials_stop_below_threshold(
    dataset, monkeypatch, scores, trials, fitness
):
    remaining = list(scores)
    monkeypatch.setattr(tasks, "loss_accuracy", lambda model, x, y, batch_size: (0.0, remaining.pop(0)))
    task = dataclasses.replace(
        SMOKE,
        data=dataclasses.replace(SMOKE.data, chunk=400),  # three chunks
        alr=AlrProtocol(trials=3, batch_size=100, max_epochs=1, patience=1, abort_below=0.8),
    )
    result = alr_fitness(task, adam, seed=0, dataset=dataset)
    assert result.accuracies == tuple(scores[:trials])
    assert result.fitness == fitness and result.reason is None


def test_nan_candidate_gets_the_floor_with_a_reason(dataset):
    result = alr_fitness(SMOKE, lambda p: torch.optim.SGD(p, lr=1e6), seed=0, dataset=dataset)
    assert result.fitness == FLOOR_FITNESS and "diverged" in result.reason and "trial 0" in result.reason


def test_deadline_stops_training_with_a_timeout(dataset):
    """The mechanism, not a wall time: each step of this optimizer outlasts the whole limit, so
    the deadline is found passed after the first step, and the protocol stops there (no more
    steps, epochs or trials)."""
    steps = []

    class SlowAdam(torch.optim.Adam):
        def step(self, closure=None):
            time.sleep(0.05)
            steps.append(1)
            return super().step(closure)

    prepare(SMOKE, 0, dataset)  # so the limit is spent on training
    result = alr_fitness(SMOKE, lambda p: SlowAdam(p, lr=1e-3), seed=0, time_limit=0.02,
                          dataset=dataset)
    assert result.fitness == FLOOR_FITNESS
    assert result.reason == "timeout: deadline passed at epoch 0, step 0 (trial 0)"
    assert len(steps) == 1 and len(result.trials) == 1
    with pytest.raises(ValueError, match="time_limit must be > 0"):
        alr_fitness(SMOKE, adam, seed=0, time_limit=0, dataset=dataset)


def test_factory_must_return_an_optimizer(dataset):
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        alr_fitness(SMOKE, lambda p: object(), seed=0, dataset=dataset)


def test_more_trials_than_chunks_is_refused(dataset):
    task = dataclasses.replace(SMOKE, alr=dataclasses.replace(SMOKE.alr, trials=5))
    with pytest.raises(ValueError, match="5 trials but its data gives only 2 chunks"):
        alr_fitness(task, adam, seed=0, dataset=dataset)


# --- the DLR protocol -------------------------------------------------------------------------


def test_dlr_calls_the_schedule_each_epoch_with_the_current_lr(dataset):
    calls = []

    def schedule(epoch, lr):
        calls.append((epoch, lr))
        return lr * 2

    result = dlr_fitness(SMOKE, schedule, seed=0, dataset=dataset)
    assert calls[0] == (0, 0.01) and [e for e, _ in calls] == list(range(len(calls)))
    assert all(math.isclose(lr, 0.01 * 2 ** (e + 1)) for e, lr in enumerate(result.trials[0].fit.lr))
    assert result.reason is None and result.fitness == result.trials[0].accuracy


def test_dlr_non_finite_lr_is_a_divergence(dataset):
    result = dlr_fitness(SMOKE, lambda epoch, lr: float("nan"), seed=0, dataset=dataset)
    assert result.fitness == FLOOR_FITNESS and result.reason.startswith("diverged: schedule gave lr=nan")
    with pytest.raises(TypeError, match="schedule must be callable"):
        dlr_fitness(SMOKE, 0.01, seed=0, dataset=dataset)


# --- presets ----------------------------------------------------------------------------------


def test_presets():
    paper = get_task("paper")
    assert paper.alr == AlrProtocol(
        trials=5, batch_size=1000, max_epochs=100, patience=5, abort_below=0.8
    )
    assert paper.dlr == DlrProtocol(initial_lr=0.01, batch_size=1000, max_epochs=100, patience=3)
    assert paper.model == ModelSpec() and paper.data == DataSpec(val=3500, fitness=3500, chunk=7571)
    assert {"smoke", "quick", "paper"} <= set(tasks.PRESETS)
    assert all(isinstance(t, Task) and t.name == name for name, t in tasks.PRESETS.items())
    expected = "unknown task preset 'fast'; valid presets: smoke, quick, paper"
    with pytest.raises(ValueError, match=expected):
        get_task("fast")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL, reason="the quick preset is sized for the real Fashion-MNIST")
def test_quick_preset_separates_optimizers(one_thread):
    """The default task must rank optimizers: Adam well above SGD(0.01), a dead one near chance."""
    task = get_task("quick")
    good = alr_fitness(task, adam, seed=0)
    plain = alr_fitness(task, lambda p: torch.optim.SGD(p, lr=0.01), seed=0)
    dead = alr_fitness(task, lambda p: torch.optim.SGD(p, lr=1e-5), seed=0)
    assert good.fitness > 0.75 and len(good.trials) == 2
    assert good.fitness - plain.fitness > 0.1 and dead.fitness < 0.3


def test_device_resolution():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert tasks.resolve_device(None).type == expected and tasks.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        tasks.resolve_device("gpu0")


def test_configure_process_leaves_torch_and_numba_at_the_asked_thread_count():
    """numba.set_num_threads resets torch's OpenMP count: configure_process must win over it."""
    import numba

    from engine.tasks.training import configure_process

    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        for threads in (2, 1, 2, 1):
            configure_process(threads)
            assert (torch.get_num_threads(), numba.get_num_threads()) == (threads, threads)
    finally:
        configure_process(before[0])
