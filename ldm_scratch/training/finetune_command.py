"""The `finetune` command: `ldm-scratch finetune --method lora|textual-inversion|dreambooth --data FOLDER …`
(also under torchrun: `torchrun --nproc_per_node 2 -m ldm_scratch.cli finetune …`). One flag per FinetuneConfig
field; see finetune.py for what each method trains."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .finetune import DEFAULT_LR, LORA_FORMATS, METHODS, PRIOR_TARGETS, UNET_PARAMS, FinetuneConfig
    from .lora_training import TARGET_PRESETS
    d = FinetuneConfig(method="lora", data="", out_dir="")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--data", required=True, help="folder of images, each with a caption .txt beside it")
    parser.add_argument("--out", dest="out_dir", required=True,
                        help="run folder: checkpoint, class images, and the output file at the end")
    parser.add_argument("--checkpoint", default="", help="the model to adapt (default: the bundled tiny model)")
    parser.add_argument("--tokenizer", default="", help="vocabulary folder (vocab.json + merges.txt), if needed")
    parser.add_argument("--instance-prompt", default="", help="the caption of every image without a .txt")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--lr", type=float, default=0.0,
                        help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
                             + ")")
    parser.add_argument("--batch", type=int, default=d.batch, help="images per step (over all processes)")
    parser.add_argument("--seed", type=int, default=d.seed)
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-rank", type=int, default=d.lora_rank)
    lora.add_argument("--lora-alpha", type=float, default=0.0, help="α (default: the rank, so α/r = 1)")
    lora.add_argument("--lora-targets", default=d.lora_targets, choices=tuple(TARGET_PRESETS),
                      help="UNet layers: attention q/k/v/out, the whole transformer blocks, every layer (LoCon), "
                           "or only the K and V projections of the prompt (cross-kv, as Custom Diffusion)")
    lora.add_argument("--lora-text-encoder", action="store_true", help="also the text encoder's attention and MLP")
    lora.add_argument("--lora-format", default=d.lora_format, choices=LORA_FORMATS,
                      help="kohya (web UI, ComfyUI; default) or diffusers (load_lora_weights)")
    ti = parser.add_argument_group("textual inversion (and a new word for dreambooth / lora)")
    ti.add_argument("--token", default="", help="the new word, e.g. '<cross>' (must not be a CLIP token already); "
                    "with dreambooth or lora its rows train with the model (at --word-lr) and are written beside "
                    "it as OUT/<token>.safetensors")
    ti.add_argument("--init-word", default="", help="the word its vectors start from, e.g. 'square'")
    ti.add_argument("--num-vectors", type=int, default=d.num_vectors)
    db = parser.add_argument_group("DreamBooth")
    db.add_argument("--train-text-encoder", action="store_true", help="train the text encoder too")
    db.add_argument("--unet-params", default=d.unet_params, choices=UNET_PARAMS,
                    help="UNet weights that train: all, or only the prompt's K and V projections (cross-kv: "
                         "Custom Diffusion, Kumari et al. 2023)")
    db.add_argument("--train-words", default="", help="also train these words' token rows (comma-separated, e.g. "
                    "'cross'), the rest of the text encoder frozen: prompts without them encode as before")
    db.add_argument("--word-lr", type=float, default=0.0,
                    help=f"learning rate of those rows, or of --token's (default "
                         f"{DEFAULT_LR['textual-inversion']:g})")
    prior = parser.add_argument_group("prior preservation (DreamBooth and LoRA)")
    prior.add_argument("--class-prompt", default="", help="prior preservation: the class, e.g. 'a red shape' "
                       "(several: 'a red circle | a blue star', used in turn)")
    prior.add_argument("--num-class-images", type=int, default=d.num_class_images)
    prior.add_argument("--prior-weight", type=float, default=d.prior_weight, help="λ of the prior-preservation loss")
    prior.add_argument("--prior-target", default=d.prior_target, choices=PRIOR_TARGETS,
                       help="what the class half learns: the drawn noise (DreamBooth) or the base model's own "
                            "prediction (model: distillation, keeps the old prompts' outputs)")
    prior.add_argument("--prior-uncond", type=float, default=d.prior_uncond,
                       help="fraction of class items trained with the empty prompt (CFG's unconditional half)")
    prior.add_argument("--class-dir", default="",
                       help="where class images are generated and reused (OUT/class_images)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-resume", action="store_true", help="start afresh (needs --force over a checkpoint)")
    parser.add_argument("--force", action="store_true", help="replace an existing run or output file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")


def cmd_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    import torch.distributed as dist

    from .finetune import FinetuneConfig, finetune
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if hasattr(args, f.name)}
    cfg = FinetuneConfig(**values, progress=not args.no_progress)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = finetune(cfg, resume=not args.no_resume)
    if result["output"] is not None:
        print(f"fine-tuned in {result['seconds']:.0f} s; final loss {result['loss'][-1]:.4f}; wrote {result['output']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
