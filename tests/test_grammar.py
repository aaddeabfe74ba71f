"""The BNF reader: the two shipped grammars, the depth table, every kind of bad grammar, derive()."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import engine.evolution.grammar
from engine.evolution.derivation import DerivationError, derive
from engine.evolution.grammar import (ALR_GRAMMAR, DLR_GRAMMAR, GrammarError, load_grammar,
                                   parse_grammar)


def terminals(grammar, name: str) -> list[str]:
    """The alternatives of an all-terminal rule, as text."""
    return [grammar.render(p) for p in grammar.rules[grammar.index(name)]]


def f32(values) -> list[str]:
    return [str(np.float32(v)) for v in values]


# -- the shipped grammars ---------------------------------------------------------------------

def test_alr_constants_follow_the_formula():
    grammar = load_grammar(ALR_GRAMMAR)
    expected = 1.0 / (1.0 + np.exp(-np.linspace(-10, 10, 100)))
    expected[0], expected[-1] = 0.0, 1.0
    for f in "absw":
        assert terminals(grammar, f"const_{f}") == f32(expected)


def test_dlr_constants_follow_the_formula():
    grammar = load_grammar(DLR_GRAMMAR)
    assert terminals(grammar, "lr_const") == f32(np.linspace(0.0001, 0.1, 100))
    assert terminals(grammar, "epoch_const") == [str(i) for i in range(100)]
    assert terminals(grammar, "cmp") == ["<", "<=", ">", ">="]
    assert terminals(grammar, "sched") == ["if(<cond>, <sched>, <sched>)", "<lr_const>"]
    assert terminals(grammar, "cond") == ["lr <cmp> <lr_const>", "epoch <cmp> <epoch_const>"]


@pytest.mark.parametrize("f, inputs", [
    ("a", ["alpha", "grad", "grad"]),
    ("b", ["alpha", "beta", "grad", "grad", "grad"]),
    ("s", ["alpha", "beta", "sigma", "grad", "grad", "grad", "grad"]),
    ("w", ["alpha", "beta", "sigma", "grad", "grad", "grad", "grad"]),
])
def test_alr_rules_per_function(f, inputs):
    grammar = load_grammar(ALR_GRAMMAR)
    e = f"<expr_{f}>"
    assert terminals(grammar, f"expr_{f}") == [f"<fun_{f}>", f"<term_{f}>"]
    assert terminals(grammar, f"term_{f}") == [f"<const_{f}>"] + inputs
    ops = [f"neg({e})", f"sub({e}, {e})", f"add({e}, {e})", f"mul({e}, {e})",
           f"pow({e}, {e})", f"square({e})", f"div({e}, {e})", f"add({e}, {e})",
           f"sqrt({e})", f"<const_{f}>"]
    assert terminals(grammar, f"fun_{f}") == ops


def test_alr_start_rule_writes_four_lines():
    grammar = load_grammar(ALR_GRAMMAR)
    assert grammar.names[0] == "start"
    (start,) = grammar.rules[0]
    assert grammar.render(start) == ("alpha: <expr_a>\nbeta: <expr_b>\nsigma: <expr_s>\n"
                                     "weight: <expr_w>")


def test_shortest_derivation_table():
    grammar = load_grammar(ALR_GRAMMAR)
    depth = dict(zip(grammar.names, grammar.shortest))
    # const/term end at once; fun -> const; expr -> term -> alpha; start -> expr -> term.
    assert depth["const_a"] == depth["term_a"] == 1
    assert depth["fun_a"] == depth["expr_a"] == 2
    assert depth["start"] == 3
    fun = grammar.rules[grammar.index("fun_a")]
    assert [p.shortest for p in fun] == [2] * 9 + [1]
    assert all(p.height == float("inf") for p in fun[:9])
    assert grammar.fitting(grammar.index("fun_a"), 1) == (9,)  # only <const_a> fits
    assert grammar.fitting(grammar.index("fun_a"), 0) == ()
    dlr = load_grammar(DLR_GRAMMAR)
    assert dict(zip(dlr.names, dlr.shortest)) == {"sched": 2, "cond": 2, "cmp": 1,
                                                  "lr_const": 1, "epoch_const": 1}


def test_indirect_recursion_has_finite_shortest_depth():
    grammar = parse_grammar("<s> ::= <a>\n<a> ::= f(<b>) | x\n<b> ::= g(<a>, <a>)\n")
    assert grammar.shortest == (2, 1, 2)  # s -> a -> x; b -> g(a, a) -> g(x, x)
    assert grammar.rules[1][0].height == float("inf")


def test_escapes_comments_and_whitespace():
    grammar = parse_grammar("<s> ::= a\\nb | x\\|y | p\\#q |  sp ace  # comment | not an alt\n"
                            "# whole-line comment\n\n")
    assert terminals(grammar, "s") == ["a\nb", "x|y", "p#q", "sp ace"]


def test_lonely_angle_bracket_is_a_terminal():
    grammar = parse_grammar("<s> ::= a < b | a <= <t>\n<t> ::= z\n")
    assert terminals(grammar, "s") == ["a < b", "a <= <t>"]


# -- bad grammars: each kind its own message and line -----------------------------------------

BAD = [
    ("not-a-rule", "<s> ::= a\nthis is prose\n", 2, "expected a rule '<name> ::= alt | alt'"),
    ("two-rules", "<s> ::= a <t> ::= b\n", 1, "more than one '::='"),
    ("bad-lhs", "<s> ::= <t>\nt ::= b\n", 2, "the left side 't' must be one non-terminal"),
    ("bad-lhs", "<s> <t> ::= b\n", 1, "must be one non-terminal"),
    ("duplicate-rule", "<s> ::= <t>\n<t> ::= a\n<t> ::= b\n", 3,
     "<t> is already defined on line 2"),
    ("empty-alternative", "<s> ::= a | | b\n", 1, "alternative 2 of <s> is empty"),
    ("empty-alternative", "<s> ::= a |\n", 1, "alternative 2 of <s> is empty"),
    ("empty-alternative", "<s> ::=\n", 1, "alternative 1 of <s> is empty"),
    ("bad-escape", "<s> ::= a\\tb\n", 1, "unknown escape '\\\\t' at column 10"),
    ("undefined", "<s> ::= <t>\n<t> ::= f(<u>) | x\n", 2, "<u> is used but never defined"),
    ("undefined", "<s> ::= <Term>\n<term> ::= x\n", 1, "did you mean <term>?"),
    ("unused", "<s> ::= a\n<t> ::= b\n", 2, "<t> is defined but no other rule uses it"),
    ("unused", "<s> ::= a\n<t> ::= b | c<t>\n", 2, "<t> is defined but no other rule uses it"),
    ("unreachable", "<s> ::= a\n<t> ::= <u>\n<u> ::= b | <t>\n", 2,
     "<t> cannot be reached from the start symbol <s>"),
    ("non-terminating", "<s> ::= <t> | <u>\n<t> ::= f(<t>)\n<u> ::= x\n", 2,
     "<t> has no terminating derivation"),
    ("non-terminating", "<s> ::= g(<s>, <t>)\n<t> ::= x\n", 1,
     "<s> has no terminating derivation"),
    ("empty", "# only a comment\n\n", None, "contains no rules, so there is no start symbol"),
    ("bad-float", "<s> ::= f(<c>)\n<c> ::= %float | 1.0\n", 2, "<c> mixes %float with other"),
]


@pytest.mark.parametrize("kind, text, line, message", BAD, ids=[b[0] for b in BAD])
def test_bad_grammar_is_refused_with_its_own_message(tmp_path, kind, text, line, message):
    path = tmp_path / "bad.bnf"
    path.write_text(text)
    with pytest.raises(GrammarError) as caught:
        load_grammar(path)
    err = caught.value
    assert (err.kind, err.line) == (kind, line)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(err).startswith(where)
    assert message in str(err)


def test_every_kind_has_a_distinct_message(tmp_path):
    """Every kind of error the loader raises is exercised above, and the message a user reads
    tells it from every other kind: no case's text holds another kind's expected words."""
    cases = list(BAD) + [("missing", None, None, "no such grammar file"),
                         ("not-text", b"\x89PNG\r\n\x1a\n\xff\xfe", None,
                          "is not a UTF-8 text file")]
    raised = set(re.findall(r'GrammarError\([^,]+, [^,]+, "([a-z-]+)"',
                            Path(engine.evolution.grammar.__file__).read_text()))
    assert raised and raised == {case[0] for case in cases}
    texts = []
    for n, (kind, text, _, _) in enumerate(cases):
        path = tmp_path / f"g{n}.bnf"
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        with pytest.raises(GrammarError) as caught:
            load_grammar(path)
        assert caught.value.kind == kind
        texts.append((kind, str(caught.value)))
    for kind, message in texts:
        for other, _, _, words in cases:
            if other != kind:
                assert words not in message, (kind, other, message)


def test_binary_and_missing_files(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(GrammarError, match="is not a UTF-8 text file") as caught:
        load_grammar(binary)
    assert caught.value.kind == "not-text"
    with pytest.raises(GrammarError, match="no such grammar file") as caught:
        load_grammar(tmp_path / "nope.bnf")
    assert caught.value.kind == "missing"
    python = tmp_path / "not_a_grammar.py"
    python.write_text("import os\nprint(os.getcwd())\n")
    with pytest.raises(GrammarError, match=r"not_a_grammar.py:1: expected a rule"):
        load_grammar(python)


def test_grammar_error_is_a_value_error():
    assert issubclass(GrammarError, ValueError)


# -- derive: text back to a derivation --------------------------------------------------------

def test_derive_dlr_ignores_whitespace_and_picks_the_shallowest():
    grammar = load_grammar(DLR_GRAMMAR)
    tree = derive(grammar, "if(epoch<12,0.0011090909,\n  if(lr >= 1e-04, 0.1, 0.002118182))")
    assert tree.depth == 4  # sched, sched, sched, lr_const
    assert tree.nt == grammar.index("sched") and tree.choice == 0


def test_derive_reports_where_it_got_stuck():
    grammar = load_grammar(DLR_GRAMMAR)
    with pytest.raises(DerivationError) as caught:
        derive(grammar, "if(epoch < 12, 0.05, 0.1)")  # 0.05 is not one of the constants
    message = str(caught.value)
    assert "line 1, column 16" in message and "found '0.05, 0.1)'" in message
    with pytest.raises(DerivationError, match="line 3, column 12 expected one of 'weight:'; found the end"):
        derive(load_grammar(ALR_GRAMMAR), "alpha: grad\nbeta: 0.0\nsigma: grad\n")
