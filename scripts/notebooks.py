"""The teaching notebooks: sources in notebooks/NN_name.py, executed notebooks in notebooks/NN_name.ipynb.

    python3 scripts/notebooks.py build [NAME ...]   # execute the sources, (re)write the .ipynb with their outputs
    python3 scripts/notebooks.py check              # the committed .ipynb are fresh, executed, clean (check_notebooks.py)
    python3 scripts/notebooks.py shrink [NAME ...]  # re-encode the committed notebooks' figures as build does

The sources are jupytext percent-format scripts: `# %%` starts a code cell, `# %% [markdown]` a markdown cell whose
lines are comments. Edit them like any Python file (they also run as plain scripts), then `build`. Build converts
each source with jupytext, runs it top to bottom in a fresh kernel in an empty temporary directory (so it cannot
lean on files lying around in the repository), scrubs what would tie the file to this machine (paths, timings,
Python version), re-encodes its figures losslessly (`small_png`) and writes the .ipynb atomically. `tests/test_notebooks.py` runs every source the same way and
fails when a committed notebook is stale against its source; GitHub shows the committed .ipynb with its figures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT_S = 600            # one cell; the whole-notebook budget is tests/test_notebooks.py's
METADATA = {                    # the same on every machine: no Python version, no jupytext version
    "jupytext": {"formats": "ipynb,py:percent"},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python", "pygments_lexer": "ipython3"},
}
# The kernel's environment: the package importable without `pip install -e .`, no progress bars in the outputs.
KERNEL_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
              "TQDM_DISABLE": "1"}


def sources() -> list[Path]:
    """notebooks/NN_name.py, in reading order."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def read_source(path: Path):
    """The notebook a jupytext source stands for (no outputs), with fixed metadata and cell ids."""
    import jupytext

    notebook = jupytext.read(path, fmt="py:percent")
    notebook.metadata = json.loads(json.dumps(METADATA))
    for k, cell in enumerate(notebook.cells):
        cell.id = f"{path.stem[:2]}-{k:02d}"       # fixed ids: a rebuild changes only what changed
        cell.metadata = {}
    return notebook


def cells(notebook) -> list[tuple[str, str]]:
    """What staleness compares: each cell's type and source (never the outputs)."""
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def stale(notebook, source: Path) -> str | None:
    """Why `notebook` is not what `source` builds (None: it is), naming the first cell that differs."""
    have, want = cells(notebook), cells(read_source(source))
    for k, (a, b) in enumerate(zip(have, want)):
        if a[0] != b[0]:
            return f"cell {k} differs from {source.name}: a {a[0]} cell here, {b[0]} there"
        if a[1] != b[1]:
            lines = list(zip(a[1].splitlines() + [""], b[1].splitlines() + [""]))
            line, (here, there) = next((n, pair) for n, pair in enumerate(lines, 1) if pair[0] != pair[1])
            col = next((c for c, (x, y) in enumerate(zip(here, there)) if x != y), min(len(here), len(there)))
            start = max(0, col - 20)                     # show where the two lines part
            return (f"cell {k} differs from {source.name} at its line {line}, column {col + 1}: "
                    f"{here[start:col + 30]!r} here, {there[start:col + 30]!r} there")
    if len(have) != len(want):
        return f"{len(have)} cells, but {source.name} has {len(want)}"
    return None


