"""Looking inside and editing through attention (issue 18): DAAM attention maps, prompt-to-prompt, DDIM and
null-text inversion. Everything runs on the attention hook of ldm_scratch/attention.py and its own DDIM loop
(denoise.py), on the pipeline's networks: `pipe.tokenizer`, `pipe.text_encoder`, `pipe.unet`, `pipe.vae`.

    from ldm_scratch import editing
    maps = editing.attention_maps(pipe, "a red circle on a blue background", seed=0)   # {(index, token): [H, W]}
    editing.overlay(maps.image, maps[(3, "circle")])
    source, edited = editing.prompt_to_prompt(pipe, "a red circle on a blue background",
                                              "a green circle on a blue background", seed=0)
    inv = editing.invert(pipe, image, "a red circle on a blue background", null_text=True)
    editing.regenerate(pipe, inv)                                                     # the image back
    source, edited = editing.prompt_to_prompt(pipe, inv.prompt, "a green circle on a blue background",
                                              inversion=inv)
"""
from .inversion import Inversion, invert, regenerate
from .maps import TokenMaps, attention_maps, overlay
from .prompt_to_prompt import prompt_to_prompt, token_alignment

__all__ = ["attention_maps", "overlay", "TokenMaps", "prompt_to_prompt", "token_alignment", "invert", "Inversion",
           "regenerate"]
