"""The IR: text round trip, parse errors, reference semantics, canonical form and hash."""

from __future__ import annotations

import random

import numpy as np
import pytest

from codegen.ir import ParseError, Program, Schedule, reference_step
from randprog import random_inputs, random_program

ADAMISH = """alpha: mul(0.1, sub(alpha, grad))
beta: mul(0.001, sub(beta, square(grad)))
weight: mul(lr, div(alpha, add(sqrt(beta), 1e-08)))"""


def test_text_round_trips_exactly():
    p = Program.parse(ADAMISH)
    assert str(p) == ADAMISH
    assert Program.parse(str(p)) == p


def test_random_programs_round_trip():
    rng = random.Random(7)
    for _ in range(300):
        p = random_program(rng)
        assert Program.parse(str(p)) == p
        c = p.canonical()
        assert Program.parse(str(c)) == c


def test_comments_blank_lines_and_missing_lines():
    p = Program.parse("# momentum\n\nalpha: sub(mul(0.1, alpha), grad)  # buf\nweight: mul(lr, alpha)\n")
    assert p.beta is None and p.sigma is None
    assert str(p) == "alpha: sub(mul(0.1, alpha), grad)\nweight: mul(lr, alpha)"


@pytest.mark.parametrize("text, line, column, words", [
    ("", 1, 1, "empty program"),
    ("   \n# only a comment\n", 1, 1, "empty program"),
    ("weight: foo(grad)", 1, 9, "unknown op 'foo'"),
    ("alpha: beta", 1, 8, "'beta' is not an input the alpha update can read"),
    ("beta: add(beta, sigma)", 1, 17, "'sigma' is not an input"),
    ("weight: add(grad)", 1, 17, "add takes 2 arguments"),
    ("weight: add(grad, 1, 2)", 1, 20, "add takes 2 arguments"),
    ("weight: sqrt(grad, grad)", 1, 18, "sqrt takes 1 argument"),
    ("weight: grad)", 1, 13, "expected end of line"),
    ("weight: grad grad", 1, 14, "expected end of line"),
    ("gamma: grad", 1, 1, "unknown update 'gamma'"),
    ("weight: grad\nweight: grad", 2, 1, "weight is defined twice"),
    ("alpha: grad\nweight sqrt(grad)", 2, 1, "expected 'alpha:'"),
    ("weight: sqrt grad", 1, 14, "expected '(' after sqrt"),
    ("weight: $", 1, 9, "unexpected character '$'"),
    ("weight:", 1, 8, "expected an expression"),
    ("weight: mul(grad,", 1, 18, "expected a number, an input or an op"),
    ("weight: if(lr < 1, grad, grad)", 1, 9, "op 'if' is not allowed in the weight update"),
    ("weight: epoch", 1, 9, "'epoch' is not an input"),
])
def test_parse_errors_name_line_column_and_expectation(text, line, column, words):
    with pytest.raises(ParseError) as info:
        Program.parse(text)
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert words in str(err)


def test_schedule_parse_evaluate_round_trip():
    s = Schedule.parse("if(epoch < 12, 0.05, if(lr <= 0.001, 0.001, 0.0021090908))")
    assert s(3, 0.01) == pytest.approx(0.05)
    assert s(20, 0.0005) == pytest.approx(0.001)
    assert s(20, 0.5) == pytest.approx(0.0021090908)
    assert Schedule.parse(str(s)) == s
    assert Schedule.parse("0.01")(5, 1.0) == pytest.approx(0.01)


@pytest.mark.parametrize("text, words", [
    ("", "empty schedule"),
    ("if(epoch, 1, 2)", "a comparison"),
    ("if(grad < 1, 1, 2)", "'grad' is not an input"),
    ("if(epoch < 1, 1)", "if takes 3 arguments"),
    ("0.1\n0.2", "one expression on one line"),
])
def test_schedule_errors(text, words):
    with pytest.raises(ParseError, match=words):
        Schedule.parse(text)


