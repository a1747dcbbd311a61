"""Which prediction type a checkpoint wants — ε or v (diffusion.eps_and_x0) — and why.

The weights do not say: SD 2's 768-v (v2-1_768-ema-pruned) and 512-base (v2-1_512-ema-pruned) files have the same
keys and shapes. So, in this order (the first that answers wins; `inspect` prints which one did):

1. `prediction_type=` given by the caller (load_pipeline / load_models) — the user knows best;
2. a `.yaml` beside the file with the same stem (the AUTOMATIC1111 web UI's convention: `model.yaml` next to
   `model.safetensors`), as CompVis writes them: `parameterization: "v"` → v, absent or "eps" → ε;
3. a diffusers folder's scheduler/scheduler_config.json `prediction_type`;
4. SD v1, inpainting and the tiny model → ε (every one of them was trained on ε; v2-inpainting-inference.yaml has
   no parameterization);
   The ×4 upscaler (7-channel UNet) → v: its one official file was trained so (x4-upscaling.yaml);
5. an SD 2 file named like the official ones: "768" in the name → v, "512" or "base" → ε;
6. any other SD 2 file → v: the 2.x files people run (2.1-768 and its fine-tunes) predict v, and a v-model
   sampled as ε makes grey mush while the opposite mistake is as visible — so choose the common one and say so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..diffusion import PREDICTION_TYPES
from .tensor_file import CheckpointError

PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}   # CompVis' names → ours (= diffusers')
MAX_YAML_BYTES = 1 << 20                                      # inference yamls are ~2 KB


def choose_prediction_type(path: Path, kind: str, explicit: str | None = None) -> tuple[str, str]:
    """(prediction type, the reason in words) for the model at `path` of this kind (loading.identify's name)."""
    if explicit is not None:
        if explicit not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {explicit!r}")
        return explicit, "given explicitly (prediction_type=…)"
    yaml_path = path.with_suffix(".yaml") if path.is_file() else path.with_name(path.name + ".yaml")
    if yaml_path.is_file():
        value = yaml_parameterization(yaml_path)
        return PARAMETERIZATIONS[value], f"{yaml_path.name} beside the file says parameterization: {value}"
    scheduler = path / "scheduler" / "scheduler_config.json"
    if path.is_dir() and scheduler.is_file():
        value = json.loads(scheduler.read_text()).get("prediction_type", "epsilon")
        if value not in PREDICTION_TYPES:
            raise CheckpointError(f"{scheduler}: prediction_type {value!r} is not one of {', '.join(PREDICTION_TYPES)}")
        return value, f"scheduler/scheduler_config.json says prediction_type: {value}"
    if kind == "sd-v2-upscaler":
        return "v_prediction", 'the SD 2 ×4 upscaler predicts v (x4-upscaling.yaml: parameterization "v")'
    if not kind.startswith("sd-v2") or kind.endswith("inpainting"):
        return "epsilon", f"{kind} models are trained to predict ε"
    name = path.name.lower()
    if "768" in name:
        return "v_prediction", 'the name says 768: SD 2 768-v files predict v'
    if "512" in name or "base" in name:
        return "epsilon", 'the name says 512/base: SD 2 512-base predicts ε'
    return "v_prediction", ("SD 2 default: 768-v and 512-base files cannot be told apart by their keys, and the "
                            "2.x files most used (2.1-768 and fine-tunes) predict v. For an ε model put its .yaml "
                            "beside it or pass prediction_type='epsilon'")


def yaml_parameterization(path: Path) -> str:
    """`model.params.parameterization` of a CompVis config ("eps" when absent). Parsed with yaml.safe_load (plain
    data only, never Python objects) when PyYAML is installed, else by a one-line reader for that key."""
    if path.stat().st_size > MAX_YAML_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size:,} bytes: not an inference config (those are ~2 KB)")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        import yaml
    except ImportError:
        match = re.search(r"""^\s*parameterization:\s*["']?(\w+)["']?\s*(#.*)?$""", text, re.MULTILINE)
        value = match[1] if match else "eps"
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise CheckpointError(f"{path} is not valid YAML ({error}); fix or remove it, or pass "
                                  "prediction_type= explicitly") from None
        model = data.get("model") if isinstance(data, dict) else None
        params = model.get("params") if isinstance(model, dict) else None
        value = params.get("parameterization", "eps") if isinstance(params, dict) else "eps"
    if value not in PARAMETERIZATIONS:
        raise CheckpointError(f"{path}: parameterization {value!r} is not one we sample ({', '.join(PARAMETERIZATIONS)}"
                              "); fix the yaml or pass prediction_type= explicitly")
    return value
