"""`make mutants` stays meaningful: every mutation still finds its text once in the code, and
every test it names exists (a mutant that no longer applies, or that names a test no longer
there, is an error here rather than a promise quietly unchecked)."""

from __future__ import annotations

import re

import pytest

from tests.support.mutants import MUTANTS, REPO, Mutant


@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutation_applies_once_and_names_existing_tests(m: Mutant) -> None:
    assert (REPO / m.path).read_text().count(m.old) == 1, f"{m.name}: text not found once"
    assert m.old != m.new
    for test in m.tests:
        path, _, name = test.partition("::")
        source = (REPO / path).read_text()
        if name:
            assert re.search(rf"^(async )?def {re.escape(name)}\(", source, re.M), test


def test_names_are_unique() -> None:
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
