"""The parts `train.py` builds its recipe from, each in its own file; `train.py` itself reads as the two stages.

    config.py    TrainConfig: everything that decides a run
    dataset.py   the fixed training set: rendered once, tokenised once, encoded to latents once
    run.py       a run's live state: processes (DDP), run directory, log, checkpoints, resuming
    state.py     the resume state on disk: safetensors + JSON (no pickle), written atomically
    sampling.py  the periodic sample grids (CFG sampling with the in-training networks)
    command.py   the `train` command's flags (one per TrainConfig field) and what it runs

Every public name here is also importable from `ldm_scratch.train`.
"""