@contextlib.contextmanager
def kernel_environment():
    """Set KERNEL_ENV for the kernels started inside (they inherit os.environ), then restore it."""
    saved = {name: os.environ.get(name) for name in KERNEL_ENV}
    os.environ.update(KERNEL_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute(notebook, workdir: Path):
    """Run `notebook` in place, top to bottom, in a fresh python3 kernel whose working directory is `workdir`.

    Raises nbclient's CellExecutionError (with the traceback) on the first error; returns the seconds it took.
    """
    import nbclient

    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     record_timing=False, resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    with kernel_environment():
        client.execute()
    return time.perf_counter() - start


def scrub(text: str, workdir: Path) -> str:
    """Replace this machine's paths in an output: the run's directory, the repository, installed packages, home."""
    text = text.replace(str(workdir) + os.sep, "").replace(str(workdir), ".")
    text = text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    text = re.sub(r"(?:/[\w.+-]+)+/((?:site|dist)-packages)/", r".../\1/", text)
    return text.replace(str(Path.home()), "~")


def clean(notebook, workdir: Path):
    """Drop what ties an executed notebook to this machine: metadata the kernel added, paths inside outputs."""
    notebook.metadata = json.loads(json.dumps(METADATA))
    for cell in notebook.cells:
        cell.metadata = {}
        for output in cell.get("outputs", []):
            if "text" in output:                                    # stream outputs
                output.text = scrub(output.text, workdir)
            if "traceback" in output:
                output.traceback = [scrub(line, workdir) for line in output.traceback]
            if "text/plain" in output.get("data", {}):
                output.data["text/plain"] = scrub(output.data["text/plain"], workdir)
    return notebook


def small_png(data: str) -> str:
    """A base64 PNG re-encoded with the same pixels in fewer bytes: matplotlib writes RGBA, and every figure here is
    opaque, so the alpha channel carries nothing; without it, and with the encoder's `optimize`, the notebooks'
    figures take ≈ 11 % fewer bytes (their total is capped by scripts/check_notebooks.py). A figure with any
    transparent pixel, or one that would not shrink, is kept as it was."""
    import base64
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    if image.mode == "RGBA" and image.getextrema()[3][0] < 255:
        return data
    out = io.BytesIO()
    image.convert("RGB").save(out, "PNG", optimize=True)
    smaller = base64.b64encode(out.getvalue()).decode("ascii")
    return smaller if len(smaller) < len(data) else data


def shrink_figures(notebook):
    """Every image/png output of the notebook through `small_png`, in place; returns the notebook."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                output.data["image/png"] = small_png(output.data["image/png"])
    return notebook


def render(notebook) -> str:
    """The .ipynb text: sorted keys and one-space indents, so diffs stay small."""
    return json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a notebook."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~umask)       # mkstemp's 0600 would make the notebook private
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def build(source: Path) -> Path:
    """Execute one source and write its .ipynb beside it."""
    import nbformat

    notebook = read_source(source)
    with tempfile.TemporaryDirectory(prefix="ldm-notebook-") as workdir:
        workdir = Path(workdir).resolve()
        seconds = execute(notebook, workdir)
        clean(notebook, workdir)
    shrink_figures(notebook)
    nbformat.validate(notebook)
    target = source.with_suffix(".ipynb")
    text = render(notebook)
    write_atomically(target, text)
    print(f"wrote notebooks/{target.name}: {len(notebook.cells)} cells, {len(text.encode()) / 1e3:.0f} kB, "
          f"ran in {seconds:.0f} s")
    return target


def shrink(target: Path) -> None:
    """Re-encode a committed notebook's figures as `build` does (`small_png`: the same pixels); nothing re-runs."""
    import nbformat

    notebook = nbformat.reads(target.read_text(encoding="utf-8"), as_version=4)
    before = target.stat().st_size
    text = render(shrink_figures(notebook))
    write_atomically(target, text)
    print(f"wrote notebooks/{target.name}: {before / 1e3:.0f} → {len(text.encode()) / 1e3:.0f} kB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="execute the sources and write the .ipynb files")
    build_parser.add_argument("names", nargs="*", help="notebooks to build, e.g. 03 or 03_unet (default: all)")
    commands.add_parser("check", help="run scripts/check_notebooks.py on the committed notebooks")
    shrink_parser = commands.add_parser("shrink", help="re-encode the committed notebooks' figures (same pixels)")
    shrink_parser.add_argument("names", nargs="*", help="notebooks to shrink (default: all)")
    args = parser.parse_args(argv)

    if args.command == "check":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from check_notebooks import main as check
        return check([])
    chosen = [s for s in sources() if not args.names or any(s.stem.startswith(n) for n in args.names)]
    if not chosen:
        print(f"no source matches {args.names} in notebooks/", file=sys.stderr)
        return 1
    if args.command == "shrink":
        for source in chosen:
            shrink(source.with_suffix(".ipynb"))
        return 0
    for source in chosen:                    # one at a time: each kernel uses every core it is given
        build(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
