"""The suite passes on any CPU: no test holds a float to a recorded constant bit for bit.

CPU kernels (AVX-512, AVX2, the scalar fallback, one thread or many) round differently, so a float compared
with ``==`` against a literal passes only where it was recorded. This lint reads every test file and fails on an
``assert`` that compares with ``==``/``!=`` a float literal or a name bound to float literals
(``recorded = [(0.1, ...)]``; ``for kwargs, values in recorded``; a name bound in a function counts in that
function), and on a float constant passed to an exact-equality helper (``torch.equal``, ``np.array_equal``,
``np.testing.assert_array_equal``/``assert_equal``). Comparisons with int literals or ``pytest.approx`` are not
flagged. A comparison that is exact by construction (a value passed through or selected, never computed) says
so with an ``# exact: <reason>`` comment on its line.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent
EQUALITY_CALLS = {"equal", "array_equal", "assert_array_equal", "assert_equal"}


def _has_float(node: ast.AST, tainted: set[str]) -> bool:
    """True if ``node`` is, or holds in a literal container, a float literal or a name bound to float literals."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, float) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _has_float(node.operand, tainted)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_has_float(e, tainted) for e in node.elts)
    if isinstance(node, ast.Dict):
        return any(_has_float(e, tainted) for e in node.values if e is not None)
    if isinstance(node, ast.Name):
        return node.id in tainted
    if isinstance(node, ast.Subscript):
        return _has_float(node.value, tainted)
    return False


def _names(target: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]


def _tainted_names(nodes: list[ast.AST], tainted: set[str]) -> set[str]:
    """``tainted`` plus the names the statements ``nodes`` bind to float literals (directly or in literal
    containers), and loop variables over them."""
    tainted = set(tainted)
    changed = True
    while changed:  # a loop over a tainted name taints its targets; repeat until nothing new
        changed = False
        for node in (n for top in nodes for n in ast.walk(top)):
            if isinstance(node, ast.Assign) and _has_float(node.value, tainted):
                new = {n for t in node.targets for n in _names(t)} - tainted
            elif isinstance(node, (ast.For, ast.comprehension)) and _has_float(node.iter, tainted):
                new = set(_names(node.target)) - tainted
            else:
                continue
            tainted |= new
            changed |= bool(new)
    return tainted


def _exempt(node: ast.AST) -> bool:
    """An operand that makes an equality harmless: ``pytest.approx(...)``, or a literal int, string, bool or None."""
    if isinstance(node, ast.Call):
        func = node.func
        return (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == "approx"
    if isinstance(node, ast.UnaryOp):
        return _exempt(node.operand)
    return isinstance(node, ast.Constant) and not isinstance(node.value, float)


def _offences(nodes: list[ast.AST], tainted: set[str], lines: list[str]) -> list[int]:
    """Lines in the statements ``nodes`` (not in nested functions) that compare float constants exactly."""
    asserted = {id(n) for top in nodes for stmt in ast.walk(top) if isinstance(stmt, ast.Assert)
                for n in ast.walk(stmt.test)}
    found = []
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Compare) and id(node) in asserted:
            operands = [node.left, *node.comparators]
            hit = any(isinstance(op, (ast.Eq, ast.NotEq)) and not (_exempt(a) or _exempt(b))
                      and (_has_float(a, tainted) or _has_float(b, tainted))
                      for op, a, b in zip(node.ops, operands, operands[1:]))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            hit = name in EQUALITY_CALLS and any(  # a constant, or one wrapped: torch.tensor([0.5]), np.full(3, 0.5)
                _has_float(a, tainted) or isinstance(a, ast.Call) and any(_has_float(x, tainted) for x in a.args)
                for a in node.args)
        else:
            continue
        if hit and "# exact:" not in lines[node.lineno - 1]:
            found.append(node.lineno)
    return found


def float_equalities(source: str) -> list[int]:
    """Line numbers in ``source`` where a value is held to float constants with exact equality. Names bound at
    module level count everywhere; names bound in a function count in that function."""
    tree = ast.parse(source)
    lines = source.splitlines()
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    inner = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    module = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    module_tainted = _tainted_names(module, set())
    found = _offences(module, module_tainted, lines)
    for f in functions:
        if id(f) in inner:  # nested functions are walked with their enclosing one
            continue
        found += _offences([f], _tainted_names([f], module_tainted), lines)
    return sorted(set(found))


def test_no_exact_float_equality_in_the_suite():
    offences = [f"{path.name}:{line}: {path.read_text().splitlines()[line - 1].strip()}"
                for path in sorted(TESTS.glob("*.py")) for line in float_equalities(path.read_text())]
    assert not offences, ("exact float equality against constants (use pytest.approx / assert_close with a stated "
                          "tolerance, or compare two runs on this machine):\n" + "\n".join(offences))


def test_the_lint_catches_planted_comparisons():
    """Each planted line is caught; ints, approx, same-run comparisons, marked exact lines and names bound to
    floats in another function are not."""
    planted = textwrap.dedent("""
        import torch, pytest
        import numpy as np
        EXPECTED = 0.1234
        recorded = [(dict(a=1), (22.5, -0.09))]
        def test_caught():
            assert float(x) == -0.0994
            assert (a, b, c) == (22.55, 1, 2)
            assert y != 1e-3
            assert out.sum().item() == EXPECTED
            for kwargs, values in recorded:
                assert (float(z), 1) == values
                assert values[1] == w
            assert torch.equal(t, torch.tensor([0.5, 1.5]))
            np.testing.assert_array_equal(u, [0.25])
            assert np.array_equal(np.full(3, 0.5), u)
        def test_not_caught():
            assert n == 3 and (m, 2) == (4, -1)
            assert x == pytest.approx(0.1, rel=1e-12)
            assert torch.equal(first, second)
            assert torch.equal(est(gerf_a=0.0)(q), other)
            assert x < 0.5 and y >= 1.0
            assert item.scale == 0.5  # exact: the scale passed in, never computed
            if norm == 12.0:
                pass
            assert EXPECTED != pytest.approx(0.2) and recorded[0][1][0] == 22
            assert local == other  # bound to floats in another function only
        def helper():
            local = [0.5]
    """)
    lines = planted.splitlines()
    caught = {lines[i - 1].strip() for i in float_equalities(planted)}
    expected = {line.strip() for line in lines[6:17] if "assert" in line and "for" not in line}
    assert len(expected) == 9 and caught == expected
