"""Screening and fingerprints: broken programs caught in milliseconds, equivalent ones merged."""

import random
import time
import warnings

import numpy as np

from codegen.ir import Program
from engine.fitness.screening import (FINGERPRINT_VERSION, _significant, fingerprint, probe_updates,
                              screen)

ADES = ("alpha: mul(0.91078, add(alpha, mul(add(alpha, 0.0891), add(alpha, grad))))\n"
        "weight: neg(alpha)")


def test_good_programs_pass():
    assert screen(Program.parse(ADES)) is None
    assert screen(Program.parse("weight: mul(0.01, grad)")) is None


def test_broken_programs_are_screened_fast(capsys):
    cases = {
        "weight: mul(0.5, lr)": "does not depend on grad",
        "alpha: -1.0\nweight: mul(alpha, 0.001)": "does not depend on grad",
        "weight: div(grad, 0.0)": "does not depend on grad",  # folds to 0
        "weight: log(grad)": "NaN or inf",
        "weight: div(1.0, sub(grad, grad))": "never changes",
        "weight: mul(sqrt(grad), 0.1)": "NaN or inf",
    }
    for text, reason in cases.items():
        start = time.perf_counter()
        verdict = screen(Program.parse(text))
        elapsed = time.perf_counter() - start
        assert verdict is not None and reason in verdict, (text, verdict)
        with capsys.disabled():
            print(f"\n  screened in {elapsed * 1e3:.1f} ms: {text!r}", end="")


def test_fingerprint_merges_equivalent_programs_and_separates_others():
    a = Program.parse("weight: mul(0.01, add(grad, grad))")
    b = Program.parse("weight: mul(0.02, grad)")
    c = Program.parse("weight: mul(0.03, grad)")
    fa, fb, fc = (fingerprint(p) for p in (a, b, c))
    assert fa == fb
    assert fa != fc


def fingerprints(*texts: str) -> list[str]:
    return [fingerprint(Program.parse(text)) for text in texts]


def test_a_warm_up_program_that_stands_still_on_step_one_passes():
    """sigma counts the steps (sigma <- sigma + 1), so the weight's factor is 0 on step 1 only:
    "the weight never changes" must mean at no step, not at some step."""
    program = Program.parse("sigma: -1.0\nweight: mul(sub(sigma, 1.0), grad)")
    updates = probe_updates(program)
    assert not updates[0].any() and all(u.any() for u in updates[1:])  # what the test is about
    assert screen(program, updates) is None


def test_a_program_that_goes_nan_at_step_three_is_screened_at_step_three():
    """alpha counts the steps; sqrt(2.5 - alpha) is finite on steps 1 and 2, NaN from step 3."""
    program = Program.parse("alpha: -1.0\nweight: mul(grad, sqrt(sub(2.5, alpha)))")
    updates = probe_updates(program)
    assert [bool(np.isfinite(u).all()) for u in updates[:3]] == [True, True, False]
    verdict = screen(program, updates)
    assert verdict is not None and verdict.endswith("NaN or inf weight update on probe inputs "
                                                    "at step 3")


def test_fingerprint_merges_float32_neighbours_and_separates_a_one_percent_change():
    """mul(0.1, mul(0.1, grad)) and mul(0.01, grad) are the same formula; in float32 their
    updates differ (3.7e-9 apart), and an earlier fingerprint that rounded float32 results told
    them apart. A 1% change of the constant is another optimizer."""
    near, same, other = fingerprints("weight: mul(0.1, mul(0.1, grad))", "weight: mul(0.01, grad)",
                                     "weight: mul(0.0101, grad)")
    a, b = (probe_updates(Program.parse(t)) for t in ("weight: mul(0.1, mul(0.1, grad))",
                                                      "weight: mul(0.01, grad)"))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))  # not a bit-identical pair
    assert near == same
    assert other != same


def test_fingerprint_merges_reordered_sums_of_grammar_constants():
    """The promise beyond one pair: sums of the ALR grammar's constants, reassociated, collide
    (float32 rounds them differently); a change in the fifth significant digit never does."""
    ladder = [float(np.float32(1 / (1 + np.exp(-x)))) for x in np.linspace(-10, 10, 100)[1:-1]]
    rng = random.Random(11)
    for _ in range(100):
        a, b, c = (f"mul({rng.choice(ladder)}, grad)" for _ in range(3))
        one, two = fingerprints(f"weight: add({a}, add({b}, {c}))",
                                f"weight: add(add({c}, {a}), {b})")
        assert one == two, (a, b, c)
        k = rng.choice(ladder)
        base, nudged = fingerprints(f"weight: mul({k}, grad)",
                                    f"weight: mul({np.float32(k * (1 + 3e-5))}, grad)")
        assert base != nudged, k


def test_fingerprint_separates_what_float32_rounding_changes():
    """(grad + 1) - 1 is grad in exact arithmetic but loses most digits of a small grad in
    float32, where the kernels run: another optimizer."""
    exact, lossy = fingerprints("weight: mul(0.01, grad)",
                                "weight: mul(0.01, sub(add(grad, 1.0), 1.0))")
    assert exact != lossy


def test_fingerprint_names_its_version():
    """Stores keep fingerprints: one of an earlier scheme must never match one of this scheme."""
    (found,) = fingerprints("weight: mul(0.01, grad)")
    assert found.startswith(f"v{FINGERPRINT_VERSION}-") and FINGERPRINT_VERSION >= 2


def test_rounding_gives_one_representation_per_value_across_the_float64_range():
    """Integers (kind, mantissa, exponent), not floats: 9.9999996 rounds to the digits of 10.0,
    and a subnormal or a 1e308 is rounded without overflowing the scale (no warning)."""
    values = np.array([9.9999996, 10.0, -0.0, 0.0, 5e-324, 1.2345678e-310, 1.7976931348623157e308,
                       np.inf, -np.inf, np.nan, 123456.49])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kind, mantissa, exponent = _significant(values, 6)
    assert list(zip(kind.tolist(), mantissa.tolist(), exponent.tolist())) == [
        (1, 100000, 1), (1, 100000, 1), (0, 0, 0), (0, 0, 0), (1, 494066, -324),
        (1, 123457, -310), (1, 179769, 308), (2, 0, 0), (3, 0, 0), (4, 0, 0), (1, 123456, 5)]
