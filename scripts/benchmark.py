"""Side-by-side benchmark of ldm_scratch against diffusers/transformers on identical full-size SD v1.5 weights.

    python scripts/benchmark.py [--repeats 3] [--warmup 1] [--only unet,vae,text,txt2img,memory,taesd,lcm,lcm_taesd]
                                [--steps 4] [--dtype fp32|fp16|bf16] [--device cpu|cuda] [--json results.json]

Random weights in the official single-file layout (scripts/synthetic_checkpoint.py; written once to
/tmp/ldm_scratch_synthetic_fp32.safetensors) are loaded into ours (`load_models`) and into diffusers
(`UNet2DConditionModel` / `AutoencoderKL.from_single_file` with the CompVis v1-inference.yaml, offline) and
transformers (`CLIPTextModel`). Speed rows run in ONE process, interleaved (ours, theirs, ours, theirs, …) after
`--warmup` untimed calls each, under torch.inference_mode with the same thread count, and report medians:

    unet     one UNet step with classifier-free guidance: x [2, 4, 64, 64], t [2], context [2, 77, 768]
    vae      VAE decode of a 512² image: z [1, 4, 64, 64] → [1, 3, 512, 512], a direct `pipe.vae.decode(z)`
    vae_pipeline  the same decode the way each pipeline does it after sampling: ours `latents.decode_latents`
             (÷ latent scale, dtype/finiteness checks), diffusers `vae.decode(z / scaling_factor)`; with the vae
             row it shows whether a direct `pipe.vae.decode` is as fast as the pipeline's decode
    text     CLIP text encoder on ids [2, 77]
    txt2img  a whole 512² txt2img (tokenize, encode, `--steps` DDIM steps with CFG, decode); diffusers'
             StableDiffusionPipeline built from the same components (safety_checker=None)
    taesd    TAESD decode of a 512² image (fast/taesd.py vs diffusers' AutoencoderTiny, the same random weights):
             scaled latents [1, 4, 64, 64] → [1, 3, 512, 512]; compare with the vae row for TAESD vs the KL-VAE
    lcm      a whole 512² txt2img with the `lcm` sampler, 4 steps, guidance_scale 1 (no CFG: LCM-LoRA's setting;
             the UNet's weights are random, so the LoRA itself would change no time); diffusers' pipeline with
             LCMScheduler. Compare with `--only txt2img --steps 30` for the 30-step default.
    lcm_taesd  the same, decoded by TAESD (ours: pipe.vae = TAESD; diffusers: vae = AutoencoderTiny)
    deepcache  the txt2img row's work with DeepCache, interval 3, branch 0 (ours: deepcache_interval=3; diffusers:
             the DeepCache package's DeepCacheSDHelper.set_params(3, 0)); its speed-up: against the txt2img row
    tome     the same with token merging, ratio 0.5 (ours: tome_ratio=0.5; diffusers: tomesd.apply_patch(ratio=0.5,
             use_rand=False)). Both need the [reference] extra; use `--steps 12` or more for DeepCache to matter.
    memory   load + one txt2img in a fresh process per library (so its peak RSS, VmHWM, is that work's alone);
             also gives the load time. diffusers is measured twice: loading the same single file (its
             from_single_file path) and loading the same weights saved in its own folder layout (from_pretrained,
             written once beside the file). Runs `--memory-repeats` times, alternating. (diffusers' folder
             load memory-maps its files, so its "load time" defers reading the weights to their first use.)

A busy machine: `--busy N` keeps N other processes spinning on the CPU (a pure-Python loop each, started before
the models load and stopped at the end) while everything is timed, as a browser or a compile would; the
interleaving still gives both libraries the same conditions.

Also reports the UNet step's FLOPs (counted once with torch.utils.flop_counter on the meta device), the achieved
GFLOP/s of each library, and the machine's matmul peak (best time of a large matmul in the benchmark's dtype).

By default ours runs in the layout it is fastest in on CPU (`channels_last` for the UNet and the VAE: see the
README's results section); `--no-channels-last` runs it in PyTorch's default layout and `--diffusers-channels-last`
gives diffusers the same treatment. Absolute times drift with the machine's load; compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

DEFAULT_FILE = Path(tempfile.gettempdir()) / "ldm_scratch_synthetic_fp32.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROWS = ("unet", "vae", "vae_pipeline", "text", "txt2img", "memory", "taesd", "lcm", "lcm_taesd", "deepcache", "tome")
DEEPCACHE_INTERVAL, TOME_RATIO = 3, 0.5
LCM_STEPS = 4
PROMPT, NEGATIVE = "a watercolor painting of a fox in the snow", "blurry"


# ---------------------------------------------------------------------------------------------------------------
# The weights and the two sets of models
# ---------------------------------------------------------------------------------------------------------------

def synthetic_file(path: Path) -> Path:
    """The random full-size SD v1.5 file in the official layout (written once, ≈ 4.3 GB in fp32)."""
    if not path.exists():
        from safetensors.torch import save_file
        from synthetic_checkpoint import synthetic_state
        print(f"writing {path} (random SD v1.5 weights, official layout) …", flush=True)
        save_file(synthetic_state(), str(path))
    return path


def original_config() -> dict:
    import yaml
    return yaml.safe_load((ROOT / "ldm_scratch" / "checkpoint" / "keys" / "v1-inference.yaml").read_text())


def load_ours(path: Path, dtype: torch.dtype, device: str, channels_last: bool, prepack: bool | None = None):
    """What a user gets from `load_pipeline` (channels_last; prepack as load_pipeline takes it: None = its default,
    packed weights for bfloat16 on the CPU); with channels_last=False the same networks left in PyTorch's default
    layout (the VAE still in row bands)."""
    from ldm_scratch.checkpoint import load_models
    from ldm_scratch.fast import use_row_bands
    from ldm_scratch.loader import packs_by_default
    from ldm_scratch.pipeline import StableDiffusion, load_pipeline
    from ldm_scratch.tokenizer import load_tokenizer
    if channels_last:
        pipe = load_pipeline(path, dtype=dtype, device=device, prepack=prepack)
        pipe.tokenizer  # loaded now (load_pipeline defers it to first use), as diffusers loads its tokenizer
        return pipe
    models = load_models(path, dtype=dtype)
    text_encoder, unet, vae = (m.eval().to(device) for m in (models.text_encoder, models.unet, models.vae))
    use_row_bands(vae)
    if prepack or (prepack is None and packs_by_default(dtype, device)):                 # load_pipeline's rule
        from ldm_scratch.fast import prepack_weights
        prepack_weights(unet)
    return StableDiffusion(text_encoder, unet, vae, models.config, tokenizer=load_tokenizer(), device=device)


def hf_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, written from the same vocabulary ours uses
    (no download: the vocabulary is bundled or cached by ldm_scratch.tokenizer)."""
    from ldm_scratch.tokenizer import load_tokenizer
    tokenizer = load_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    return folder


