"""`make test` collects every test folder in one pytest session, and the folders are not packages:
two test modules with one basename make collection fail ("import file mismatch"), which a run of
one folder never shows (it happened once: tests/unit and tests/integration both had a
test_conformance.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_basename() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], names.most_common(3)
