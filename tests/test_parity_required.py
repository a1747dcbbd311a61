"""A parity test that skips is a failure (tests/conftest.py), so a newcomer's run cannot quietly lose the
comparisons with diffusers / transformers. Checked by running pytest on a throw-away test file with our conftest."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
SKIPPING = '''
import pytest

@pytest.mark.parity
def test_parity_that_skips():
    pytest.importorskip("a_reference_library_that_is_not_installed")

def test_ordinary_skip():
    pytest.skip("not a parity test")
'''


def run_pytest(folder: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")} | env
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "-o", "markers=parity: x", str(folder)], capture_output=True, text=True, cwd=folder,
                          env=environment)


@pytest.fixture
def folder(tmp_path):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    return tmp_path


def test_a_skipped_parity_test_fails_and_says_how_to_install(folder):
    out = run_pytest(folder)
    assert out.returncode == 1, out.stdout
    assert "1 failed, 1 skipped" in out.stdout and "bash scripts/install.sh test,reference" in out.stdout


def test_allowing_parity_skips_on_purpose(folder):
    out = run_pytest(folder, LDM_ALLOW_PARITY_SKIP="1")
    assert out.returncode == 0 and "2 skipped" in out.stdout, out.stdout


def test_ci_turns_every_skip_into_a_failure(folder):
    out = run_pytest(folder, LDM_REQUIRE_PARITY="1", LDM_ALLOW_PARITY_SKIP="1")
    assert out.returncode == 1 and "2 failed" in out.stdout, out.stdout