def load_theirs(path: Path, dtype: torch.dtype, device: str, channels_last: bool):
    """diffusers' StableDiffusionPipeline assembled offline from the same file: UNet and VAE converted by diffusers'
    single-file code, the text encoder a transformers CLIPTextModel holding the file's CLIP tensors."""
    import diffusers
    import transformers
    from safetensors.torch import load_file

    state = load_file(str(path))
    config = original_config()
    unet = diffusers.UNet2DConditionModel.from_single_file(state, original_config=config, torch_dtype=dtype)
    vae = diffusers.AutoencoderKL.from_single_file(state, original_config=config, torch_dtype=dtype)
    prefix = "cond_stage_model.transformer."
    clip_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    del state
    if not any(k.startswith("text_model.") for k in clip_state):
        clip_state = {"text_model." + k: v for k, v in clip_state.items()}
    hf_config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu")
    text_encoder = transformers.CLIPTextModel(hf_config).eval()
    inner = "text_model." if any(k.startswith("text_model.") for k in text_encoder.state_dict()) else ""
    clip_state = {inner + k.removeprefix("text_model."): v for k, v in clip_state.items()}
    missing, unexpected = text_encoder.load_state_dict(clip_state, strict=False)
    if [k for k in missing + unexpected if not k.endswith("position_ids")]:
        raise RuntimeError(f"CLIP weights do not fit transformers' CLIPTextModel: {missing[:3]} {unexpected[:3]}")
    text_encoder = text_encoder.to(dtype)
    tokenizer = transformers.CLIPTokenizer(*(str(hf_tokenizer_files(Path(tempfile.mkdtemp())) / name)
                                             for name in ("vocab.json", "merges.txt")), model_max_length=77)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def tiny_pair_for_dry_run():
    """(ours, diffusers' StableDiffusionPipeline) on the bundled tiny model's weights, with the tests' small
    vocabulary: for checking the scripts' code paths on a CPU (benchmark_gpu.sh DRY_RUN=1), not for timing."""
    import diffusers
    import transformers
    from safetensors.torch import load_file
    sys.path.insert(0, str(ROOT / "tests"))
    from pipeline_fixtures import write_vocabulary
    from reference_models import reference_networks
    from ldm_scratch.pipeline import BUNDLED_MODEL, load_pipeline
    vocabulary = write_vocabulary(Path(tempfile.mkdtemp()))
    ours = load_pipeline(tokenizer=vocabulary)
    text_encoder, unet, vae = reference_networks(load_file(str(BUNDLED_MODEL)), ours.config)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    theirs = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
        tokenizer=transformers.CLIPTokenizer(*map(str, vocabulary), model_max_length=77),
        feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


