"""Two versions of ldm_scratch side by side: did a change (a refactor, a move) cost speed or memory?

    git worktree add /tmp/ldm_old <commit>            # the version to compare against
    python scripts/benchmark_trees.py /tmp/ldm_old [--repeats 3] [--warmup 1] [--steps 2] [--memory-repeats 2]
                                                   [--only unet,vae,memory] [--json results.json]

The same workloads as scripts/benchmark.py, on the same random full-size SD v1.5 file in the official layout
(written once by scripts/benchmark.py), but the reference is the OTHER tree's ldm_scratch instead of diffusers:

    unet     one UNet step with classifier-free guidance: x [2, 4, 64, 64], t [2], context [2, 77, 768]
    vae      VAE decode of a 512² image: z [1, 4, 64, 64] → [1, 3, 512, 512]
    memory   load + one 512² txt2img (`--steps` DDIM steps) in a fresh process per tree: peak RSS (VmHWM)

Speed rows run in ONE process: the other tree's package is imported under another name (`ldm_scratch_other`) next
to this tree's `ldm_scratch`, both built by their own `load_pipeline` (what a user gets), and timed interleaved in
ABBA order (new, old, old, new, new, old, …: whichever runs first in a pair has no steady advantage) so that drifts
in machine load hit both alike; medians are reported as new / old. The memory row runs each tree's own
`scripts/benchmark.py --memory-child ours`, alternating.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402  (this tree's scripts/benchmark.py: the file, the inputs, the interleaved timer)

ROWS = ("unet", "vae", "memory")


def import_tree(root: Path, name: str = "ldm_scratch_other"):
    """The package `root/ldm_scratch` imported as `name`, beside this tree's `ldm_scratch` (its relative imports
    resolve inside `root`)."""
    package = root / "ldm_scratch"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def abba(pair: tuple, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per call of pair[0] and pair[1], `repeats` each after `warmup` untimed calls each, in the order
    0 1 1 0 0 1 …"""
    times = ([], [])
    with torch.inference_mode():
        for _ in range(warmup):
            for run in pair:
                run()
        for k in range(repeats):
            for which in ((0, 1), (1, 0))[k % 2]:                       # 0 1 | 1 0 | 0 1 | …
                start = time.perf_counter()
                pair[which]()
                times[which].append(time.perf_counter() - start)
    return times


def speed(args) -> dict:
    import ldm_scratch
    other = import_tree(args.old_tree)
    data = benchmark.inputs(torch.float32, "cpu")
    x, t, context, z = data["x"], data["t"], data["context"], data["z"]
    if args.load_old_first:   # which pipeline's weights are allocated first: a check that the order is not the cause
        old, new = other.load_pipeline(args.checkpoint), ldm_scratch.load_pipeline(args.checkpoint)
    else:
        new, old = ldm_scratch.load_pipeline(args.checkpoint), other.load_pipeline(args.checkpoint)
    print(f"new: {Path(ldm_scratch.__file__).parent}\nold: {Path(other.__file__).parent}", flush=True)
    runs = {"unet": (lambda: new.unet(x, t, context), lambda: old.unet(x, t, context)),
            "vae": (lambda: new.vae.decode(z), lambda: old.vae.decode(z))}
    rows = {}
    for row in [r for r in args.only if r in runs]:
        with torch.inference_mode():   # the two give the same numbers (a refactor must not change them)
            difference = (runs[row][0]() - runs[row][1]()).abs().max().item()
        mine, reference = abba(runs[row], args.warmup, args.repeats)
        rows[row] = {"new_s": statistics.median(mine), "old_s": statistics.median(reference), "new_all": mine,
                     "old_all": reference, "max_abs_difference": difference}
        r = rows[row]
        print(f"  {row}: new {r['new_s']:.3f} s, old {r['old_s']:.3f} s ({r['new_s'] / r['old_s']:.3f}×), "
              f"outputs differ by at most {difference:.3g}", flush=True)
    return rows


def memory(args) -> dict:
    results = {"new": [], "old": []}
    trees = {"new": ROOT, "old": args.old_tree}
    for _ in range(args.memory_repeats):
        for which, tree in trees.items():
            command = [sys.executable, str(tree / "scripts" / "benchmark.py"), "--memory-child", "ours",
                       "--checkpoint", str(args.checkpoint), "--steps", str(args.steps),
                       "--threads", str(torch.get_num_threads())]
            out = subprocess.run(command, capture_output=True, text=True, cwd=tree)
            if out.returncode != 0:
                raise RuntimeError(f"the {which} memory run failed:\n{out.stderr[-3000:]}")
            results[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  memory {which}: {results[which][-1]}", flush=True)
    return {which: {"peak_rss_gib": statistics.median(m["peak_rss"] for m in runs) / 2 ** 30, "runs": runs}
            for which, runs in results.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old_tree", type=Path, help="a checkout of the version to compare against")
    p.add_argument("--checkpoint", type=Path, default=benchmark.DEFAULT_FILE)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="DDIM steps of the memory row's txt2img")
    p.add_argument("--memory-repeats", type=int, default=2)
    p.add_argument("--only", default=",".join(ROWS))
    p.add_argument("--load-old-first", action="store_true", help="load the old tree's pipeline before the new one")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.old_tree = args.old_tree.resolve()
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    if not (args.old_tree / "ldm_scratch" / "__init__.py").is_file():
        p.error(f"{args.old_tree} holds no ldm_scratch package; give a checkout of this repository")
    if set(args.only) - set(ROWS):
        p.error(f"--only: choose from {', '.join(ROWS)}")
    args.checkpoint = benchmark.synthetic_file(args.checkpoint)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "old_tree": str(args.old_tree),
              "rows": speed(args)}
    if "memory" in args.only:
        report["memory"] = memory(args)
    print(f"\n{'':32} {'new':>10} {'old':>10} {'new/old':>8}")
    for row, r in report["rows"].items():
        print(f"{row:32} {r['new_s']:9.3f}s {r['old_s']:9.3f}s {r['new_s'] / r['old_s']:7.3f}×")
    if "memory" in report:
        m = report["memory"]
        print(f"{'peak RSS, load + txt2img 512²':32} {m['new']['peak_rss_gib']:7.2f}GiB "
              f"{m['old']['peak_rss_gib']:7.2f}GiB {m['new']['peak_rss_gib'] / m['old']['peak_rss_gib']:7.3f}×")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
