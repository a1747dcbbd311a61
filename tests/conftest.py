"""Shared test configuration.

Parity tests (marked `parity`) compare against diffusers / transformers / OpenAI's tokenizer and skip when the
`[reference]` extra is missing. CI sets LDM_REQUIRE_PARITY=1, which turns ANY skip into a failure (CI installs every
extra and can fetch the tokenizer vocabulary), so no comparison can silently stop running there.
"""
import os

import pytest
import torch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("LDM_REQUIRE_PARITY") == "1" and report.skipped:
        kind = "parity test" if item.get_closest_marker("parity") is not None else "test"
        report.outcome = "failed"
        report.longrepr = (f"{kind} {item.nodeid} was skipped but LDM_REQUIRE_PARITY=1: "
                           f"install the reference extra (bash scripts/install.sh test,reference). Skip reason: "
                           f"{report.longrepr}")


# scripts/ holds the synthetic-checkpoint writer that the slow tests and the benchmarks share
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture
def one_thread():
    """For tests of many tiny tensors: on a shared 2-core machine extra threads only contend (measured up to 27×
    slower). Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
