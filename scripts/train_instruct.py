"""Train a tiny InstructPix2Pix from the bundled tiny model (ldm_scratch/training/instruct.py has the recipe).

    python scripts/train_instruct.py --out runs/instruct/tiny-shapes-instruct.safetensors
    torchrun --standalone --nproc_per_node 2 scripts/train_instruct.py --out … --threads 1      # 2 processes (DDP)

Every InstructTrainConfig field is a flag (--steps, --batch-size, --lr, --minutes, …). The output is refused when it
exists, unless --force. Grade the result with scripts/eval_instruct.py.

    python scripts/train_instruct.py --half-copy-of runs/…/model.safetensors --out weights/…safetensors   # float16 copy
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields

import torch

from ldm_scratch.training.instruct import InstructTrainConfig, save_half, train_instruct


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = InstructTrainConfig()
    for field in fields(InstructTrainConfig):
        value = getattr(defaults, field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"default {value}")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    parser.add_argument("--tokenizer", default=None, help="vocabulary path for load_tokenizer (default: found)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--half-copy-of", default=None, metavar="MODEL",
                        help="train nothing: write a float16 copy of the trained MODEL to --out (for bundling)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = InstructTrainConfig(**{name: getattr(args, name) for name in asdict(InstructTrainConfig())})
        if args.half_copy_of:
            print(f"wrote {save_half(args.half_copy_of, cfg.out, force=args.force)}")
            return 0
        train_instruct(cfg, force=args.force, tokenizer=args.tokenizer)
    except (ValueError, FileExistsError, FileNotFoundError, IsADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
