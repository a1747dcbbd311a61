"""The parts `train.py` builds its recipe from, each in its own file; `train.py` itself reads as the two stages.

    config.py    TrainConfig: everything that decides a run
    dataset.py   the fixed training set: rendered once, tokenised once, encoded to latents once
    run.py       a run's live state: processes (DDP), run directory, log, checkpoints, resuming
    state.py     the resume state on disk: safetensors + JSON (no pickle), written atomically
    sampling.py  the periodic sample grids (CFG sampling with the in-training networks)
    command.py   the `train` command's flags (one per TrainConfig field) and what it runs
    controlnet.py         `ldm-scratch train-controlnet`: a ControlNet for the tiny model, the base model frozen
    finetune.py           `ldm-scratch finetune`: LoRA, textual inversion, DreamBooth (+ prior
                          preservation) on a few pictures
    finetune_data.py      a fine-tune's image folder and captions; DreamBooth's generated class images
    finetune_command.py   the `finetune` command's flags
    lora_training.py      trainable LoRA layers (W₀x + (α/r)·B(Ax), B = 0 at the start), kohya/diffusers writers
    instruct.py           a tiny InstructPix2Pix (scripts/train_instruct.py): the recipe, its loss and the run
    instruct_network.py   the UNet widened to 8 input channels (latents + image latents) and its training handles
    instruct_data.py      edit pairs from the data generator; the held-out and validation edit triples

The names of config … command are also importable from `ldm_scratch.train`.
"""
