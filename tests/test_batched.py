"""Population-batched training equals one-at-a-time training, member by member.

The reference is `engine.tasks.training.fit` with an `EvolvedOptimizer` per candidate (what the engine
runs today). The CNN's members must match it bit for bit; the MLP's within float32
reduction-order noise (its batched GEMMs sum in another order than nn.Linear), bounded here
relative to the weights' size after full trainings.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from codegen.ir import Program
from engine.tasks.batched import (ArenaViews, KernelUpdate, Member, StackedModel, fit_batched,
                            train_batch)
from engine.tasks.compare_tasks import MLPSpec, get_task, train_val
from engine.tasks.training import ModelSpec, fit
from kernels import EvolvedOptimizer, zoo

# alpha <- 10 alpha + g: the weight update grows tenfold a step until the loss overflows.
EXPLODING = Program.parse("alpha: sub(mul(-9.0, alpha), grad)\nweight: mul(lr, alpha)")
# Never reads lr: the project's rule scales its weight update by the member's lr.
NO_LR = Program.parse("alpha: sub(alpha, add(mul(0.9, alpha), grad))\nweight: mul(0.5, alpha)")
MEMBERS = [Member(zoo.adam(), 1e-3), Member(zoo.adam(), 1e-3), Member(zoo.adam(), 1e-2),
           Member(zoo.rmsprop(), 1e-3), Member(EXPLODING, 1.0), Member(zoo.momentum(), 0.05),
           Member(zoo.sign(), 1e-3), Member(NO_LR, 0.02)]
INIT_SEEDS = [7, 8, 7, 7, 7, 7, 7, 7]  # two adams at one lr from two starts: one shared launch
SEED, EPOCHS = 11, 3


@pytest.fixture(scope="module")
def digits():
    splits = train_val(get_task("digits"), 0)
    (x, y), val = splits.train, splits.val
    return (x[:320], y[:320]), val


def _images(pair):
    x, y = pair
    return x.view(-1, 1, 8, 8), y


def _alone(spec, member, init_seed, train, val, batch_size, fused=True):
    model = spec.build(init_seed)
    model.fused_pool = fused  # the CNN's: torch's pooling ops when False
    optimizer = EvolvedOptimizer(model.parameters(), member.program,
                                 backend="numba", lr=member.lr)
    result = fit(model, optimizer, train, val, seed=SEED, batch_size=batch_size,
                 max_epochs=EPOCHS, patience=EPOCHS)
    return result, model.state_dict()


def _batched(spec, members, init_seeds, train, val, batch_size, fused=True):
    model = StackedModel(spec, init_seeds)
    model.fused_pool = fused
    fits = fit_batched(model, KernelUpdate([m.program for m in members]),
                       [m.lr for m in members], train, val, seed=SEED, batch_size=batch_size,
                       max_epochs=EPOCHS, patience=EPOCHS)
    return fits, [model.member_state(k) for k in range(len(members))]


def _same_fit(a, b, exact_losses):
    assert (a.epochs, a.best_epoch, a.val_acc, a.reason, a.lr) == \
        (b.epochs, b.best_epoch, b.val_acc, b.reason, b.lr)
    if exact_losses:
        assert (a.train_loss, a.val_loss) == (b.train_loss, b.val_loss)
    else:
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)
        np.testing.assert_allclose(a.val_loss, b.val_loss, rtol=1e-5)


@pytest.mark.parametrize("spec", [MLPSpec(64, (32,)), ModelSpec(4, 8, 16, image_size=8)],
                         ids=["mlp", "cnn"])
def test_initial_weights_are_each_members_own(spec):
    model = StackedModel(spec, [3, 4, 5])
    for k, seed in enumerate([3, 4, 5]):
        alone = spec.build(seed).state_dict()
        mine = model.member_state(k)
        assert list(mine) == list(alone)
        for name, value in alone.items():
            assert torch.equal(mine[name], value)
            assert mine[name].stride() == value.stride()  # the layout decides conv algorithms


def test_mlp_batch_equals_one_at_a_time_within_reduction_noise(digits, one_torch_thread):
    spec = MLPSpec(64, (32,))
    train, val = digits
    fits, states = _batched(spec, MEMBERS, INIT_SEEDS, train, val, 32)
    assert fits[4].reason is not None and fits[4].reason.startswith("diverged: training loss")
    assert all(f.reason is None for k, f in enumerate(fits) if k != 4)
    for k, member in enumerate(MEMBERS):
        alone, alone_state = _alone(spec, member, INIT_SEEDS[k], train, val, 32)
        _same_fit(fits[k], alone, exact_losses=False)
        for name, value in alone_state.items():
            scale = float(value.abs().max())
            diff = float((states[k][name] - value).abs().max())
            assert diff <= 1e-5 * scale + 1e-7, (k, name, diff, scale)


@pytest.mark.parametrize("fused", [True, False], ids=["numba-pool", "torch-pool"])
def test_cnn_batch_equals_one_at_a_time_bit_for_bit(digits, fused, one_torch_thread):
    spec = ModelSpec(4, 8, 16, image_size=8)  # with both dropouts, on 8x8 digits
    train, val = _images(digits[0]), _images(digits[1])
    fits, states = _batched(spec, MEMBERS, INIT_SEEDS, train, val, 32, fused)
    assert fits[4].reason is not None and fits[4].reason.startswith("diverged: training loss")
    for k, member in enumerate(MEMBERS):
        alone, alone_state = _alone(spec, member, INIT_SEEDS[k], train, val, 32, fused)
        _same_fit(fits[k], alone, exact_losses=True)
        for name, value in alone_state.items():
            assert torch.equal(states[k][name], value), (k, name)


@pytest.mark.parametrize("spec", [MLPSpec(64, (32,)), ModelSpec(4, 8, 16, image_size=8)],
                         ids=["mlp", "cnn"])
def test_a_diverging_member_leaves_the_others_bit_for_bit(digits, spec, one_torch_thread):
    train, val = digits if isinstance(spec, MLPSpec) else (_images(digits[0]),
                                                           _images(digits[1]))
    calm = [0, 3, 5, 6]
    with_it, states = _batched(spec, [MEMBERS[k] for k in calm + [4]], [7] * 5, train, val, 32)
    without, clean = _batched(spec, [MEMBERS[k] for k in calm], [7] * 4, train, val, 32)
    assert with_it[-1].reason.startswith("diverged")
    for k in range(len(calm)):
        _same_fit(with_it[k], without[k], exact_losses=True)
        for name, value in clean[k].items():
            assert torch.equal(states[k][name], value)


def test_a_diverged_member_is_frozen_where_it_stopped(digits, one_torch_thread):
    train, val = digits
    model = StackedModel(MLPSpec(64, (32,)), [7, 7])
    update = KernelUpdate([zoo.adam(), EXPLODING])
    seen = []

    def watching(arena, lrs, step, active):
        seen.append((active.copy(), arena.weight[1].copy()))
        update(arena, lrs, step, active)

    watching.tensor_states = update.tensor_states
    fits = fit_batched(model, watching, [1e-3, 1.0], train, val, seed=SEED, batch_size=32,
                       max_epochs=EPOCHS, patience=EPOCHS)
    assert fits[1].reason.startswith("diverged: training loss")
    stopped = next(i for i, (active, _) in enumerate(seen) if not active[1])
    # After it stopped, its slice never moved again; the other member kept training.
    assert all(np.array_equal(w, seen[stopped][1], equal_nan=True) for _, w in seen[stopped:])
    assert fits[0].reason is None and len(seen) == 10 * EPOCHS  # 320 images / 32: all ran
    # ... and it ends on its best epoch's weights, as alone (the last epoch it finished).
    assert fits[1].epochs >= 1 and np.isfinite(model.weight[1].numpy()).all()


def test_any_update_behind_the_interface(digits, one_torch_thread):
    """The interface an IR interpreter will implement: a numpy SGD equals the sgd kernel."""
    train, val = digits

    class NumpySgd:
        tensor_states = ()

        def __call__(self, arena: ArenaViews, lrs, step, active) -> None:
            for k in np.flatnonzero(active):
                arena.weight[k] -= np.float32(lrs[k]) * arena.grad[k]

    results = []
    for update in (NumpySgd(), KernelUpdate([zoo.sgd(), zoo.sgd()])):
        model = StackedModel(MLPSpec(64, (32,)), [7, 8])
        results.append(fit_batched(model, update, [0.1, 0.05], train, val, seed=SEED,
                                   batch_size=32, max_epochs=2, patience=2))
        results.append(model.weight.clone())
    assert results[0] == [dataclasses.replace(r, seconds=a.seconds)
                          for r, a in zip(results[2], results[0])]
    assert torch.equal(results[1], results[3])


def test_triton_kernels_train_a_tensor_arena_as_the_numba_ones(digits, one_torch_thread):
    """On CUDA the batched trainer hands torch tensors to the triton kernels; Triton's CPU
    interpreter stands in for the GPU here. Same trainings as numba's, diverging member included,
    within float32 noise (the two compilers may contract or order operations differently)."""
    train, val = digits
    members = [MEMBERS[k] for k in (0, 2, 4, 5)]  # adam at two lrs (one launch), a diverging one
    runs = []
    for backend in ("numba", "triton"):
        model = StackedModel(MLPSpec(64, (32,)), [7] * len(members))
        update = KernelUpdate([m.program for m in members], backend)
        assert update.tensors == (backend == "triton")
        fits = fit_batched(model, update, [m.lr for m in members], train, val, seed=SEED,
                           batch_size=32, max_epochs=EPOCHS, patience=EPOCHS)
        runs.append((fits, model.weight.clone()))
    (fits, weight), (fits_t, weight_t) = runs
    assert fits_t[2].reason.startswith("diverged: training loss")
    for a, b in zip(fits, fits_t):
        _same_fit(a, b, exact_losses=False)
    scale = float(weight.abs().max())
    assert float((weight - weight_t).abs().max()) <= 1e-5 * scale


def test_a_numpy_update_refuses_an_arena_off_the_cpu(digits):
    train, val = digits
    model = StackedModel(MLPSpec(64, (32,)), [7], device="meta")
    with pytest.raises(ValueError, match="needs an update on torch tensors"):
        fit_batched(model, KernelUpdate([zoo.sgd()]), [0.1], train, val, seed=0, batch_size=32,
                    max_epochs=1, patience=1)


def test_train_batch_scores_each_member(digits, one_torch_thread):
    train, val = digits
    results = train_batch(MLPSpec(64, (32,)), [Member(zoo.adam(), 1e-2), Member(EXPLODING)],
                          train, val, init_seed=7, seed=SEED, batch_size=32, max_epochs=4,
                          patience=4, max_steps=25)
    assert results[0].reason is None and results[0].accuracy > 0.5
    assert results[0].fit.epochs == 3  # 10 steps, 10 more, then 5 of the third epoch
    assert results[1].reason.startswith("diverged") and results[1].accuracy == 0.0, results[1]


def test_bad_input_is_a_clear_error(digits):
    train, val = digits
    with pytest.raises(ValueError, match="one learning rate per member"):
        fit_batched(StackedModel(MLPSpec(64, (32,)), [1, 2]), KernelUpdate([zoo.sgd()] * 2),
                    [0.1], train, val, seed=0, batch_size=32, max_epochs=1, patience=1)
    with pytest.raises(ValueError, match="at least one member"):
        train_batch(MLPSpec(64, (32,)), [], train, val, init_seed=0, seed=0, batch_size=32,
                    max_epochs=1, patience=1)
    with pytest.raises(TypeError, match="MLPSpec or a ModelSpec"):
        StackedModel("mlp", [1])
    with pytest.raises(ValueError, match="backend 'torch'"):
        KernelUpdate([zoo.sgd()], "torch")
    with pytest.raises(ValueError, match="Member.lr"):
        Member(zoo.sgd(), float("nan"))
