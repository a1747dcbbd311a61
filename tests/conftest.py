"""Shared test configuration.

Parity tests (marked `parity`) compare against diffusers / transformers / OpenAI's tokenizer, which the `[reference]`
extra installs (the README's test command does). They are the heart of the project's claim, so a parity test that
skips (its reference library missing) is reported as a FAILURE that names the install command, unless
LDM_ALLOW_PARITY_SKIP=1 says a skip is wanted. CI also sets LDM_REQUIRE_PARITY=1, which turns ANY skip into a
failure, so no comparison or check can silently stop running there.
"""
import os

import pytest
import torch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    parity = item.get_closest_marker("parity") is not None
    if os.environ.get("LDM_REQUIRE_PARITY") == "1" or (parity and os.environ.get("LDM_ALLOW_PARITY_SKIP") != "1"):
        why = "LDM_REQUIRE_PARITY=1" if os.environ.get("LDM_REQUIRE_PARITY") == "1" else "parity tests may not skip"
        report.outcome = "failed"
        report.longrepr = (f"{'parity test' if parity else 'test'} {item.nodeid} was skipped ({why}): install the "
                           f"reference extra (bash scripts/install.sh test,reference), or set "
                           f"LDM_ALLOW_PARITY_SKIP=1 to let parity tests skip. Skip reason: {report.longrepr}")


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
