"""Check the committed notebooks: fresh against their sources, executed with their figures, small, no machine paths.

    python3 scripts/check_notebooks.py [NOTEBOOK ...]    # default: notebooks/*.ipynb; exit 1 on any problem

Rules, per notebook (the .ipynb are written by `python3 scripts/notebooks.py build`):
- it parses and validates as nbformat v4;
- it is not stale: its cells' types and sources are the jupytext conversion of notebooks/NN_name.py (outputs are
  not compared);
- it was executed, top to bottom, in one kernel: the code cells' execution counts are 1, 2, 3, …;
- no error outputs (a notebook that stops half-way shows the student a traceback instead of the rest);
- every code cell that draws (calls `plt.show()`) holds an image output: on GitHub the figures are the point;
- small enough to browse: at most MAX_NOTEBOOK_BYTES each, MAX_TOTAL_BYTES all together;
- no absolute paths of a particular machine anywhere in the file (sources, outputs, metadata): /work/, /root/,
  /home/<user>/, /Users/<user>/, /tmp/, C:\\Users\\, a Python installation's lib/ … — a notebook that names its
  author's machine is broken, or at least confusing, for everyone else.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import NOTEBOOK_DIR, stale  # noqa: E402  (scripts/ is not a package)

MAX_NOTEBOOK_BYTES = 1_500_000
MAX_TOTAL_BYTES = 5_000_000        # issue 13: all notebooks together small enough to browse
MACHINE_PATH = re.compile(r"(/work/|/root/|/home/[\w.-]+|/Users/[\w.-]+|/tmp/|[A-Za-z]:\\\\?Users\\\\?"
                          r"|/usr/(?:local/)?lib/python|/opt/conda)")
DRAWS = re.compile(r"^\s*plt\.show\(\)", re.MULTILINE)


def check_notebook(path: Path) -> list[str]:
    """The problems found in one notebook (empty: fine)."""
    import nbformat

    problems = []
    text = path.read_text(encoding="utf-8")
    try:
        notebook = nbformat.reads(text, as_version=4)
        nbformat.validate(notebook)
    except Exception as error:  # nbformat raises several exception types for bad files
        return [f"not a valid nbformat v4 notebook: {error}"]

    source = path.with_suffix(".py")
    if not source.is_file():
        problems.append(f"no source {source.name} beside it")
    elif why := stale(notebook, source):
        problems.append(f"stale: {why}; rebuild with python3 scripts/notebooks.py build {path.stem[:2]}")

    code_cells = [(k, cell) for k, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    counts = [cell.get("execution_count") for _, cell in code_cells]
    if counts != list(range(1, len(code_cells) + 1)):
        problems.append(f"not executed top to bottom in one kernel (execution counts {counts}): rebuild with "
                        f"python3 scripts/notebooks.py build {path.stem[:2]}")
    for k, cell in code_cells:
        outputs = cell.get("outputs", [])
        for output in outputs:
            if output.output_type == "error":
                problems.append(f"cell {k} has an error output: {output.get('ename')}: {output.get('evalue')}")
        if DRAWS.search(cell.source) and not any(kind.startswith("image/") for output in outputs
                                                   for kind in output.get("data", {})):
            problems.append(f"cell {k} calls plt.show() but holds no image output")

    if len(text.encode()) > MAX_NOTEBOOK_BYTES:
        problems.append(f"{len(text.encode()):,} bytes (limit {MAX_NOTEBOOK_BYTES:,}): draw smaller figures")
    for line_number, line in enumerate(text.splitlines(), 1):
        match = MACHINE_PATH.search(line)
        if match:
            problems.append(f"line {line_number} contains the machine path {match.group(0)!r}: use paths relative "
                            "to the repository (e.g. weights/…) or ~")
    return problems


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
        orphans = sorted({p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py")} - {p.stem for p in paths})
        if orphans:
            print(f"sources without a notebook: {', '.join(orphans)}; run python3 scripts/notebooks.py build",
                  file=sys.stderr)
            return 1
        if not paths:
            print("no notebooks found in notebooks/", file=sys.stderr)
            return 1
    failed = 0
    for path in paths:
        problems = check_notebook(path)
        if problems:
            failed += 1
            print(f"{path.name}:")
            for problem in problems:
                print(f"  - {problem}")
    total = sum(path.stat().st_size for path in paths)
    too_big = total > MAX_TOTAL_BYTES
    if too_big:
        print(f"all notebooks together: {total:,} bytes (limit {MAX_TOTAL_BYTES:,}): draw smaller figures")
    if failed or too_big:
        print(f"{failed} of {len(paths)} notebooks have problems", file=sys.stderr)
        return 1
    print(f"{len(paths)} notebooks OK ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
