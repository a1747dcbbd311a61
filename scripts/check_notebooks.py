"""Check the committed notebooks: valid nbformat, (almost) no outputs, no machine-specific paths.

    python scripts/check_notebooks.py [NOTEBOOK ...]      # default: notebooks/*.ipynb; exit 1 on any problem

Rules, per notebook:
- it parses and validates as nbformat v4;
- outputs are small: at most MAX_OUTPUT_BYTES of outputs in total (JSON size) and no image outputs — the
  generator (scripts/build_notebooks.py) writes none, and executed copies must not be committed;
- no absolute paths of a particular machine anywhere in the file (sources, outputs, metadata): /work/, /root/,
  /home/<user>/, /Users/<user>/, /tmp/, C:\\Users\\ … — a notebook that works only on its author's machine is
  broken for everyone else;
- every code cell has execution_count null (a sign that it was never run before being committed).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_OUTPUT_BYTES = 2_000
MACHINE_PATH = re.compile(r"(/work/|/root/|/home/[\w.-]+|/Users/[\w.-]+|/tmp/|[A-Za-z]:\\\\?Users\\\\?)")


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

    output_bytes = 0
    for k, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count") is not None:
            problems.append(f"cell {k} has execution_count {cell.execution_count}: commit notebooks unexecuted "
                            "(rebuild with scripts/build_notebooks.py)")
        for output in cell.get("outputs", []):
            output_bytes += len(json.dumps(output))
            data = output.get("data", {})
            images = [kind for kind in data if kind.startswith("image/")]
            if images:
                problems.append(f"cell {k} holds an image output ({', '.join(images)}): clear outputs before "
                                "committing")
    if output_bytes > MAX_OUTPUT_BYTES:
        problems.append(f"{output_bytes:,} bytes of outputs (limit {MAX_OUTPUT_BYTES:,}): clear outputs before "
                        "committing")

    for line_number, line in enumerate(text.splitlines(), 1):
        match = MACHINE_PATH.search(line)
        if match:
            problems.append(f"line {line_number} contains the machine path {match.group(0)!r}: use paths relative "
                            "to the repository (e.g. weights/…) or ~")
    return problems


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
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
    if failed:
        print(f"{failed} of {len(paths)} notebooks have problems", file=sys.stderr)
        return 1
    print(f"{len(paths)} notebooks OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
