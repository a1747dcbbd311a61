"""ldm_scratch: Stable Diffusion v1 (latent diffusion) from scratch, in readable, math-annotated PyTorch.

Data flows one way: text → tokens (tokenizer.py) → embeddings (clip.py); noise → UNet steps (unet.py, samplers/)
→ latents → VAE decoder (vae.py) → pixels. pipeline.py ties them together; checkpoint/ loads official weights;
fast/ is the opt-in CPU speed and memory machinery that load_pipeline installs on the networks it builds.
"""
__version__ = "0.1.0"


def load_tokenizer(path=None):
    """The CLIP BPE tokenizer; see tokenizer.load_tokenizer for where the vocabulary is found."""
    from .tokenizer import load_tokenizer as _load
    return _load(path)


def load_pipeline(path=None, **options):
    """A Stable Diffusion pipeline from an official file or diffusers folder (None: the bundled tiny model);
    options as pipeline.load_pipeline (dtype, device, tokenizer, use_ema, fast=False for the plain networks)."""
    from .loader import load_pipeline as _load
    return _load(path, **options)


def load_controlnet(path, **options):
    """A ControlNet from an official file (control_model.*, .pth/.safetensors, fp16 too) or a diffusers folder;
    options as checkpoint.controlnet_file.load_controlnet (dtype)."""
    from .checkpoint.controlnet_file import load_controlnet as _load
    return _load(path, **options)