# ---------------------------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------------------------

def inputs(dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 4, 64, 64, generator=g).to(device, dtype),
            "t": torch.tensor([500.0, 500.0], device=device),
            "context": torch.randn(2, 77, 768, generator=g).to(device, dtype),
            "z": torch.randn(1, 4, 64, 64, generator=g).to(device, dtype),
            "ids": torch.randint(0, 49406, (2, 77), generator=g).to(device)}


def load_taesd_pair(dtype: torch.dtype, device: str, ours_channels_last: bool, theirs_channels_last: bool):
    """(our TAESD, diffusers' AutoencoderTiny) holding the same random weights: diffusers' default init, saved as an
    AutoencoderTiny folder and loaded by ours through load_taesd (its diffusers-folder key rules)."""
    import diffusers
    from ldm_scratch.fast.taesd import load_taesd
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderTiny().eval()
    folder = Path(tempfile.mkdtemp()) / "taesd"
    theirs.save_pretrained(folder)
    ours = load_taesd(folder, dtype=dtype).to(device)
    theirs = theirs.to(device, dtype)
    for model, flag in ((ours, ours_channels_last), (theirs, theirs_channels_last)):
        if flag:
            model.to(memory_format=torch.channels_last)
    return ours, theirs


def lcm_pipelines(ours, theirs, taesd_pair=None):
    """The loaded pipelines with the LCM sampler / LCMScheduler, the same networks (and TAESD as the VAE if given)."""
    import diffusers
    from ldm_scratch.pipeline import StableDiffusion
    vae = ours.vae if taesd_pair is None else taesd_pair[0]
    mine = StableDiffusion(ours.text_encoder, ours.unet, vae, ours.config, tokenizer=ours.tokenizer,
                           device=ours.device)
    components = {**theirs.components, "scheduler": diffusers.LCMScheduler.from_config(theirs.scheduler.config)}
    if taesd_pair is not None:
        components["vae"] = taesd_pair[1]
    reference = diffusers.StableDiffusionPipeline(**components)
    reference.set_progress_bar_config(disable=True)
    return mine, reference


