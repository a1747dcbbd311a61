"""The house rules (README, "The house"), checked on the source itself.

- The data flows one way, so the imports do: every module of ldm_scratch/ belongs to one layer of LAYERS and may
  import only from its own layer or a lower one. The networks (attention.py, clip.py, unet.py, vae.py) know nothing
  but each other's building blocks: no file layout, no memory tricks, no prompts, no pipeline, no command line.
- Small rooms: no source file over MAX_LINES lines.

Imports are read with `ast` from every file, including imports inside functions (a lazy import is still a
dependency), so the test cannot be fooled by moving an import into a function body.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ldm_scratch"
MAX_LINES = 400

# Lowest first. A module may import from its own layer and the layers before it, never from a later one.
LAYERS = [
    ("foundations", {"attention", "diffusion", "vocabulary", "images", "data", "fast.memory", "files",
                     "control_images"}),
    ("networks and text", {"clip", "spatial_transformer", "unet", "controlnet", "vae", "tokenizer", "prompts",
                           "samplers"}),
    ("configs", {"configs"}),
    ("files and speed", {"checkpoint", "fast", "seeds", "arguments", "lora", "merging", "parameters",
                         "textual_inversion"}),
    ("pipeline", {"pipeline", "latents", "loader", "guidance", "editing", "control", "conditioning", "instruct",
                  "upscale"}),
    ("training", {"train", "training"}),
    ("command line", {"cli", "__main__", "__init__"}),
]
# The networks, as the paper draws them: they may import nothing of ours but the attention function.
MODEL_FILES = {"attention": set(), "clip": {"attention"}, "spatial_transformer": {"attention"},
               "unet": {"attention", "spatial_transformer"}, "vae": {"attention"},
               "controlnet": {"attention", "spatial_transformer", "unet"}}


def module_name(path: Path) -> str:
    """ldm_scratch/fast/vae_bands.py → "fast.vae_bands"; ldm_scratch/samplers/__init__.py → "samplers"."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The ldm_scratch modules a file imports (relative or absolute), as module names like "fast.vae_bands"."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                found.add(".".join(base + [node.module]))
            else:                                    # `from . import train`: the names are modules
                found.update(".".join(base + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm_scratch."):
            found.add(node.module.removeprefix("ldm_scratch."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("ldm_scratch.") for a in node.names if a.name.startswith("ldm_scratch."))
    return {module for module in found if (PACKAGE / module.replace(".", "/")).with_suffix(".py").is_file()
            or (PACKAGE / module.replace(".", "/")).is_dir()} - {name}


def layer_of(module: str) -> int:
    """The layer of a module: its own entry, else its package's (samplers.ddim → samplers)."""
    for candidate in (module, module.split(".")[0]):
        for index, (_, members) in enumerate(LAYERS):
            if candidate in members:
                return index
    raise KeyError(module)


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = []
    for path in SOURCES:
        try:
            layer_of(module_name(path))
        except KeyError:
            unplaced.append(module_name(path))
    assert not unplaced, f"add these modules to LAYERS (and to the README's table of the house): {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    name = module_name(path)
    upward = {m: LAYERS[layer_of(m)][0] for m in imports_of(path) if layer_of(m) > layer_of(name)}
    assert not upward, f"{name} ({LAYERS[layer_of(name)][0]}) imports from a later layer: {upward}"


@pytest.mark.parametrize("model", sorted(MODEL_FILES))
def test_model_files_import_only_the_attention_function(model):
    imported = imports_of(PACKAGE / f"{model}.py")
    assert imported <= MODEL_FILES[model], f"{model}.py imports {sorted(imported - MODEL_FILES[model])}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_is_over_the_line_limit(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines (> {MAX_LINES}): split it by idea"


def test_the_checker_sees_lazy_and_upward_imports(tmp_path, monkeypatch):
    """The rules above can fail: a lazy import inside a function of a model file is found, and is upward."""
    fake = tmp_path / "ldm_scratch"
    (fake / "fast").mkdir(parents=True)
    for name in ("attention.py", "pipeline.py", "fast/__init__.py"):
        (fake / name).write_text("")
    (fake / "unet.py").write_text("from .attention import attention\n\ndef f():\n    from .fast import install\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert imports_of(fake / "unet.py") == {"attention", "fast"}
    assert layer_of("fast") > layer_of("unet")