def test_reference_semantics_of_the_edge_cases():
    p = Program.parse("weight: div(grad, lr)")
    w, _ = reference_step(p, np.zeros(3, np.float32), np.array([1, np.inf, np.nan], np.float32), {}, 0.0)
    assert np.array_equal(w, np.zeros(3, np.float32))  # divide-no-NaN, whatever the numerator
    p = Program.parse("weight: neg(pow(grad, lr))")
    w, _ = reference_step(p, np.zeros(4, np.float32), np.array([-2, np.nan, 1, -np.inf], np.float32), {}, 3.0)
    assert w[0] == -8 and np.isnan(w[1]) and w[2] == 1 and w[3] == -np.inf
    w, _ = reference_step(p, np.zeros(2, np.float32), np.array([np.nan, -8], np.float32), {}, 0.0)
    assert np.array_equal(w, [1, 1])  # pow(x, 0) = 1 even for NaN
    p = Program.parse("weight: neg(sign(grad))")
    w, _ = reference_step(p, np.zeros(3, np.float32), np.array([np.nan, 0, -3], np.float32), {}, 1.0)
    assert np.isnan(w[0]) and w[1] == 0 and w[2] == -1
    p = Program.parse("weight: neg(min(grad, lr))")
    w, _ = reference_step(p, np.zeros(2, np.float32), np.array([np.nan, 1], np.float32), {}, np.nan)
    assert np.isnan(w).all()  # NaN-propagating min, as torch.minimum


def test_updates_apply_in_order_and_read_new_values():
    p = Program.parse("alpha: neg(grad)\nbeta: neg(alpha)\nweight: beta")
    w, s = reference_step(p, np.ones(1, np.float32), np.array([2.0], np.float32), {})
    assert s["alpha"][0] == 2 and s["beta"][0] == 2 and w[0] == -1


def test_equivalent_programs_share_a_hash():
    base = Program.parse(ADAMISH)
    commuted = Program.parse(ADAMISH.replace("mul(0.1, sub(alpha, grad))", "mul(sub(alpha, grad), 0.1)")
                             .replace("add(sqrt(beta), 1e-08)", "add(1e-08, sqrt(beta))"))
    folded = Program.parse(ADAMISH.replace("0.1", "mul(0.5, 0.2)").replace("lr", "mul(lr, 1.0)"))
    dead = Program.parse(ADAMISH + "\nsigma: add(sigma, square(grad))")
    assert base.hash == commuted.hash == folded.hash == dead.hash
    assert base.hash != Program.parse(ADAMISH.replace("0.001", "0.002")).hash


def test_canonical_form_drops_dead_and_never_changing_states():
    p = Program.parse("alpha: grad\nbeta: add(beta, alpha)\nweight: mul(sigma, grad)")
    # sigma has no update: it stays 0, so the weight update is mul(0, grad); alpha and beta are dead.
    c = p.canonical()
    assert c.alpha is None and c.beta is None and c.sigma is None
    assert str(c) == "weight: mul(0.0, grad)"
    assert Program.parse("weight: mul(grad, 0.0)").hash == p.hash
    # x*0 is not folded to 0: inf*0 is NaN.
    assert Program.parse("weight: 0.0").hash != p.hash


def test_canonical_form_is_idempotent_and_keeps_semantics():
    """The canonical program computes bit-identical trajectories from zero state."""
    rng, nrng = random.Random(11), np.random.default_rng(11)
    for _ in range(200):
        p = random_program(rng)
        c = p.canonical()
        assert c.canonical() == c
        w0 = random_inputs(nrng, 64)
        wp, sp, wc, sc = w0, {}, w0, {}
        for _step in range(3):
            grad = random_inputs(nrng, 64)
            wp, sp = reference_step(p, wp, grad, sp, 0.5)
            wc, sc = reference_step(c, wc, grad, sc, 0.5)
            assert np.array_equal(wp, wc, equal_nan=True), f"{p}\n--\n{c}"


def test_uniform_states_are_scalars():
    adam = Program.parse("alpha: mul(0.1, sub(alpha, grad))\nsigma: -1.0\n"
                         "weight: mul(lr, div(alpha, sub(1.0, pow(0.9, sigma))))")
    assert adam.uniform_states() == ("sigma",)
    assert adam.tensor_states() == ("alpha",)
    assert adam.advance_uniform({"sigma": 4.0}, 1.0) == {"sigma": 5.0}


def test_grad_reaching_weight():
    assert Program.parse(ADAMISH).reads_grad_in_weight()
    assert not Program.parse("alpha: grad\nweight: mul(lr, 0.5)").reads_grad_in_weight()