def lcm_runs(mine, reference) -> tuple:
    return (lambda: mine.txt2img(PROMPT, steps=LCM_STEPS, sampler="lcm", guidance_scale=1.0, seed=0,
                                 output_type="np", progress=False),
            lambda: reference(PROMPT, num_inference_steps=LCM_STEPS, guidance_scale=1.0,
                              generator=torch.Generator().manual_seed(0), output_type="np").images)


def fast_runs(ours, theirs, steps: int, row: str) -> tuple:
    """The txt2img row with DeepCache or ToMe (row). The packages patch diffusers' UNet in place, so they are
    switched on for the call only: the other rows keep timing the plain UNet."""
    import tomesd
    from DeepCache import DeepCacheSDHelper
    option = {"deepcache": dict(deepcache_interval=DEEPCACHE_INTERVAL), "tome": dict(tome_ratio=TOME_RATIO)}[row]

    def reference():
        if row == "deepcache":
            helper = DeepCacheSDHelper(pipe=theirs)
            helper.set_params(cache_interval=DEEPCACHE_INTERVAL, cache_branch_id=0)
            helper.enable()
            undo = helper.disable
        else:
            tomesd.apply_patch(theirs, ratio=TOME_RATIO, use_rand=False)
            undo = lambda: tomesd.remove_patch(theirs)          # noqa: E731
        try:
            return theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(0), output_type="np").images
        finally:
            undo()
    return (lambda: ours.txt2img(PROMPT, NEGATIVE, steps=steps, sampler="ddim", seed=0, output_type="np",
                                 progress=False, **option), reference)


def workloads(ours, theirs, data: dict, steps: int, rows=(), dtype=torch.float32, device="cpu",
              channels_last=(True, False)) -> dict[str, tuple]:
    """row → (ours(), theirs()): the same computation in each library. The TAESD / LCM rows are built only when
    asked for (`rows`)."""
    from ldm_scratch.latents import decode_latents
    x, t, context, z, ids = (data[k] for k in ("x", "t", "context", "z", "ids"))
    extra = {}
    if {"taesd", "lcm_taesd"} & set(rows):
        pair = load_taesd_pair(dtype, device, *channels_last)
        extra["taesd"] = (lambda: pair[0].decoder(z), lambda: pair[1].decode(z).sample)
        if "lcm_taesd" in rows:
            extra["lcm_taesd"] = lcm_runs(*lcm_pipelines(ours, theirs, pair))
    if "lcm" in rows:
        extra["lcm"] = lcm_runs(*lcm_pipelines(ours, theirs))
    for row in {"deepcache", "tome"} & set(rows):
        extra[row] = fast_runs(ours, theirs, steps, row)
    return {**extra,
        "unet": (lambda: ours.unet(x, t, context),
                 lambda: theirs.unet(x, t, encoder_hidden_states=context).sample),
        "vae": (lambda: ours.vae.decode(z),
                lambda: theirs.vae.decode(z).sample),
        "vae_pipeline": (lambda: decode_latents(ours.vae, z, ours.config.latent_scale, ours.device),
                         lambda: theirs.vae.decode(z / theirs.vae.config.scaling_factor).sample),
        "text": (lambda: ours.text_encoder(ids),
                 lambda: theirs.text_encoder(ids).last_hidden_state),
        "txt2img": (lambda: ours.txt2img(PROMPT, NEGATIVE, steps=steps, sampler="ddim", seed=0, output_type="np",
                                         progress=False),
                    lambda: theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                                   generator=torch.Generator().manual_seed(0), output_type="np").images),
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(pair: tuple, warmup: int, repeats: int, device: str) -> tuple[list[float], list[float]]:
    """Seconds per call for ours and theirs, alternating so that drifts in machine load hit both alike."""
    times = ([], [])
    with torch.inference_mode():
        for _ in range(warmup):
            for run in pair:
                run()
        for _ in range(repeats):
            for run, record in zip(pair, times):
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                record.append(time.perf_counter() - start)
    return times


