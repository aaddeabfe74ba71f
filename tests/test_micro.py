"""The micro tier's pieces: the interpreter behind the batched trainer, and score_micro."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codegen.ir import Program
from engine.fitness.micro import InterpUpdate, _batches, score_micro
from engine.tasks.batched import KernelUpdate, StackedModel, fit_batched
from engine.tasks.compare_tasks import MLPSpec, get_task, train_val
from engine.tasks.training import ModelSpec
from kernels import zoo

EXPLODING = Program.parse("alpha: sub(mul(-9.0, alpha), grad)\nweight: mul(lr, alpha)")
NO_LR = Program.parse("alpha: sub(alpha, add(mul(0.9, alpha), grad))\nweight: mul(0.5, alpha)")
PROGRAMS = [zoo.adam(), zoo.adam(), zoo.rmsprop(), EXPLODING, zoo.sign(), NO_LR]
LRS = [1e-3, 1e-2, 1e-3, 1.0, 1e-3, 0.02]


@pytest.fixture(scope="module")
def digits():
    splits = train_val(get_task("digits"), 0)
    (x, y), val = splits.train, splits.val
    return (x[:256], y[:256]), val


def _fit(spec, update, train, val):
    model = StackedModel(spec, [7] * len(PROGRAMS))
    fits = fit_batched(model, update, LRS, train, val, seed=3, batch_size=32, max_epochs=4,
                       patience=4)
    return fits, model.weight.clone()


@pytest.mark.parametrize("spec", [MLPSpec(64, (32,)), ModelSpec(4, 8, 16, image_size=8)],
                         ids=["mlp", "cnn"])
def test_interpreter_trains_exactly_as_the_kernels(digits, spec, one_torch_thread):
    """Same members, same batch: the interpreter's trainings are the generated kernels' bit for
    bit (lr scales, the lr rule, uniform states, a diverging member frozen)."""
    train, val = digits
    if isinstance(spec, ModelSpec):
        train, val = (train[0].view(-1, 1, 8, 8), train[1]), (val[0].view(-1, 1, 8, 8), val[1])
    by_kernels, w_kernels = _fit(spec, KernelUpdate(PROGRAMS), train, val)
    by_interp, w_interp = _fit(spec, InterpUpdate(PROGRAMS), train, val)
    assert by_kernels[3].reason.startswith("diverged")
    for a, b in zip(by_kernels, by_interp):
        assert (a.val_acc, a.train_loss, a.reason) == (b.val_acc, b.train_loss, b.reason)
    assert torch.equal(w_kernels, w_interp)


def test_a_diverging_candidate_leaves_the_others_scores_alone():
    calm = [str(zoo.adam()), str(zoo.rmsprop()), str(zoo.momentum())]
    jobs = [(t, s) for t in calm for s in (1e-3, 1e-2)]
    alone = score_micro(["digits-mlp"], 30, jobs)
    mixed = score_micro(["digits-mlp"], 30, jobs[:3] + [(str(EXPLODING), 1.0)] + jobs[3:])
    assert mixed[3] == 0.0
    assert mixed[:3] + mixed[4:] == alone
    assert max(alone) > 0.5


def test_every_lr_scale_is_its_own_member_and_batches_split_alike():
    jobs = [(str(zoo.sgd()), s) for s in (0.01, 0.1, 1.0)]
    together = score_micro(["digits-mlp"], 20, jobs)
    apart = score_micro(["digits-mlp"], 20, jobs, max_batch=1)
    assert len(set(together)) == 3  # three lrs, three trainings
    np.testing.assert_allclose(together, apart, atol=1e-9)


def test_a_candidates_lr_scales_share_a_batch():
    texts = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    assert _batches(texts, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert _batches(texts, 6) == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]
    assert _batches(["a", "b", "a"], 2) == [[0, 2], [1]]
    assert _batches(["a"] * 5, 2) == [[0, 1, 2, 3, 4]]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown micro task"):
        score_micro(["mnist"], 10, [(str(zoo.sgd()), 1.0)])
    with pytest.raises(ValueError, match="at least 1 step"):
        score_micro(["digits-mlp"], 0, [(str(zoo.sgd()), 1.0)])
