"""The suite's own set-up: tests that share an expensive fixture run on one parallel worker."""

from __future__ import annotations

import os

import pytest
from conftest import run_groups


def test_tests_sharing_a_run_carry_its_worker_group(request: pytest.FixtureRequest):
    if "PYTEST_XDIST_WORKER" not in os.environ or not request.config.getoption("loadgroup"):
        pytest.skip("only meaningful in a parallel run with --dist loadgroup (the default)")
    sharing = [(item, group) for item in request.session.items for group in run_groups(item)]
    if not sharing:
        pytest.skip("no selected test uses a shared fixture")
    # xdist sends every test whose id ends in the same @group to one worker
    ungrouped = [item.nodeid for item, group in sharing if not item.nodeid.endswith(f"@{group}")]
    assert not ungrouped, ungrouped


def test_tests_of_a_shared_run_keep_their_order_in_the_file(request: pytest.FixtureRequest):
    """The start order (conftest.start_rank) moves tests that run alone, never within a group: a group's tests run
    on one worker in collection order, and some rely on it (the deployment's kill test runs last)."""
    lines: dict[tuple[str, str], list[int]] = {}
    for item in request.session.items:
        for group in run_groups(item):
            lines.setdefault((group, item.location[0]), []).append(item.location[1])
    if not lines:
        pytest.skip("no selected test uses a shared fixture")
    for (group, path), found in lines.items():
        assert found == sorted(found), f"tests of group {group!r} in {path} run out of their order: {found}"