def timed(fn) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def switched_pairs(switch, run, pairs: int, names: tuple[str, str], probe=None) -> None:
    """Time `run` with a fast path off and on (`switch(False)` / `switch(True)`), one warm call each, then `pairs`
    interleaved pairs whose order alternates, so that drifts in machine load hit both alike. Prints the medians, the
    median paired ratio on/off and, with `probe` (a counter read before and after each call), its median change."""
    times, counts = {False: [], True: []}, {False: [], True: []}
    for on in (False, True):                                           # warm both paths (packing, allocator)
        switch(on)
        run()
    for i in range(pairs):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            switch(on)
            before = probe() if probe else 0
            times[on].append(timed(run))
            counts[on].append((probe() if probe else 0) - before)
    for on, name in zip((False, True), names):
        extra = f", {probe.__name__.replace('_', ' ')} per call {statistics.median(counts[on]):.0f}" if probe else ""
        print(f"UNet step, {name}: median {statistics.median(times[on]):.3f} s "
              f"(range {min(times[on]):.2f}–{max(times[on]):.2f}){extra}")
    ratios = [b / a for a, b in zip(times[False], times[True])]
    print(f"paired ratio {names[1]} / {names[0]}: median {statistics.median(ratios):.3f}")


def unet_flops(dtype: torch.dtype) -> int:
    """FLOPs of one CFG UNet step (batch 2, 64×64), counted on the meta device: no memory, no compute."""
    from torch.utils.flop_counter import FlopCounterMode
    from ldm_scratch.unet import UNet
    with torch.device("meta"):
        unet = UNet().to(dtype)
        x, context = torch.empty(2, 4, 64, 64, dtype=dtype), torch.empty(2, 77, 768, dtype=dtype)
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            unet(x, torch.full((2,), 500.0), context)
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: str, n: int = 4096, repeats: int = 5) -> float:
    """The machine's practical peak in GFLOP/s: the best of `repeats` n×n matmuls (2n³ FLOPs each)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    with torch.inference_mode():
        a @ b
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# Peak memory: one fresh process per measurement
# ---------------------------------------------------------------------------------------------------------------

def diffusers_folder(path: Path) -> Path:
    """The same weights saved once in diffusers' folder layout (what most diffusers users load), beside the file."""
    folder = path.with_suffix(".diffusers")
    if not (folder / "model_index.json").exists():
        print(f"writing {folder} (diffusers folder layout of the same weights) …", flush=True)
        load_theirs(path, torch.float32, "cpu", False).save_pretrained(folder)
    return folder


