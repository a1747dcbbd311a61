"""Installs other than the editable one: the wheel carries everything `generate` needs.

`pip install .`, a built wheel or an install from a git URL copies only the package into site-packages, so the
bundled tiny model and the official key lists must be package data (pyproject.toml), not files beside the
repository. This builds the wheel from a clean copy of the tracked files, installs it into a fresh virtual
environment (reusing this environment's torch and other dependencies through --system-site-packages, so nothing is
downloaded), and generates an image from an empty folder with the installed command. Slow (a venv and a wheel).
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(command, cwd, **kwargs):
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{command} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_the_wheel_generates_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    archive = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, archive.decode().split("\0")):            # the tracked files, as a clean clone has
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("ldm_scratch-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    where = run([str(python), "-c", "import ldm_scratch; print(ldm_scratch.__file__)"], cwd=empty).stdout.strip()
    assert str(venv) in where, f"the installed package was not the one imported: {where}"
    run([str(venv / "bin" / "ldm-scratch"), "generate", "a blue square on a white background", "--steps", "4",
         "--out", "square.png"], cwd=empty)
    assert (empty / "square.png").stat().st_size > 0
