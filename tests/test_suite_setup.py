"""The suite's own set-up: tests that share an expensive fixture run on one parallel worker."""

from __future__ import annotations

import os

import pytest
from conftest import SHARED_FIXTURE_GROUPS


def test_tests_sharing_a_run_carry_its_worker_group(request: pytest.FixtureRequest):
    if "PYTEST_XDIST_WORKER" not in os.environ or not request.config.getoption("loadgroup"):
        pytest.skip("only meaningful in a parallel run with --dist loadgroup (the default)")
    sharing = [(item, group) for item in request.session.items for name, group in SHARED_FIXTURE_GROUPS.items()
               if name in item.fixturenames]
    if not sharing:
        pytest.skip("no selected test uses a shared fixture")
    # xdist sends every test whose id ends in the same @group to one worker
    ungrouped = [item.nodeid for item, group in sharing if not item.nodeid.endswith(f"@{group}")]
    assert not ungrouped, ungrouped
