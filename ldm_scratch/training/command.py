"""The `train` command: `ldm-scratch train …`, `python -m ldm_scratch.train …`, `torchrun … -m ldm_scratch.train …`.

One flag per `TrainConfig` field; cli.py mounts it as a sub-command, train.py runs it as a module (torchrun launches
it once per process).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (dashes for underscores); the defaults are the bundled model's recipe.

    A flag left out is not filled in by argparse (SUPPRESS): a fresh run takes TrainConfig's default, a resumed run
    the checkpoint's value, so resuming needs only --out and a flag given on resume is compared with the run's."""
    import dataclasses

    from .config import PREDICTIONS, STAGE2_FIELDS, TrainConfig
    defaults = TrainConfig()
    parser.add_argument("--out", dest="out_dir", default=defaults.out_dir, help="run directory (checkpoint, grids)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("out_dir", "model", "progress"):
            continue
        value, flag = getattr(defaults, f.name), f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):  # --zero-snr / --no-zero-snr (bool("False") would be True)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"default {'on' if value else 'off'} (resuming: the run's)")
            continue
        parser.add_argument(flag, type=type(value), default=argparse.SUPPRESS,
                            choices=tuple(PREDICTIONS) if f.name == "prediction" else None,
                            help=f"default {value or repr(value)} (resuming: the run's)")
    parser.add_argument("--model-config", default=None,
                        help="JSON file with a ModelConfig (ModelConfig.to_json()); default: configs.tiny_config()")
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh instead of resuming OUT/ckpt.safetensors (refused if OUT holds a run, "
                             "unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="allow replacing work: a run in OUT with --no-resume, an existing --export file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--new-stage2", action="store_true",
                        help="resuming a run still in stage 1 (or at its end): use this command's stage-2 flags "
                             f"({', '.join('--' + n.replace('_', '-') for n in STAGE2_FIELDS)}) instead of the "
                             "checkpoint's")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--export", default=None,
                        help="also copy the final model.safetensors to this path (refused if it exists, unless "
                             "--force)")


def check_export(export: str | None, force: bool) -> Path | None:
    """--export PATH, checked before training starts: a new file in an existing folder, or --force to replace."""
    if export is None:
        return None
    path = Path(export)
    if path.is_dir():
        raise ValueError(f"--export {export} is a folder; give a file name (e.g. {path / 'model.safetensors'})")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--export {export}: the folder {path.parent} does not exist; create it first or "
                                f"choose another path")
    if path.exists() and not force:
        raise FileExistsError(f"--export {export} exists; refusing to overwrite it: choose another path, or pass "
                              f"--force to replace it")
    return path


def config_from_flags(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags ask for: the flags given, over the checkpoint's config when resuming one (so only
    flags given explicitly can differ from the run's recipe), else over TrainConfig's defaults."""
    import dataclasses

    from ..configs import ModelConfig
    from .config import TrainConfig
    from .run import stored_train_config
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "out_dir" and hasattr(args, f.name)}
    if args.model_config:
        given["model"] = ModelConfig.from_json(Path(args.model_config).read_text())
    base = (None if args.no_resume else stored_train_config(args.out_dir)) or TrainConfig()
    return dataclasses.replace(base, **given, out_dir=args.out_dir, progress=not args.no_progress)


def cmd_train(args: argparse.Namespace) -> int:
    """TrainConfig from the flags, then train.train(); prints where the model went (and copies it with --export).
    Every refusal (an existing --export file, a run in --out with --no-resume, flags that change a resumed run's
    recipe, an old pickled checkpoint) comes before any training."""
    import torch
    import torch.distributed as dist

    from ..train import train
    from ..files import write_atomically
    export = check_export(args.export, args.force)
    cfg = config_from_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    history = train(cfg, resume=not args.no_resume, new_stage2=args.new_stage2, force=args.force)
    if history["model"] is not None:
        print(f"trained in {history['seconds']:.0f} s; model: {history['model']}")
        if export is not None:
            write_atomically(export, Path(history["model"]).read_bytes())
            print(f"copied to {export}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """`python -m ldm_scratch.train …`: the `train` command on its own (what torchrun launches per process)."""
    from .. import train as recipe
    parser = argparse.ArgumentParser(prog="python -m ldm_scratch.train", description=recipe.__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except (ValueError, OSError) as error:  # refusals (CheckpointError is a ValueError): the message, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
