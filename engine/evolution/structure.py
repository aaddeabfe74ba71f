"""What a phenotype is, structurally: its canonical identity, its shape with the constants left
out, and the edit distance between two shapes.

Evolution needs three questions answered about program texts, whatever the grammar:
- is a child the same program as its parent (``canonical_key``: re-mutation, before a child costs
  an evaluation)?
- which structural niche is it in (``structure_key``: the canonical tree with every constant
  replaced by one placeholder, so that a seed's constant-tweaked descendants share a niche)?
- how far is it from a known optimizer (``tree_distance``, ``nearest_seed``: how a discovered
  program is judged against the zoo)?

Texts are ALR programs (a ``state: expr`` line each) or DLR schedules (one expression); a text that
parses as neither (a user grammar's phenotype) falls back to its own whitespace-free spelling, so
two texts are then the same only when they are spelled the same.

The edit distance is Zhang and Shasha's (1989) ordered tree edit distance with unit costs: the
fewest node insertions, deletions and relabellings that turn one tree into the other, children
kept in order. It is exact (not the cheaper top-down distance, which cannot delete an inner node
and keep its children: ``neg(grad)`` against ``grad`` would cost the whole subtree instead of 1),
and quadratic-to-cubic in tree size, milliseconds for programs of the grammars' depths. It is a
distance between ordered trees: the operands of a commutative op are taken in the canonical order,
so a change that moves an operand across that order can cost more than the edit a person would
count (sgd's mul(lr, grad) to mul(lr, sign(grad)) is 3, the operands of the first being swapped
by the canonical order). An unordered distance would fix that, at a cost that is exponential in
general.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from codegen.ir import COMMUTATIVE_OPS, TARGETS, Call, Const, Node, Program, Schedule, Var

__all__ = ["canonical_key", "nearest_seed", "parse_phenotype", "structure_key", "tree",
           "tree_distance"]

Tree = tuple[str, tuple["Tree", ...]]  # (label, children)
_CONSTANT = "#"  # the label every constant gets when constants are left out


def parse_phenotype(text: str) -> Program | Schedule | None:
    """The program (a text with ``state:`` lines) or schedule ``text`` spells; None if neither."""
    try:
        return Program.parse(text) if ":" in text else Schedule.parse(text)
    except ValueError:
        return None


def canonical_key(text: str) -> str:
    """Equal for texts that are the same program by construction (the IR's canonical hash)."""
    parsed = parse_phenotype(text)
    return parsed.hash if parsed is not None else "text:" + "".join(text.split())


def structure_key(text: str) -> str:
    """Equal for programs whose canonical trees differ at most in their constants' values."""
    shape = _label_tree(tree(text, constants=False))
    return hashlib.sha256(shape.encode()).hexdigest()[:20]


def tree(text: str, *, constants: bool = False) -> Tree:
    """The canonical tree of ``text``: a ``program`` root over one ``alpha:``.. ``weight:`` node
    per live update (a schedule is its expression alone). With ``constants=False`` every constant
    is one label, and commutative operands are put in an order that does not depend on values."""
    parsed = parse_phenotype(text)
    if parsed is None:
        return ("text:" + "".join(text.split()), ())
    if isinstance(parsed, Schedule):
        return _node_tree(parsed.canonical().expr, constants)
    canonical = parsed.canonical()
    return ("program", tuple((f"{t}:", (_node_tree(getattr(canonical, t), constants),))
                             for t in TARGETS if getattr(canonical, t) is not None))


def _node_tree(node: Node, constants: bool) -> Tree:
    if isinstance(node, Const):
        return (str(node) if constants else _CONSTANT, ())
    if isinstance(node, Var):
        return (node.name, ())
    assert isinstance(node, Call)
    kids = tuple(_node_tree(a, constants) for a in node.args)
    if node.op in COMMUTATIVE_OPS and not constants:
        # The IR orders these operands by their text, constants' values included: re-order by
        # shape so that changing a constant cannot swap operands and look like a new structure.
        kids = tuple(sorted(kids, key=_label_tree))
    return (node.op, kids)


def _label_tree(t: Tree) -> str:
    label, kids = t
    return f"{label}({','.join(_label_tree(k) for k in kids)})" if kids else label


def tree_distance(a: str | Tree, b: str | Tree, *, constants: bool = False) -> int:
    """Zhang-Shasha edit distance (unit costs) between two phenotypes' canonical trees (or two
    trees). ``constants=True`` also counts a changed constant's value as a relabelling."""
    ta = tree(a, constants=constants) if isinstance(a, str) else a
    tb = tree(b, constants=constants) if isinstance(b, str) else b
    labels_a, left_a = _postorder(ta)
    labels_b, left_b = _postorder(tb)
    n, m = len(labels_a), len(labels_b)
    between = [[0] * m for _ in range(n)]  # distance between the subtrees rooted at i and j
    for i in _keyroots(left_a):
        for j in _keyroots(left_b):
            li, lj = left_a[i], left_b[j]
            rows, cols = i - li + 2, j - lj + 2
            forest = [[0] * cols for _ in range(rows)]
            for x in range(1, rows):
                forest[x][0] = forest[x - 1][0] + 1
            for y in range(1, cols):
                forest[0][y] = forest[0][y - 1] + 1
            for x in range(1, rows):
                i1 = li + x - 1
                for y in range(1, cols):
                    j1 = lj + y - 1
                    drop, add = forest[x - 1][y] + 1, forest[x][y - 1] + 1
                    if left_a[i1] == li and left_b[j1] == lj:
                        swap = forest[x - 1][y - 1] + (labels_a[i1] != labels_b[j1])
                        forest[x][y] = between[i1][j1] = min(drop, add, swap)
                    else:
                        whole = forest[left_a[i1] - li][left_b[j1] - lj] + between[i1][j1]
                        forest[x][y] = min(drop, add, whole)
    return between[n - 1][m - 1]


def _postorder(t: Tree) -> tuple[list[str], list[int]]:
    """Labels in post-order, and for each node the post-order index of its leftmost leaf."""
    labels: list[str] = []
    leftmost: list[int] = []

    def visit(node: Tree) -> int:
        label, kids = node
        first = None
        for kid in kids:
            leaf = visit(kid)
            first = leaf if first is None else first
        labels.append(label)
        leftmost.append(len(labels) - 1 if first is None else first)
        return leftmost[-1]

    visit(t)
    return labels, leftmost


def _keyroots(leftmost: list[int]) -> list[int]:
    """The root and every node that has a left sibling: the highest node per leftmost leaf."""
    top: dict[int, int] = {}
    for i, leaf in enumerate(leftmost):
        top[leaf] = i
    return sorted(top.values())


def nearest_seed(text: str, seeds: Mapping[str, str], *,
                 constants: bool = False) -> tuple[str, int]:
    """(name, distance) of the seed structurally closest to ``text``; the first on ties."""
    if not seeds:
        raise ValueError("nearest_seed needs at least one seed program to compare with")
    target = tree(text, constants=constants)
    best: tuple[str, int] | None = None
    for name, seed in seeds.items():
        distance = tree_distance(target, tree(seed, constants=constants))
        if best is None or distance < best[1]:
            best = (name, distance)
    return best