def load_theirs_from_folder(folder: Path, dtype: torch.dtype, device: str, channels_last: bool):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                             requires_safety_checker=False, local_files_only=True)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes: VmHWM, which starts afresh at exec. (ru_maxrss does not on
    Linux: a child started by a parent holding two full models would report the parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: a child gets a clean count


def memory_child(args) -> None:
    """Run in a subprocess: load one library's models, run one txt2img, print a JSON line."""
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    nothing = {k: None for k in ("x", "t", "context", "z", "ids")}
    if args.memory_child == "ours":
        pipe = load_ours(args.checkpoint, dtype, args.device, not args.no_channels_last, args.prepack)
        load_s = time.perf_counter() - start
        run = workloads(pipe, None, nothing, args.steps)["txt2img"][0]
    else:
        if args.memory_child == "diffusers":
            pipe = load_theirs(args.checkpoint, dtype, args.device, args.diffusers_channels_last)
        else:
            pipe = load_theirs_from_folder(diffusers_folder(args.checkpoint), dtype, args.device,
                                           args.diffusers_channels_last)
        load_s = time.perf_counter() - start
        run = workloads(None, pipe, nothing, args.steps)["txt2img"][1]
    after_load = peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        run()
    print(json.dumps({"load_s": load_s, "txt2img_s": time.perf_counter() - start, "peak_after_load": after_load,
                      "peak_rss": peak_rss()}))


def measure_memory(args) -> dict[str, list[dict]]:
    diffusers_folder(args.checkpoint)   # written once, before anything is measured
    results = {"ours": [], "diffusers": [], "diffusers-folder": []}
    forwarded = ["--checkpoint", str(args.checkpoint), "--dtype", args.dtype, "--device", args.device,
                 "--steps", str(args.steps), "--threads", str(torch.get_num_threads())]
    forwarded += ["--no-channels-last"] * args.no_channels_last
    forwarded += {True: ["--prepack"], False: ["--no-prepack"], None: []}[args.prepack]
    forwarded += ["--diffusers-channels-last"] * args.diffusers_channels_last
    for _ in range(args.memory_repeats):
        for which in results:
            out = subprocess.run([sys.executable, __file__, "--memory-child", which] + forwarded,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"the {which} memory run failed:\n{out.stderr[-3000:]}")
            results[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  memory {which}: {results[which][-1]}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_FILE,
                   help="an SD v1 single file (default: random weights written once to %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per library and row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per library and row first")
    p.add_argument("--only", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--steps", type=int, default=4, help="sampler steps of the txt2img row")
    p.add_argument("--memory-repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's choice)")
    p.add_argument("--no-channels-last", action="store_true", help="run ours in PyTorch's default layout")
    p.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                   help="ours with load_pipeline(..., prepack=True / False): the UNet's weights packed for oneDNN "
                   "once (ldm_scratch/fast/prepack.py); default: load_pipeline's (packed in bfloat16 on the CPU)")
    p.add_argument("--diffusers-channels-last", action="store_true", help="run diffusers' UNet/VAE channels_last")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="keep N competing CPU-bound processes running while timing (a busy machine)")
    p.add_argument("--memory-child", choices=["ours", "diffusers", "diffusers-folder"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = set(args.only) - set(ROWS)
    if unknown:
        p.error(f"--only: unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    return args


def competing_processes(n: int) -> list[subprocess.Popen]:
    """n processes that each keep one core busy with a pure-Python loop (no memory traffic to speak of)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None) -> None:
    args = parse_args(argv)
    busy = [] if args.memory_child else competing_processes(args.busy)
    try:
        run_benchmark(args)
    finally:
        for process in busy:
            process.kill()


def run_benchmark(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    import diffusers
    import transformers
    dtype = DTYPES[args.dtype]
    args.checkpoint = synthetic_file(args.checkpoint)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                          "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                          "load_average_start": os.getloadavg()},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k != "memory_child"},
              "rows": {}}
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads, "
          f"{args.device}, {args.dtype}, {args.busy} competing processes, load average {os.getloadavg()[0]:.1f}",
          flush=True)

    speed_rows = [r for r in args.only if r != "memory"]
    if speed_rows:
        start = time.perf_counter()
        ours = load_ours(args.checkpoint, dtype, args.device, not args.no_channels_last, args.prepack)
        print(f"loaded ours in {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        theirs = load_theirs(args.checkpoint, dtype, args.device, args.diffusers_channels_last)
        print(f"loaded diffusers in {time.perf_counter() - start:.1f} s", flush=True)
        runs = workloads(ours, theirs, inputs(dtype, args.device), args.steps, speed_rows, dtype, args.device,
                         (not args.no_channels_last, args.diffusers_channels_last))
        for row in speed_rows:
            mine, reference = interleaved(runs[row], args.warmup, args.repeats, args.device)
            report["rows"][row] = {"ours_s": statistics.median(mine), "diffusers_s": statistics.median(reference),
                                   "ours_all": mine, "diffusers_all": reference}
            r = report["rows"][row]
            print(f"  {row}: ours {r['ours_s']:.3f} s, diffusers {r['diffusers_s']:.3f} s "
                  f"({r['ours_s'] / r['diffusers_s']:.3f}×)", flush=True)
        del ours, theirs, runs
        if "unet" in speed_rows:
            flops = unet_flops(dtype)
            peak = matmul_peak(dtype, args.device)
            unet = report["rows"]["unet"]
            report["flops"] = {"unet_step_tflop": flops / 1e12, "matmul_peak_gflops": peak,
                               "ours_gflops": flops / unet["ours_s"] / 1e9,
                               "diffusers_gflops": flops / unet["diffusers_s"] / 1e9}
    if "memory" in args.only:
        mem = measure_memory(args)
        for which in mem:
            report.setdefault("memory", {})[which] = {
                "peak_rss_gib": statistics.median(m["peak_rss"] for m in mem[which]) / 2 ** 30,
                "load_s": statistics.median(m["load_s"] for m in mem[which]), "runs": mem[which]}
    report["machine"]["load_average_end"] = os.getloadavg()
    print_table(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


def print_table(report: dict, args) -> None:
    labels = {"unet": "UNet step, CFG [2,4,64,64]", "vae": "VAE decode 512²",
              "vae_pipeline": "VAE decode 512², the pipeline's way", "text": "text encode [2,77]",
              "txt2img": f"txt2img 512², {args.steps} DDIM steps", "taesd": "TAESD decode 512²",
              "lcm": f"txt2img 512², LCM {LCM_STEPS} steps, no CFG", "lcm_taesd": f"… LCM {LCM_STEPS} steps + TAESD",
              "deepcache": f"… {args.steps} steps + DeepCache N={DEEPCACHE_INTERVAL}",
              "tome": f"… {args.steps} steps + ToMe ratio {TOME_RATIO}"}
    print(f"\n{'':42} {'ours':>10} {'diffusers':>10} {'ours/diffusers':>15}")
    for row, r in report["rows"].items():
        print(f"{labels[row]:42} {r['ours_s']:9.3f}s {r['diffusers_s']:9.3f}s {r['ours_s'] / r['diffusers_s']:14.3f}×")
    rows = report["rows"]
    if "vae_pipeline" in rows and "vae" in rows:
        print(f"{'direct vae.decode / pipeline decode, ours':42} "
              f"{rows['vae']['ours_s'] / rows['vae_pipeline']['ours_s']:20.3f}×")
    if "taesd" in rows and "vae" in rows:
        print(f"{'TAESD / KL-VAE decode, ours':42} {rows['taesd']['ours_s'] / rows['vae']['ours_s']:20.3f}×")
    for row in ("deepcache", "tome"):
        if row in rows and "txt2img" in rows:
            print(f"{row + ' / plain txt2img, ours':42} {rows[row]['ours_s'] / rows['txt2img']['ours_s']:20.3f}×")
    if "memory" in report:
        m = report["memory"]
        for theirs, how in (("diffusers", "same single file"), ("diffusers-folder", "diffusers folder")):
            print(f"{'load time (' + how + ')':42} {m['ours']['load_s']:9.2f}s {m[theirs]['load_s']:9.2f}s "
                  f"{m['ours']['load_s'] / m[theirs]['load_s']:14.3f}×")
            print(f"{'peak RSS load+txt2img (' + how + ')':42} {m['ours']['peak_rss_gib']:7.2f}GiB "
                  f"{m[theirs]['peak_rss_gib']:7.2f}GiB {m['ours']['peak_rss_gib'] / m[theirs]['peak_rss_gib']:14.3f}×")
    if "flops" in report:
        f = report["flops"]
        print(f"\nUNet step: {f['unet_step_tflop']:.3f} TFLOP; ours {f['ours_gflops']:.0f} GFLOP/s, diffusers "
              f"{f['diffusers_gflops']:.0f} GFLOP/s; matmul peak {f['matmul_peak_gflops']:.0f} GFLOP/s "
              f"(ours at {100 * f['ours_gflops'] / f['matmul_peak_gflops']:.0f} % of it)")
    la = report["machine"]
    print(f"load average: start {la['load_average_start'][0]:.1f}, end {la['load_average_end'][0]:.1f}")


if __name__ == "__main__":
    main()
