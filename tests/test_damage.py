"""Files damaged after a run: a checkpoint's files cut short, emptied, overwritten with random
bytes, a byte flipped, a config.json edited into broken JSON, a damaged prompt file: one `error:`
line that names the file and what to do, never a traceback; the manifest that finds damage the
formats would not; files that follow the umask; a resumed run shortened below its step; predict.py
under torchrun."""

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoints
import cleft
import predict
from conftest import ROOT, stage1_flags
from prompt_tune import PromptConfig

FILES = ["config.json", "model.safetensors", "state.pt", "adapter/adapter_model.safetensors"]


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    elif how == "flipped":  # one byte of the data (not the header): the format cannot tell
        middle = len(data) - 8
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
    else:  # broken JSON
        path.write_text(path.read_text()[:-5])


@pytest.fixture
def run(stage1_ckpt, tmp_path):
    """A copy of a short stage-1 run's folder (best/, last/, metrics.jsonl)."""
    out = tmp_path / "run"
    shutil.copytree(stage1_ckpt.parent, out)
    checkpoints.CHECKED.clear()  # the copies are new files: hashed afresh
    return out


def error_line(call):
    with pytest.raises(SystemExit) as stop:
        call()
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


# (manifest, file, damage): with a manifest, every file and every damage; without one (a
# checkpoint of an older version) the files cleft.py parses, with the damage their formats notice
DAMAGES = ["truncated", "empty", "random", "flipped"]
CASES = ([(True, name, how) for name in FILES for how in DAMAGES]
         + [(True, "config.json", "json"), (False, "config.json", "json")]
         + [(False, name, how) for name in FILES[:3] for how in DAMAGES[:3]])


@pytest.mark.parametrize("manifest, name, how", CASES)
def test_a_damaged_checkpoint_file_is_one_line(run, name, how, manifest):
    """Each file of best/, each kind of damage: the manifest names it (its size or its SHA-256);
    without a manifest the format's own error is turned into the same line."""
    folder = run / ("last" if name == "state.pt" else "best")  # resuming reads last/'s state
    if not manifest:
        (folder / checkpoints.MANIFEST).unlink()
    damage(folder / name, how)
    if name == "state.pt":
        config = dataclasses.replace(cleft.load_config(run / "best"), out_dir=str(run),
                                     resume=True)
        message = error_line(lambda: cleft.resume_state(config))
    else:
        message = error_line(lambda: cleft.load_model(folder))
    assert f"{folder / name} " in message and "damaged" in message
    if manifest:
        assert "bytes" in message or "SHA-256" in message
    if name == "state.pt":  # last/ is damaged, best/ is not: the line says how to resume from it
        step = checkpoints.saved_step(run / "best")
        assert f"{run / 'best'} (step {step}) is intact: to resume from it, `rm -r" in message
    else:
        assert "copy the checkpoint again" in message


def test_following_the_advice_resumes_from_best(run, demo_folder, capsys):
    damage(run / "last" / "state.pt", "truncated")
    flags = stage1_flags(demo_folder, "--out-dir", run, "--max-steps", 6, "--eval-every", 2,
                         "--batch-size", 8, "--num-workers", 0, "--image-cache", run / "cache",
                         "--resume")
    message = error_line(lambda: cleft.main(flags))
    assert "is intact: to resume from it, `rm -r" in message
    shutil.rmtree(run / "last")  # what the line says
    shutil.copytree(run / "best", run / "last")
    cleft.main(flags)
    step = checkpoints.saved_step(run / "best")
    assert f"resumed from {run / 'last'} at step {step}" in capsys.readouterr().out


def test_scripts_print_one_line_and_exit_1(run):
    """predict.py on a checkpoint whose weights were cut short: exit status 1, one line on
    stderr, no traceback."""
    damage(run / "best" / "model.safetensors", "truncated")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--ckpt",
                             str(run / "best"), str(run)],
                            capture_output=True, text=True, timeout=120, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: {run / 'best' / 'model.safetensors'} (")


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_prompt_file_is_one_line(tmp_path, how):
    path = tmp_path / "prompt.safetensors"
    checkpoints.save_prompt(path, torch.randn(30, 8), ["a", "b"], PromptConfig())
    assert checkpoints.load_prompt(path)[1] == ["a", "b"]
    damage(path, how)
    message = error_line(lambda: checkpoints.load_prompt(path))
    assert str(path) in message and "run prompt_tune.py again" in message


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_follows_the_umask(run, tmp_path, umask):
    """The files of a save and the prompt file get the mode any new file gets under the umask:
    a lab-mate in the group can read the weights (safetensors alone writes 0600)."""
    previous = os.umask(umask)
    try:
        model = cleft.load_model(run / "best")
        optimizer = cleft.make_optimizer(model, 1e-3, 0.1)
        config = cleft.load_config(run / "best")
        checkpoints.save_checkpoint(tmp_path / "saved", model, optimizer, config, 4, 1.0)
        checkpoints.save_prompt(tmp_path / "p.safetensors", torch.zeros(2, 2), ["a"],
                                PromptConfig())
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "saved").rglob("*") if p.is_file()]
    files.append(tmp_path / "p.safetensors")
    assert len(files) >= 6 and {oct(p.stat().st_mode & 0o777) for p in files} == {
        oct(0o666 & ~umask)}
    manifest = json.loads((tmp_path / "saved" / checkpoints.MANIFEST).read_text())
    assert set(manifest) == {p.relative_to(tmp_path / "saved").as_posix() for p in files[:-1]
                             if p.name != checkpoints.MANIFEST}


def test_a_resume_below_its_step_ends_with_one_line(run, demo_folder, capsys):
    flags = stage1_flags(demo_folder, "--out-dir", run, "--max-steps", 2, "--eval-every", 2,
                         "--batch-size", 8, "--num-workers", 0, "--image-cache", run / "cache",
                         "--resume")
    with pytest.raises(SystemExit) as stop:
        cleft.main(flags)
    assert stop.value.code == 0
    assert (f"{run / 'last'} holds step 4, past --max-steps 2: nothing to train"
            in capsys.readouterr().out)


def test_predict_refuses_torchrun(stage1_ckpt, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = error_line(lambda: predict.main(["--ckpt", str(stage1_ckpt), str(stage1_ckpt)]))
    assert "start it with python, not torchrun" in message


@pytest.mark.parametrize("text", ["[]", '{"model.safetensors": {}}', '{"model.safetensors": "y"}'])
def test_a_manifest_that_is_not_one_is_one_line(run, text):
    (run / "best" / checkpoints.MANIFEST).write_text(text)
    message = error_line(lambda: cleft.load_model(run / "best"))
    assert f"{run / 'best' / checkpoints.MANIFEST} (" in message and "damaged" in message


def test_a_prompt_file_without_our_metadata_is_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file({"context": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    message = error_line(lambda: checkpoints.load_prompt(tmp_path / "other.safetensors"))
    assert "other.safetensors is damaged or unreadable (KeyError" in message
