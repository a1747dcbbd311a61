"""Training never runs pickled code and never loses work (issue 14, security items 1 and 4).

- the resume state is safetensors + JSON: a planted pickle (`ckpt.pt`, or a torch.save file named
  `ckpt.safetensors`) is refused, and the code it carries never runs;
- a fresh start over an earlier run, an --export onto an existing file, and a resume whose flags change the run's
  recipe are refused (the message names the problem and the fix) before anything heavy runs;
- changes that do not alter the training are applied on resume, with a note;
- a process killed half-way through writing a checkpoint leaves the previous one loadable, and resuming from it
  ends exactly where an uninterrupted run does.
"""
import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ldm_scratch.train as recipe
from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.train import load_checkpoint, open_checkpoint, save_checkpoint, train
from ldm_scratch.training.command import add_train_arguments, cmd_train
from test_train import short_run, tiny_tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "ldm_scratch"
# a 2+2-step recipe that checkpoints every 2 steps: a few seconds from scratch
TINY = dict(n_images=32, vae_steps=4, steps=4, checkpoint_every=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A run directory whose checkpoint is at step 2 of stage 1 (stop_at=2), and its recipe."""
    out = tmp_path_factory.mktemp("stage1")
    cfg = short_run(out, **TINY)
    train(cfg, resume=False, stop_at=2)
    return out, cfg


@pytest.fixture
def run_dir(stage1_run, tmp_path):
    """A private copy of the stage-1 run (tests may damage it), and its recipe pointed there."""
    source, cfg = stage1_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out, dataclasses.replace(cfg, out_dir=str(out))


class HeavyWork(Exception):
    """Raised instead of starting a run: a refusal must come before it."""


@pytest.fixture
def no_heavy_work(monkeypatch):
    def start_run(*args, **kwargs):
        raise HeavyWork("start_run was reached: the networks would be built and the data rendered")
    monkeypatch.setattr(recipe, "start_run", start_run)


def cli(*argv: str) -> int:
    """`ldm-scratch train ARGV`, errors raised (cli.main turns them into 'error: …', exit 2)."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return cmd_train(parser.parse_args(list(argv)))


def model_config_file(folder: Path, **changes) -> str:
    path = folder / "model.json"
    path.write_text(dataclasses.replace(tiny_tiny_model(), **changes).to_json())
    return str(path)


def test_no_unpickling_anywhere_in_the_package():
    offenders = [f"{path.relative_to(PACKAGE)}:{number}" for path in PACKAGE.rglob("*.py")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if "weights_only=False" in line.replace(" ", "") or "pickle.load" in line]
    assert offenders == []


class WritesMarker:
    """Unpickling this runs `exec`, which writes a marker file: what a planted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_the_planted_payload_really_runs_code_when_unpickled(tmp_path):
    """The payload of the next test is live: torch.load(weights_only=False) on it writes the marker."""
    marker = tmp_path / "marker"
    torch.save({"vae": WritesMarker(marker)}, tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("name", ["ckpt.pt", "ckpt.safetensors"])
def test_a_planted_pickle_is_refused_and_never_runs(run_dir, tmp_path, name, no_heavy_work):
    out, cfg = run_dir
    marker = tmp_path / "marker"
    (out / "ckpt.safetensors").unlink()
    torch.save({"vae": WritesMarker(marker)}, out / name)
    with pytest.raises(CheckpointError, match="pickle.*not opened.*--no-resume --force"):
        train(cfg, resume=True)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(out / name)
    with pytest.raises(CheckpointError, match="pickle"):
        cli("--out", str(out))
    assert not marker.exists()


def damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def foreign_safetensors(path: Path) -> None:
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2)}, str(path))


def future_version(path: Path) -> None:
    state = load_checkpoint(path)
    from ldm_scratch.training import state as state_file
    monkey = pytest.MonkeyPatch()
    monkey.setattr(state_file, "FORMAT_VERSION", 99)
    save_checkpoint(path, **state)
    monkey.undo()


def edit_state(path: Path, **changes) -> None:
    """Rewrite a checkpoint with some of its values changed, as a hand-edited or tampered file would be."""
    save_checkpoint(path, **{**load_checkpoint(path), **changes})


def into_stage2(path: Path) -> None:
    save_checkpoint(path, **{**load_checkpoint(path), "stage": "diffusion", "step": 0})


# (id, how the run directory is prepared, what is called, the exception, words of its message)
REFUSALS = [
    ("export-onto-a-file", lambda out: (out / "mine.safetensors").write_text("precious"),
     lambda out, cfg: cli("--out", str(out), "--export", str(out / "mine.safetensors")),
     FileExistsError, ["mine.safetensors exists", "--force"]),
    ("export-onto-a-folder", None, lambda out, cfg: cli("--out", str(out), "--export", str(out)),
     ValueError, ["is a folder", "give a file name"]),
    ("export-into-a-missing-folder", None,
     lambda out, cfg: cli("--out", str(out), "--export", str(out / "nowhere" / "m.safetensors")),
     FileNotFoundError, ["does not exist", "create it"]),
    ("no-resume-over-a-run", None,
     lambda out, cfg: cli("--out", str(out), "--no-resume", "--model-config", model_config_file(out.parent)),
     FileExistsError, ["already holds a run", "ckpt.safetensors", "--force"]),
    ("api-fresh-start-over-a-run", None, lambda out, cfg: train(cfg, resume=False),
     FileExistsError, ["already holds a run", "force=True"]),
    ("fresh-start-over-a-finished-model", lambda out: (out / "ckpt.safetensors").rename(out / "model.safetensors"),
     lambda out, cfg: train(cfg, resume=True), FileExistsError, ["model.safetensors", "no checkpoint to resume"]),
    ("old-pickled-ckpt", lambda out: (out / "ckpt.safetensors").rename(out / "ckpt.pt"),
     lambda out, cfg: train(cfg), CheckpointError, ["ckpt.pt is a Python pickle", "--no-resume --force"]),
    ("resume-with-another-seed", None, lambda out, cfg: cli("--out", str(out), "--seed", "1"),
     ValueError, ["another recipe", "seed: 0 (checkpoint) vs 1 (given)", "--no-resume --force"]),
    ("resume-with-another-model", None,
     lambda out, cfg: cli("--out", str(out), "--model-config", model_config_file(out.parent, image_size=64)),
     ValueError, ["another recipe", "model:"]),
    ("api-resume-with-another-lr", None, lambda out, cfg: train(dataclasses.replace(cfg, lr=0.01)),
     ValueError, ["lr: 0.003 (checkpoint) vs 0.01 (given)", "--new-stage2"]),
    ("new-stage2-once-stage-2-began", lambda out: into_stage2(out / "ckpt.safetensors"),
     lambda out, cfg: cli("--out", str(out), "--new-stage2", "--lr", "0.01"),
     ValueError, ["already in stage 2", "drop new_stage2"]),
    ("truncated-checkpoint", lambda out: damage(out / "ckpt.safetensors"), lambda out, cfg: train(cfg),
     CheckpointError, ["damaged or not a safetensors file", "--no-resume --force"]),
    ("someone-elses-safetensors", lambda out: foreign_safetensors(out / "ckpt.safetensors"),
     lambda out, cfg: train(cfg), CheckpointError, ["not a training resume state"]),
    ("unknown-train-config-field",
     lambda out: edit_state(out / "ckpt.safetensors", train_config=json.dumps({
         **json.loads(load_checkpoint(out / "ckpt.safetensors")["train_config"]), "ema": 0.999})),
     lambda out, cfg: cli("--out", str(out)), CheckpointError, ["TrainConfig is unreadable", "ema"]),
    ("another-number-of-processes",
     lambda out: edit_state(out / "ckpt.safetensors", generators=2 * load_checkpoint(out / "ckpt.safetensors")[
         "generators"]),
     lambda out, cfg: train(cfg), ValueError, ["written by 2 process(es) but this run has 1", "--nproc_per_node"]),
    ("future-format-version", lambda out: future_version(out / "ckpt.safetensors"), lambda out, cfg: train(cfg),
     CheckpointError, ["format version 99", "reads version 1"]),
]


@pytest.mark.parametrize("prepare, call, error, words", [case[1:] for case in REFUSALS],
                         ids=[case[0] for case in REFUSALS])
def test_refusals_come_first_and_say_what_to_do(run_dir, no_heavy_work, prepare, call, error, words):
    out, cfg = run_dir
    if prepare is not None:
        prepare(out)
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    with pytest.raises(error) as raised:
        call(out, cfg)
    assert type(raised.value) is error
    missing = [word for word in words if word not in str(raised.value)]
    assert missing == [], f"{missing} not in: {raised.value}"
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before  # nothing touched


def test_force_and_flags_that_match_let_the_run_start(run_dir, no_heavy_work, tmp_path):
    """Each refused case above goes through when the user asks for it: the run starts (HeavyWork here)."""
    out, cfg = run_dir
    (tmp_path / "mine.safetensors").write_text("precious")
    attempts = [lambda: cli("--out", str(out)),                                    # resuming needs only --out
                lambda: cli("--out", str(out), "--seed", "0", "--lr", "0.003"),    # flags equal to the run's
                lambda: cli("--out", str(out), "--export", str(tmp_path / "mine.safetensors"), "--force"),
                lambda: cli("--out", str(out), "--no-resume", "--force"),
                lambda: train(cfg, resume=False, force=True)]
    for attempt in attempts:
        with pytest.raises(HeavyWork):
            attempt()


def test_safe_changes_are_applied_on_resume_and_said(run_dir, capsys):
    out, cfg = run_dir
    asked = dataclasses.replace(cfg, checkpoint_every=3, sample_every=7, progress=True, lr=0.01)
    with pytest.raises(ValueError, match="lr"):                      # lr changes the training: refused ...
        open_checkpoint(asked, resume=True, new_stage2=False)
    resumed, checkpoint = open_checkpoint(asked, resume=True, new_stage2=True)  # ... unless stage 2 is new
    assert (resumed.checkpoint_every, resumed.sample_every, resumed.progress, resumed.lr) == (3, 7, True, 0.01)
    assert resumed.seed == cfg.seed and resumed.model == cfg.model
    notes = "\n".join(checkpoint["notes"])
    assert "checkpoint_every = 3" in notes and "lr = 0.01" in notes and "safe to change" in notes


def test_export_copies_the_model_atomically(run_dir, tmp_path):
    """A resumed CLI run to the end: --export writes a new file (replaced only with --force), no .partial left."""
    out, _ = run_dir
    target = tmp_path / "exported.safetensors"
    assert cli("--out", str(out), "--no-progress", "--export", str(target)) == 0
    assert target.read_bytes() == (out / "model.safetensors").read_bytes()
    target.write_text("older export")
    assert cli("--out", str(out), "--no-progress", "--export", str(target), "--force") == 0
    assert target.read_bytes() == (out / "model.safetensors").read_bytes()
    assert list(tmp_path.glob("*.partial")) == [] and list(out.glob("*.partial")) == []


def test_the_resume_state_round_trips_exactly(stage1_run, tmp_path):
    """save_checkpoint(load_checkpoint(f)) holds the same bytes: every tensor, float and string survives."""
    out, _ = stage1_run
    state = load_checkpoint(out / "ckpt.safetensors")
    save_checkpoint(tmp_path / "again.safetensors", **state)
    assert (tmp_path / "again.safetensors").read_bytes() == (out / "ckpt.safetensors").read_bytes()
    assert state["stage"] == "vae" and state["step"] == 2 and len(state["vae_loss"]) == 2
    assert set(state["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


KILLED_DURING_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from ldm_scratch.train import TrainConfig, train
real_replace, saves = os.replace, []

def dies_half_way(source, target, *args, **kwargs):
    # the second checkpoint (stage 2, step 0): cut the new file to half its bytes, then SIGKILL before the rename,
    # as if the machine died while the bytes were still being written
    if Path(target).name == "ckpt.safetensors":
        saves.append(target)
        if len(saves) == 2:
            os.truncate(source, os.path.getsize(source) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, target, *args, **kwargs)

os.replace = dies_half_way
train(TrainConfig.from_json(sys.argv[1]), resume=False)
"""


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    cfg = short_run(tmp_path / "killed", **TINY)
    child = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, cfg.to_json()], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    out = Path(cfg.out_dir)
    partial = out / "ckpt.safetensors.partial"
    assert partial.is_file() and partial.stat().st_size < (out / "ckpt.safetensors").stat().st_size
    previous = load_checkpoint(out / "ckpt.safetensors")            # the stage-1 checkpoint, whole
    assert (previous["stage"], previous["step"]) == ("vae", 2)
    rest = train(cfg, resume=True)                                   # resumes from it, ignoring the .partial
    whole = train(short_run(tmp_path / "whole", **TINY), resume=False)
    assert rest["vae_loss"] == whole["vae_loss"] and rest["loss"] == whole["loss"]
    assert json.loads(load_checkpoint(out / "ckpt.safetensors")["train_config"]) == json.loads(cfg.to_json())
    assert not partial.exists()                                      # the next save of that name replaced it
