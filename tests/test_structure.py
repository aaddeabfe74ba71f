"""Canonical keys, structural niches and the tree edit distance, on hand-checked pairs."""

from __future__ import annotations

import pytest

from engine.evolution.structure import canonical_key, nearest_seed, structure_key, tree, \
    tree_distance
from kernels import zoo


def node(label, *kids):
    return (label, tuple(kids))


def test_zhang_shashas_own_example():
    """Zhang and Shasha (1989), figure 1: f(d(a, c(b)), e) to f(c(d(a, b)), e) is 2 (delete c
    under d, insert c above d)."""
    a = node("f", node("d", node("a"), node("c", node("b"))), node("e"))
    b = node("f", node("c", node("d", node("a"), node("b"))), node("e"))
    assert tree_distance(a, b) == tree_distance(b, a) == 2
    assert tree_distance(a, a) == 0


@pytest.mark.parametrize("a, b, distance", [
    ("weight: neg(grad)", "weight: grad", 1),  # delete neg, keep its child
    ("weight: grad", "weight: sign(grad)", 1),  # insert sign
    ("weight: grad", "alpha: grad\nweight: alpha", 3),  # insert alpha: and grad, relabel
    ("weight: mul(0.1, grad)", "weight: mul(0.2, grad)", 0),  # constants left out
    ("weight: add(grad, grad)", "weight: mul(2.0, grad)", 2),  # relabel add, relabel grad
    ("if(epoch < 4, 0.05, 0.01)", "if(epoch < 8, 0.1, lr)", 1),  # schedules too
])
def test_hand_checked_pairs(a, b, distance):
    assert tree_distance(a, b) == tree_distance(b, a) == distance


def test_momentum_to_nesterov_is_four_insertions():
    """mul(lr, alpha) to mul(lr, add(grad, mul(0.9, alpha))): add, grad, mul and 0.9."""
    assert tree_distance(str(zoo.momentum()), str(zoo.nesterov())) == 4


def test_constants_count_when_asked():
    assert tree_distance("weight: mul(0.1, grad)", "weight: mul(0.2, grad)",
                         constants=True) == 1


def test_distances_are_taken_on_canonical_trees():
    """mul(1.0, grad) is grad, and operand order of add does not matter."""
    assert tree_distance("weight: mul(1.0, grad)", "weight: grad") == 0
    assert tree_distance("alpha: grad\nweight: add(alpha, grad)",
                         "alpha: grad\nweight: add(grad, alpha)") == 0


def test_nearest_seed():
    seeds = {name: str(zoo.ZOO[name]()) for name in ("momentum", "sgd", "adam")}
    assert nearest_seed("weight: mul(lr, sign(grad))", seeds) == ("sgd", 3)  # see below
    assert nearest_seed(str(zoo.nesterov()), seeds) == ("momentum", 4)
    with pytest.raises(ValueError, match="at least one seed"):
        nearest_seed("weight: grad", {})


def test_commutative_operands_are_compared_in_canonical_order():
    """The distance is between ordered trees, and a commutative op's operands are in canonical
    (shape) order: mul(lr, grad) is mul(grad, lr), mul(lr, sign(grad)) keeps its order, so sgd
    to signSGD costs 3 (two relabellings and an insertion), not the 1 a person would count."""
    assert tree_distance("weight: mul(lr, grad)", "weight: mul(lr, sign(grad))") == 3


def test_structure_key_leaves_constants_out_but_not_structure():
    a = "alpha: grad\nweight: add(mul(0.1, grad), mul(0.2, alpha))"
    b = "alpha: grad\nweight: add(mul(0.3, grad), mul(0.2, alpha))"  # the IR sorts these apart
    assert structure_key(a) == structure_key(b)
    assert canonical_key(a) != canonical_key(b)
    assert structure_key(a) != structure_key("alpha: grad\nweight: add(mul(0.1, grad), alpha)")


def test_texts_that_are_not_programs_fall_back_to_their_spelling():
    assert canonical_key("x  y") == canonical_key("xy") != canonical_key("yx")
    assert tree("not a program") == ("text:notaprogram", ())
