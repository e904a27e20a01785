"""Roles sharing a host's cores through the ledger: alone a role takes them all, busy roles split
them, a role's threads change only when its share does."""

from __future__ import annotations

import pytest

from common.cores import CoreShare, create_ledger


def test_busy_roles_split_the_cores_and_an_idle_one_leaves_them(tmp_path):
    ledger = tmp_path / "cores"
    create_ledger(ledger, 3)
    calls: dict[str, list[int]] = {"enc": [], "lang": []}
    enc = CoreShare(ledger, 0, 4, calls["enc"].append)
    lang = CoreShare.from_spec(f"{ledger},2,4", calls["lang"].append)
    with lang.forward() as n:
        assert n == 4  # alone: every core
        with enc.forward() as m:
            assert m == 1  # the language role holds all four: one at least
    with enc.forward() as m:
        assert m == 4
        with lang.forward() as n:
            assert n == 1
    with lang.forward() as n, enc.forward() as m:
        assert (n, m) == (4, 1)
    assert enc.held_by_others() == 0 and lang.held_by_others() == 0  # all given back
    assert calls == {"enc": [1, 4, 1], "lang": [4, 1, 4]}  # set only when the share changes


def test_bad_specs_are_refused(tmp_path):
    ledger = tmp_path / "cores"
    create_ledger(ledger, 2)
    for spec in (f"{ledger},2,4", f"{ledger},0,0", f"{ledger}", f"{tmp_path}/none,0,2"):
        with pytest.raises(ValueError, match="--share-cores"):
            CoreShare.from_spec(spec, lambda n: None)


def test_roles_spin_briefly_unless_the_environment_says_otherwise():
    from services.up import omp_environment

    assert omp_environment("encoder", "share", {}) == {"GOMP_SPINCOUNT": "100000"}
    assert omp_environment("encoder", "split", {"PATH": "/bin"}) == {"GOMP_SPINCOUNT": "100000"}
    assert omp_environment("language", "share", {}) == {"GOMP_SPINCOUNT": "100000"}
    assert omp_environment("gateway", "share", {}) == {}
    assert omp_environment("encoder", "none", {}) == {}  # torch's defaults, as the policy says
    assert omp_environment("encoder", "share", {"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert omp_environment("encoder", "share", {"GOMP_SPINCOUNT": "10000"}) == {}
    assert omp_environment("language", "split", {"OMP_WAIT_POLICY": "PASSIVE"}) == {}
    assert omp_environment("language", "none", {}) == {}
