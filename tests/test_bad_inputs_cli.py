"""Bad command lines, each refused before the model is loaded with one line `error: …` and exit status 2, and
Ctrl-C as one line with exit status 130 and no half-written file (issue 14)."""
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import ldm_scratch.loader
from ldm_scratch.cli import main, save_pngs

from pipeline_fixtures import sample_image


@pytest.fixture
def no_loading(monkeypatch):
    """Every case here must be refused before the model is loaded: loading fails the test."""
    def load_pipeline(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")
    monkeypatch.setattr(ldm_scratch.loader, "load_pipeline", load_pipeline)


def _cuda(monkeypatch, available: bool, count: int = 0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# (name, arguments, set-up(monkeypatch, tmp), words of the error)
CASES = [
    ("cuda without CUDA", ["generate", "a fox", "--device", "cuda"], lambda mp, tmp: _cuda(mp, False),
     r"device cuda: PyTorch .* cannot use cuda here .*--device cpu"),
    ("cuda:1 without CUDA", ["generate", "a fox", "--device", "cuda:1"], lambda mp, tmp: _cuda(mp, False),
     r"device cuda:1: PyTorch .* cannot use cuda here"),
    ("a GPU that is not there", ["generate", "a fox", "--device", "cuda:3"], lambda mp, tmp: _cuda(mp, True, 1),
     r"device cuda:3: there are only 1 CUDA device\(s\), numbered from 0"),
    ("not a device", ["generate", "a fox", "--device", "gpu"], None, r"device 'gpu' is not a device name"),
    ("meta", ["generate", "a fox", "--device", "meta"], None, r"device meta holds no data"),
    ("--out is a folder", ["generate", "a fox", "--out", "{tmp}/taken.png"], lambda mp, tmp: (tmp / "taken.png").mkdir(),
     r"--out .*taken.png is a folder, not a file name"),
    ("--force onto a folder", ["generate", "a fox", "--force", "--out", "{tmp}/taken.png"],
     lambda mp, tmp: (tmp / "taken.png").mkdir(), r"--force overwrites files, never a folder"),
    ("img2img strength 0", ["img2img", "a fox", "--init", "{tmp}/init.png", "--strength", "0"], None,
     r"strength 0 denoises nothing"),
    ("inpaint strength 0", ["inpaint", "a fox", "--image", "{tmp}/init.png", "--mask", "{tmp}/init.png",
                            "--strength", "0"], None, r"strength 0 denoises nothing"),
    ("strength NaN", ["img2img", "a fox", "--init", "{tmp}/init.png", "--strength", "nan"], None,
     r"strength must be in \[0, 1\]"),
    ("strength × steps < 1", ["img2img", "a fox", "--init", "{tmp}/init.png", "--strength", "0.1", "--steps", "5"],
     None, r"rounds down to 0 steps"),
    ("steps 0", ["generate", "a fox", "--steps", "0"], None, r"steps must be an int ≥ 1, got 0"),
    ("guidance NaN", ["generate", "a fox", "--guidance", "nan"], None, r"guidance_scale must be a finite number"),
    ("--n 0", ["generate", "a fox", "--n", "0"], None, r"--n must be at least 1, got 0"),
]


@pytest.mark.parametrize("args, setup, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_before_loading_with_one_line(no_loading, monkeypatch, tmp_path, capsys, args, setup, words):
    if setup is not None:
        setup(monkeypatch, tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.png")]
    before = sorted(tmp_path.iterdir())
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert re.search(words, captured.err), captured.err
    assert sorted(tmp_path.iterdir()) == before                   # nothing written, not even a .partial file


def test_an_existing_folder_among_numbered_names_is_skipped_even_with_force(tmp_path):
    """--force overwrites files, never a folder: a folder named like a numbered output is passed over."""
    from ldm_scratch.cli import output_paths
    (tmp_path / "img-1.png").mkdir()
    (tmp_path / "img.png").write_bytes(b"old")
    assert output_paths(tmp_path / "img.png", 2, force=True) == [tmp_path / "img.png", tmp_path / "img-2.png"]
    assert output_paths(tmp_path / "img.png", 2, force=False) == [tmp_path / "img-2.png", tmp_path / "img-3.png"]


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------------------

def test_ctrl_c_while_loading_is_one_line_and_exit_130(monkeypatch, tmp_path, capsys):
    def load_pipeline(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ldm_scratch.loader, "load_pipeline", load_pipeline)
    assert main(["generate", "a fox", "--out", str(tmp_path / "fox.png")]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted (Ctrl-C)\n" and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_saving_leaves_no_partial_file(monkeypatch, tmp_path):
    """Interrupted between the first and the second image: the first one's temporary is removed, no file under
    the real names (they are renamed only once all are written), and the old file --force would replace is kept."""
    (tmp_path / "img.png").write_bytes(b"old")
    saved = []
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    images = [sample_image(8, 8), sample_image(8, 8)]
    with pytest.raises(KeyboardInterrupt):
        save_pngs(images, [tmp_path / "img.png", tmp_path / "img-1.png"], ["a", "b"])
    assert saved and sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
    assert (tmp_path / "img.png").read_bytes() == b"old"


def test_a_failing_rename_leaves_no_partial_file(monkeypatch, tmp_path):
    import os
    calls = []

    def replace(src, dst):
        calls.append(dst)
        raise IsADirectoryError(21, "Is a directory", str(dst))
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ValueError, match=r"cannot write .*img.png: .*Is a directory.*; nothing was written"):
        save_pngs([sample_image(8, 8)], [tmp_path / "img.png"], ["a"])
    assert calls and list(tmp_path.iterdir()) == []


def test_a_real_sigint_exits_130_without_a_traceback(tmp_path):
    """The real signal path (POSIX): a child process running `ldm-scratch inspect` (made to wait) gets SIGINT."""
    # Python turns SIGINT into KeyboardInterrupt only if SIGINT was not ignored when it started; a shell's background
    # job (CI runners, `cmd &`) starts with it ignored. A terminal's foreground process has the handler: install it.
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "import ldm_scratch.checkpoint as checkpoint\n"
              "from ldm_scratch.cli import main\n"
              "def describe(path):\n"
              "    print('ready', flush=True)\n"
              "    time.sleep(120)\n"
              "checkpoint.describe = describe\n"
              "sys.exit(main(['inspect', 'x']))\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130 and err == "interrupted (Ctrl-C)\n"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# The device check lets real devices through
# ---------------------------------------------------------------------------------------------------------------

def test_cpu_and_an_available_cuda_pass_the_device_check(monkeypatch):
    from ldm_scratch.arguments import check_device
    check_device("cpu")
    _cuda(monkeypatch, True, 2)
    check_device("cuda")
    check_device("cuda:1")

