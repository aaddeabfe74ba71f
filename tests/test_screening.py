"""Screening and fingerprints: broken programs caught in milliseconds, equivalent ones merged."""

import time

from codegen.ir import Program
from engine.screening import fingerprint, probe_updates, screen

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
    fa, fb, fc = (fingerprint(probe_updates(p)) for p in (a, b, c))
    assert fa == fb
    assert fa != fc
