"""The `train` command: `ldm-scratch train …`, `python -m ldm_scratch.train …`, `torchrun … -m ldm_scratch.train …`.

One flag per `TrainConfig` field; cli.py mounts it as a sub-command, train.py runs it as a module (torchrun launches
it once per process).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (dashes for underscores); the defaults are the bundled model's recipe."""
    import dataclasses

    from .config import STAGE2_FIELDS, TrainConfig
    defaults = TrainConfig()
    parser.add_argument("--out", dest="out_dir", default=defaults.out_dir, help="run directory (checkpoint, grids)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("out_dir", "model", "progress"):
            continue
        value = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value,
                            help=f"default {value}")
    parser.add_argument("--model-config", default=None,
                        help="JSON file with a ModelConfig (ModelConfig.to_json()); default: configs.tiny_config()")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/ckpt.pt exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--new-stage2", action="store_true",
                        help="resuming a run still in stage 1 (or at its end): use this command's stage-2 flags "
                             f"({', '.join('--' + n.replace('_', '-') for n in STAGE2_FIELDS)}) instead of the "
                             "checkpoint's")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--export", default=None, help="also copy the final model.safetensors to this path")


def cmd_train(args: argparse.Namespace) -> int:
    """TrainConfig from the flags, then train.train(); prints where the model went (and copies it with --export)."""
    import dataclasses
    import shutil

    import torch
    import torch.distributed as dist

    from ..configs import ModelConfig
    from ..train import TrainConfig, train
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in ("model", "progress")}
    if args.model_config:
        values["model"] = ModelConfig.from_json(Path(args.model_config).read_text())
    cfg = TrainConfig(**values, progress=not args.no_progress)
    if args.threads:
        torch.set_num_threads(args.threads)
    history = train(cfg, resume=not args.no_resume, new_stage2=args.new_stage2)
    if history["model"] is not None:
        print(f"trained in {history['seconds']:.0f} s; model: {history['model']}")
        if args.export:
            shutil.copyfile(history["model"], args.export)
            print(f"copied to {args.export}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """`python -m ldm_scratch.train …`: the `train` command on its own (what torchrun launches per process)."""
    from .. import train as recipe
    parser = argparse.ArgumentParser(prog="python -m ldm_scratch.train", description=recipe.__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    return cmd_train(parser.parse_args(argv))
