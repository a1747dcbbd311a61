"""Execute every teaching notebook top to bottom, as a reader would, and fail on any error.

Each notebook runs in a fresh kernel (nbclient + ipykernel, the `[test]` / `[notebooks]` extras) in an empty
temporary working directory, so it cannot lean on files lying around in the repository. The notebooks assert
their own claims (e.g. notebook 2 checks q(x_t|x_0) against the chain it simulates), so running them tests more
than "no exception".

Time budget: the README promises each notebook finishes in under two minutes on 2 CPU cores. The measured time is
printed (run with `-s`, or see `record_property` in a JUnit report) and the test fails past NOTEBOOK_BUDGET_S
(default 120 s; set the environment variable LDM_NOTEBOOK_BUDGET_S to change it on a slow machine).

Also here: the checker of committed notebooks (scripts/check_notebooks.py) and the generator check (the .ipynb
files are exactly what scripts/build_notebooks.py writes).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BUDGET_S = float(os.environ.get("LDM_NOTEBOOK_BUDGET_S", "120"))


def test_there_are_eight_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(1, 9)], [p.name for p in NOTEBOOKS]


def test_committed_notebooks_pass_the_checker():
    pytest.importorskip("nbformat", reason="needs the [test] extra")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_notebooks.py")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checker_catches_outputs_and_machine_paths(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="needs the [test] extra")
    sys.path.insert(0, str(ROOT / "scripts"))
    from check_notebooks import check_notebook

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("open('/home/alice/sd.safetensors')")])
    notebook.cells[0].execution_count = 1
    notebook.cells[0].outputs = [nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})]
    path = tmp_path / "bad.ipynb"
    nbformat.write(notebook, path)
    problems = " ".join(check_notebook(path))
    assert "execution_count" in problems and "image output" in problems and "/home/alice" in problems
    path.write_text("{not json")
    assert "not a valid nbformat" in " ".join(check_notebook(path))


def test_notebooks_are_what_the_generator_writes():
    pytest.importorskip("nbformat", reason="needs the [test] extra")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_notebooks.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch, record_property):
    nbformat = pytest.importorskip("nbformat", reason="needs the [test] extra")
    nbclient = pytest.importorskip("nbclient", reason="needs the [test] extra")
    pytest.importorskip("ipykernel", reason="needs the [test] extra")
    # the kernel is a child process: make the package importable there even without `pip install -e .`
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TQDM_DISABLE", "1")

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=int(max(BUDGET_S, 60)), kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()                          # raises CellExecutionError (with the traceback) on any error
    elapsed = time.perf_counter() - start
    record_property("seconds", round(elapsed, 1))
    print(f"{path.name}: {elapsed:.1f} s")
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s, over the {BUDGET_S:.0f} s budget"
