"""The IR: text round trip, parse errors, reference semantics, canonical form and hash."""

from __future__ import annotations

import random
import sys
import warnings

import numpy as np
import pytest

from codegen.ir import ParseError, Program, Schedule, reference_step
from codegen.parse import MAX_DEPTH
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
    assert adam.stepper().step({"sigma": 4.0}, 1.0) == {"sigma": 5.0}


def test_grad_reaching_weight():
    assert Program.parse(ADAMISH).reads_grad_in_weight()
    assert not Program.parse("alpha: grad\nweight: mul(lr, 0.5)").reads_grad_in_weight()


# -- the one-line form, constants, depth: text that must parse, or fail with a ParseError ----------

def one_line(program: Program) -> str:
    """The form reports print: the lines joined by '; '."""
    return "; ".join(str(program).splitlines())


def test_the_one_line_form_is_the_same_program():
    rng = random.Random(15)
    for _ in range(300):
        p = random_program(rng)
        assert Program.parse(one_line(p)) == Program.parse(str(p)) == p
    assert Program.parse("alpha: mul(0.1, sub(alpha, grad)); weight: mul(lr, alpha);  # a; b\n"
                         "beta: grad;;") == Program.parse("alpha: mul(0.1, sub(alpha, grad))\n"
                                                          "beta: grad\nweight: mul(lr, alpha)")


@pytest.mark.parametrize("text, column, words", [
    ("alpha: grad; gamma: grad", 14, "unknown update 'gamma'"),
    ("alpha: grad; weight: grad; alpha: grad", 28, "alpha is defined twice"),
    ("alpha: grad;  3", 15, "at the start of a statement"),
    ("alpha: grad; weight:; beta: grad", 21, "expected an expression after 'weight:'"),
    ("alpha: grad; weight: mul(grad; beta: grad)", 30, "expected ',', found ';'"),
    ("alpha: grad grad; weight: alpha", 13, "expected end of line or ';', found 'grad'"),
    ("alpha: grad; weight: mul(lr, beta2)", 30, "'beta2' is not an input"),
])
def test_errors_in_the_one_line_form_name_the_column(text, column, words):
    with pytest.raises(ParseError) as info:
        Program.parse(text)
    assert (info.value.line, info.value.column) == (1, column), str(info.value)
    assert words in str(info.value)


@pytest.mark.parametrize("text, column", [
    ("weight: 1e400", 9),
    ("weight: mul(grad, -1e400)", 19),
    ("weight: mul(grad, 3.5e38)", 19),  # finite in float64, inf in float32
    ("alpha: grad; weight: " + "7" * 5000, 22),
])
def test_a_constant_that_does_not_fit_float32_is_a_parse_error(text, column):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning must not escape either
        with pytest.raises(ParseError, match="does not fit a float32") as info:
            Program.parse(text)
    assert (info.value.line, info.value.column) == (1, column)
    with pytest.raises(ParseError, match="does not fit a float32"):
        Schedule.parse(text.rpartition(" ")[2].rstrip(")"))


def test_inf_nan_and_the_largest_float32_stay_constants():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Program.parse("weight: inf").weight.value == np.inf
        assert Program.parse("weight: -inf").weight.value == -np.inf
        assert np.isnan(Program.parse("weight: nan").weight.value)
        # Just above the largest float32, a value still rounds down to it.
        largest = float(np.finfo(np.float32).max)
        assert Program.parse("weight: 3.40282350e38").weight.value == largest
        assert Program.parse("weight: -3.4028235e38").weight.value == -largest


@pytest.mark.parametrize("text, column", [
    ("weight: mul(\u0661, grad)", 13),        # ARABIC-INDIC DIGIT ONE, which float() reads as 1
    ("weight: mul(1\u0660, grad)", 14),       # an ASCII digit, then an Arabic-Indic zero
    ("weight: mul(\uff12.5, grad)", 13),      # FULLWIDTH DIGIT TWO
])
def test_non_ascii_digits_are_a_parse_error(text, column):
    with pytest.raises(ParseError, match="non-ASCII digit") as info:
        Program.parse(text)
    assert (info.value.line, info.value.column) == (1, column)
    with pytest.raises(ParseError, match="non-ASCII digit"):
        Schedule.parse("if(epoch < \u0665, 0.1, 0.01)")


def nested(levels: int, leaf: str = "grad") -> str:
    return "sqrt(" * levels + leaf + ")" * levels


def test_text_nested_beyond_the_limit_is_a_parse_error_not_a_recursion_error():
    for levels in (MAX_DEPTH, 500, 5000):
        with pytest.raises(ParseError, match=f"deeper than {MAX_DEPTH} levels") as info:
            Program.parse("weight: " + nested(levels))
        # The first token past the limit: the leaf, at 1 + levels * 5 + len("weight: ").
        assert info.value.column == 9 + MAX_DEPTH * 5
        with pytest.raises(ParseError, match=f"deeper than {MAX_DEPTH} levels"):
            Schedule.parse(nested(levels, "lr"))
    deep_if = "lr"
    for _ in range(500):
        deep_if = f"if(epoch < 3, {deep_if}, 0.1)"
    with pytest.raises(ParseError, match=f"deeper than {MAX_DEPTH} levels"):
        Schedule.parse(deep_if)


def _frames() -> int:
    frame, n = sys._getframe(), 0
    while frame is not None:
        frame, n = frame.f_back, n + 1
    return n


# Every pass over a tree at the depth limit must fit in this many frames, leaving the rest of
# Python's default limit (1000) to its caller: a Ray worker, pytest, the engine.
HEADROOM = 600


@pytest.mark.parametrize("make", [
    lambda: Program.parse("alpha: " + nested(MAX_DEPTH - 1) + "; weight: " + nested(MAX_DEPTH - 1)),
    lambda: Program.parse("weight: " + "add(1.5, " * (MAX_DEPTH - 1) + "grad" + ")" * (MAX_DEPTH - 1)),
    lambda: Schedule.parse("if(epoch < 3, " * (MAX_DEPTH - 2) + "lr" + ", 0.5)" * (MAX_DEPTH - 2)),
    # Nested through the comparison, each if is two levels (the if, then its comparison).
    lambda: Schedule.parse("if(" * ((MAX_DEPTH - 1) // 2) + "lr" + " < 3, lr, 0.5)"
                           * ((MAX_DEPTH - 1) // 2)),
], ids=["sqrt", "add", "if", "if-condition"])
def test_every_pass_over_text_at_the_depth_limit_has_room_to_spare(make):
    import copy
    import pickle

    from codegen import backends, cache
    from codegen.ir import depth

    program = make()
    expr = program.expr if isinstance(program, Schedule) else program.weight
    assert depth(expr) in (MAX_DEPTH, MAX_DEPTH - 1)
    passes = [lambda: type(program).parse(str(program)) == program, lambda: hash(expr),
              lambda: program.canonical(), lambda: program.hash, lambda: repr(program),
              lambda: pickle.loads(pickle.dumps(program)), lambda: copy.deepcopy(program)]
    if isinstance(program, Schedule):
        passes.append(lambda: program(3, 0.1))
    else:
        passes += [lambda: reference_step(program, np.ones(2, np.float32), np.ones(2, np.float32)),
                   lambda: program.reads_grad_in_weight(), lambda: program.tensor_states()]
        passes += [lambda b=b: cache.source(program, b) for b in backends.BACKENDS]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_frames() + HEADROOM)
    try:
        for run in passes:
            run()
    finally:
        sys.setrecursionlimit(limit)
