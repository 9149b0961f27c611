"""Reliability: exact resume after SIGKILL and SIGTERM (one process and two), checkpoints that
survive a crash while saving, a full disk in one line, best/ never replaced by a worse or NaN run,
unreadable images, a non-finite loss, clear errors, and loading that runs no pickled code."""

import csv
import errno
import json
import re
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import cleft
from conftest import (TIMEOUT, children_of, communicate, kill_tree, stage1_flags, tiny_config,
                      tiny_model)
from test_distributed import TESTS, torchrun

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "8", "--num-workers", "0", "--log-every", "1"]


def train(folder, out_dir, *flags):
    """cleft.py in this process on the demo folder, with the fast settings (flags win)."""
    cleft.main(stage1_flags(folder, "--out-dir", out_dir, *FAST, *flags))


def run(folder, out_dir, *flags):
    """cleft.py in a fresh process on the demo folder, with the fast settings."""
    command = [sys.executable, str(ROOT / "cleft.py"),
               *stage1_flags(folder, "--out-dir", out_dir, *FAST, *flags)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


STARTED = []  # the processes start() launched


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Whatever way a test ends, the processes it started end with it, and all under them."""
    yield
    for process in STARTED:
        if process.poll() is None:
            kill_tree(process)
    STARTED.clear()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args, torchrun=False, restarts=0, rendezvous="c10d"):
    """cleft.py in a process of its own, or under torchrun with two processes (--standalone: the
    c10d rendezvous, or the static one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    rdzv = (["--standalone"] if rendezvous == "c10d" else
            ["--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
             "--nnodes=1", "--node-rank=0"])
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc_per_node", "2",
         "--max-restarts", str(restarts)]
        if torchrun
        else [sys.executable]
    )
    process = subprocess.Popen([*launcher, str(ROOT / "cleft.py"), *map(str, args)], cwd=ROOT,
                               env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    STARTED.append(process)
    return process


def finish(process):
    stdout, process.stderr_text = communicate(process)
    assert process.returncode == 0, process.stderr_text[-3000:]
    return stdout


def wait_for_step(process, metrics_file, step):
    """Return once metrics.jsonl has logged `step` (the process still running)."""
    deadline = time.time() + TIMEOUT
    while not (metrics_file.exists() and f'"step": {step},' in metrics_file.read_text()):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"the run never reached step {step}"
        time.sleep(0.02)


def kill_after(process, metrics_file, step, how=signal.SIGKILL):
    """Send `how` to the whole process group once metrics.jsonl has logged `step`, mid-run;
    (stdout, stderr) of the process."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if metrics_file.exists() and any(
            json.loads(line)["step"] >= step
            for line in metrics_file.read_text().splitlines()
            if line
        ):
            os.killpg(process.pid, how)
            return communicate(process)
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError("the run never reached the step to kill it at")


def stopped_step(stdout, out_dir):
    """The step of the one line a run stopped by SIGTERM prints last."""
    lines = [line for line in stdout.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and stdout.rstrip().endswith(lines[0]), stdout[-2000:]
    match = re.fullmatch(rf"stopped by SIGTERM at step (\d+): {re.escape(str(out_dir / 'last'))} "
                         r"holds it; run the same command to resume\.", lines[0])
    assert match, lines[0]
    return int(match.group(1))


def same_weights_and_moments(a, b):
    """The trained weights and Adam's first moments of two runs' last/, bit for bit."""
    weights = [load_file(out / "last" / "model.safetensors") for out in (a, b)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    moments = [torch.load(out / "last" / "state.pt", weights_only=True)["optimizer"]["state"]
               for out in (a, b)]
    assert moments[0].keys() == moments[1].keys()
    assert all(torch.equal(moments[0][k]["exp_avg"], moments[1][k]["exp_avg"]) for k in moments[0])


def losses(out):
    return [
        (r["step"], r["loss"])
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def test_sigkill_or_sigterm_then_resume_is_bit_identical(demo_folder, tmp_path):
    """The models load from their folders (in eval mode, as from_pretrained returns them) and
    train with dropout (LoRA's and GPT-2's): the resumed run must set training mode itself.
    SIGKILL: the run resumes from the last evaluation (5 or 10). SIGTERM, sent to the process and
    its loader worker: the step under way finishes, last/ is saved at the step reached (9 or later,
    an evaluation step or not), the exit code is 143, and the resumed run ends as the uninterrupted
    one."""
    common = stage1_flags(demo_folder, "--max-steps", 14, "--eval-every", 5, "--warmup-steps", 3,
                          *FAST, "--log-every", 2)
    straight, killed, stopped = tmp_path / "straight", tmp_path / "killed", tmp_path / "stopped"
    finish(start([*common, "--out-dir", straight]))
    cached = [*common, "--out-dir", killed, "--image-cache", tmp_path / "cache"]  # same results
    kill_after(start(cached), killed / "metrics.jsonl", 8)  # after step 5's checkpoint
    assert torch.load(killed / "last" / "state.pt", weights_only=True)["step"] in (5, 10)
    stdout = finish(start(cached))  # no --resume: same config, so it picks up by itself
    assert "resumed from" in stdout
    same_weights_and_moments(straight, killed)
    assert losses(killed) == losses(straight)  # every step once, with the same loss

    process = start([*common, "--out-dir", stopped, "--num-workers", 1])
    stdout, stderr = kill_after(process, stopped / "metrics.jsonl", 8, signal.SIGTERM)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    step = stopped_step(stdout, stopped)
    assert 8 < step < 14
    assert torch.load(stopped / "last" / "state.pt", weights_only=True)["step"] == step
    best = torch.load(stopped / "best" / "state.pt", weights_only=True)["step"]
    assert best in (0, 5, 10) and best <= step  # an evaluated step: the stop does not touch best/
    resumed = finish(start([*common, "--out-dir", stopped]))
    assert f"resumed from {stopped / 'last'} at step {step}\n" in resumed
    same_weights_and_moments(straight, stopped)
    # every step logged once, with the same loss; but the first line after an odd step averages
    # the resumed run's steps alone
    assert [s for s, _ in losses(stopped)] == [s for s, _ in losses(straight)]
    differing = {s for (s, a), (_, b) in zip(losses(stopped), losses(straight)) if a != b}
    assert differing <= {step + 1}


def test_every_step_trains_in_training_mode_fresh_or_resumed(demo_folder, tmp_path, monkeypatch):
    """from_pretrained returns its models in eval mode, and a resumed run skips the validation at
    its first step: every module is in training mode at every step all the same."""
    modes, real_train_step = [], cleft.train_step

    def train_step(model, *args, **kwargs):
        modes.append(all(module.training for module in model.modules()))
        return real_train_step(model, *args, **kwargs)

    monkeypatch.setattr(cleft, "train_step", train_step)
    train(demo_folder, tmp_path, "--max-steps", 2, "--eval-every", 2)
    train(demo_folder, tmp_path, "--max-steps", 4, "--eval-every", 2, "--resume")
    assert modes == [True] * 4


def test_dropout_masks_change_every_step_and_repeat_after_a_resume(demo_folder, tmp_path,
                                                                   monkeypatch):
    """Every batch holds the same caption, so every step's text tower sees the same input shapes:
    two steps draw different dropout masks (dropout is seeded by the step), and a resumed run draws
    at steps 2 and 3 the masks that an uninterrupted run drew there."""
    image = next((demo_folder / "demo" / "train").rglob("*.jpg"))
    rows = [{"image": str(image), "text": "this is a chest x ray of a patient with edema",
             "split": "val" if i < 2 else "train"} for i in range(18)]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)
    masks, real_train_step = [], cleft.train_step  # per step: where each dropout layer zeroed

    def train_step(model, *args, **kwargs):
        zeros = []
        hooks = [m.register_forward_hook(lambda m, i, out: zeros.append(out == 0))
                 for m in model.text_tower.modules() if isinstance(m, torch.nn.Dropout) and m.p]
        loss = real_train_step(model, *args, **kwargs)
        for hook in hooks:
            hook.remove()
        masks.append(zeros)
        return loss

    monkeypatch.setattr(cleft, "train_step", train_step)
    flags = ["--data", "csv", "--data-root", tmp_path / "pairs.csv", "--eval-every", 2,
             "--lora-dropout", 0.5]
    train(demo_folder, tmp_path / "straight", *flags, "--max-steps", 4)
    straight = masks[:]
    masks.clear()
    train(demo_folder, tmp_path / "resumed", *flags, "--max-steps", 2)
    train(demo_folder, tmp_path / "resumed", *flags, "--max-steps", 4, "--resume")
    assert len(straight) == len(masks) == 4 and len(straight[0]) > 0
    same = lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(same(straight[step], masks[step]) for step in range(4))  # resumed at step 2
    shapes = [[m.shape for m in step_masks] for step_masks in straight]
    assert shapes[1] == shapes[2]  # the same input shapes, yet other masks:
    assert not same(straight[1], straight[2]) and not same(straight[0], straight[1])


def rank_process(launcher, rank):
    """The pid of torchrun's worker process of `rank`: a child of torchrun with RANK=rank set (its
    loader workers, one level down, inherit RANK too)."""
    for pid in children_of().get(launcher.pid, []):
        with suppress(OSError):  # a process that ended meanwhile
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no process of rank {rank} under torchrun")


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_a_worker_killed_under_torchrun_restarts_and_resumes(demo_folder, tmp_path, rendezvous):
    """kill -9 to rank 1 (as the OOM killer does) under `torchrun --max-restarts=1`: the other rank
    dies at its next collective, torchrun starts both again, and they form a new process group
    (torchrun keeps its key store across restarts: without a key space per attempt a new rank
    could read a dead rank's address and wait for ever) and resume from OUT/last/."""
    out = tmp_path / "run"
    args = stage1_flags(demo_folder, "--max-steps", 10, "--eval-every", 4, *FAST,
                        "--out-dir", out)
    process = start(args, torchrun=True, restarts=1, rendezvous=rendezvous)
    wait_for_step(process, out / "metrics.jsonl", 5)
    os.kill(rank_process(process, 1), signal.SIGKILL)
    stdout, stderr = communicate(process)
    assert process.returncode == 0, stderr[-3000:]
    assert f"resumed from {out / 'last'} at step 4" in stdout
    assert torch.load(out / "last" / "state.pt", weights_only=True)["step"] == 10


def test_sigterm_to_one_rank_under_torchrun_stops_both_at_one_step(demo_folder, tmp_path):
    """SIGTERM reaches rank 1 and its loader worker only (a process group of their own, as torchrun
    starts them): both ranks finish the step and agree to stop at it, rank 0 saves last/ there and
    alone says so, and the resumed run ends as the uninterrupted one."""
    args = stage1_flags(demo_folder, "--max-steps", 10, "--eval-every", 4, *FAST,
                        "--num-workers", 1)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finish(start([*args, "--out-dir", straight], torchrun=True))
    process = start([*args, "--out-dir", stopped], torchrun=True)
    wait_for_step(process, stopped / "metrics.jsonl", 5)
    os.killpg(rank_process(process, 1), signal.SIGTERM)
    stdout, stderr = communicate(process)
    step = stopped_step(stdout, stopped)  # one line, rank 0's: it got no signal itself
    assert 5 < step < 10 and "[rank" not in stderr, stderr[-3000:]  # no rank's traceback
    assert torch.load(stopped / "last" / "state.pt", weights_only=True)["step"] == step
    assert "resumed from" in finish(start([*args, "--out-dir", stopped], torchrun=True))
    same_weights_and_moments(straight, stopped)
    assert [step for step, _ in losses(stopped)] == list(range(1, 11))


def test_a_different_config_is_never_resumed_silently(demo_folder, tmp_path):
    """Another --lr needs --resume; another model (its adapter, its shapes) is refused even with
    --resume, in one line that names each differing flag with both values; with --resume the
    schedule may change."""
    train(demo_folder, tmp_path, "--max-steps", 2, "--eval-every", 2)
    with pytest.raises(SystemExit, match=r"holds a run with other flags \(--lr 0.0005 \(saved\) "
                       r"vs 0.001 \(given\)\): pass --resume to continue it with these flags"):
        train(demo_folder, tmp_path, "--max-steps", 2, "--lr", "1e-3")
    for resume in ([], ["--resume"]):
        with pytest.raises(SystemExit) as error:
            train(demo_folder, tmp_path, "--max-steps", 2, "--lora-r", 4, "--peft", "ia3",
                  *resume)
        assert str(error.value) == (
            f"error: {tmp_path} holds a run of another model (--peft lora (saved) vs ia3 (given), "
            "--lora-r 8 (saved) vs 4 (given)): pass the saved flags to resume it, or choose "
            "another --out-dir.")
    train(demo_folder, tmp_path, "--max-steps", 4, "--eval-every", 2, "--lr", "1e-3", "--resume")
    assert torch.load(tmp_path / "last" / "state.pt", weights_only=True)["step"] == 4


def test_a_crash_while_saving_leaves_the_previous_checkpoint(demo_folder, tmp_path, monkeypatch):
    train(demo_folder, tmp_path, "--max-steps", 2, "--eval-every", 2)
    before = load_file(tmp_path / "last" / "model.safetensors")
    model = cleft.load_model(tmp_path / "last")
    optimizer = cleft.make_optimizer(model, lr=1e-3, weight_decay=0.2)

    def crash(tensors, path, *args, **kwargs):  # half a file is written, then the process dies
        Path(path).write_bytes(b"partial safetensors file")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(
        checkpoints, "save_file", crash
    )  # 1) the process dies while writing the new files
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(
            tmp_path / "last", model, optimizer, cleft.load_config(tmp_path / "last"), 3, 0.0
        )
    monkeypatch.undo()
    reloaded = cleft.load_model(tmp_path / "last")  # the previous checkpoint, with its own weights
    trained = {n: p.detach() for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trained.keys() == before.keys()
    assert all(torch.equal(before[n], p) for n, p in trained.items())
    assert torch.load(tmp_path / "last" / "state.pt", weights_only=True)["step"] == 2

    real_replace, calls = os.replace, []

    def crash_between_renames(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(
        checkpoints.os, "replace", crash_between_renames
    )  # 2) last/ moved aside, the new one not in yet
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(
            tmp_path / "last", model, optimizer, cleft.load_config(tmp_path / "last"), 3, 0.0
        )
    monkeypatch.undo()
    assert not (tmp_path / "last").exists()
    state = torch.load(cleft.checkpoint_dir(tmp_path / "last") / "state.pt", weights_only=True)
    assert state["step"] == 2  # found in last.old
    stdout = run(demo_folder, tmp_path, "--max-steps", 4, "--eval-every", 2, "--resume").stdout
    assert "at step 2" in stdout and (tmp_path / "last" / "model.safetensors").exists()
    assert not (tmp_path / "last.old").exists() and not (tmp_path / "last.tmp").exists()


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(
    demo_folder, tmp_path, monkeypatch, capsys
):
    """A write the OS refuses at step 4 (ENOSPC, half a file written first): one line naming the
    folder, the OS's reason and the step last/ holds; no DIR.tmp left; last/ loads and resumes."""
    train(demo_folder, tmp_path, "--max-steps", 2, "--eval-every", 2)

    def full_disk(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half a safetensors file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    message = (rf"^error: could not write {tmp_path}/(best|last) \(No space left on device\); "
               rf"{tmp_path}/last holds step 2: free space there or make it writable, then run "
               r"the same command to resume\.$")
    with pytest.raises(SystemExit, match=message):
        train(demo_folder, tmp_path, "--max-steps", 4, "--eval-every", 2, "--resume")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last", "metrics.jsonl"]
    assert torch.load(tmp_path / "last" / "state.pt", weights_only=True)["step"] == 2
    cleft.load_model(tmp_path / "last")
    train(demo_folder, tmp_path, "--max-steps", 4, "--eval-every", 2, "--resume")
    assert f"resumed from {tmp_path / 'last'} at step 2" in capsys.readouterr().out
    assert torch.load(tmp_path / "last" / "state.pt", weights_only=True)["step"] == 4


def test_the_os_is_asked_why_when_a_library_hides_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk as 'unexpected pos': a small write into the same folder
    gives the OS's reason. Where that write succeeds, the error is not the disk's: it is raised
    as it is, traceback and all."""
    hidden = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert checkpoints.refusal(hidden, tmp_path) is None  # this folder takes writes
    assert checkpoints.refusal(PermissionError(errno.EACCES, "Permission denied"), tmp_path) == (
        "Permission denied")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.tempfile, "TemporaryFile", no_space)
    assert checkpoints.refusal(hidden, tmp_path) == "No space left on device"


def test_a_metrics_line_the_disk_refuses_is_cut_back_off(tmp_path, monkeypatch, capsys):
    """The disk fills up half-way through a line of metrics.jsonl: the half line is removed (a
    resume parses every line), a warning names the step, and training would go on."""
    path = tmp_path / "metrics.jsonl"
    checkpoints.append_metrics(path, {"step": 1})
    real_open = open

    class HalfFull:  # the file, whose writes stop half-way
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.file.close()

        def tell(self):
            return self.file.tell()

        def truncate(self, size):
            return self.file.truncate(size)

        def write(self, data):
            return self.file.write(data[:len(data) // 2])

    monkeypatch.setattr(checkpoints, "open", HalfFull, raising=False)
    checkpoints.append_metrics(path, {"step": 2, "loss": 1.0})
    assert capsys.readouterr().err == (f"warning: could not append to {path} (No space left on "
                                       "device): step 2 is logged on screen only\n")
    monkeypatch.undo()
    checkpoints.append_metrics(path, {"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 3}\n'


def test_a_failed_save_under_torchrun_stops_both_ranks_with_one_line(demo_folder, tmp_path):
    """Rank 0's save fails at step 2: rank 1 learns it at the same collective and leaves through
    the same one-line error (exit code 1, silent), instead of waiting for rank 0 or crashing."""
    result = torchrun(TESTS / "full_disk_worker.py", tmp_path / "ranks", *stage1_flags(
        demo_folder, "--out-dir", tmp_path / "run", "--max-steps", 4, "--eval-every", 2, *FAST))
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(  # best/ if step 2 improved on step 0, else last/
        rf"exit error: could not write {tmp_path}/run/(best|last) \(No space left on device\); "
        rf"{tmp_path}/run/last holds step 0: free space there or make it writable, then run the "
        r"same command to resume\.", (tmp_path / "ranks" / "rank0.txt").read_text())
    assert (tmp_path / "ranks" / "rank1.txt").read_text() == "exit 1"


def test_a_second_signal_during_the_save_changes_nothing(demo_folder, tmp_path, monkeypatch):
    """SIGTERM and then Ctrl-C arrive while a checkpoint is being written: both are recorded (the
    first one counts), the save completes, and restore() puts the previous handlers back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    model = tiny_model(demo_folder)
    optimizer = cleft.make_optimizer(model, lr=1e-3, weight_decay=0.2)
    real_save_file = checkpoints.save_file

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", interrupted)
    stop = checkpoints.StopSignals()
    checkpoints.save_checkpoint(tmp_path / "last", model, optimizer, tiny_config(demo_folder), 7,
                                1.0)
    stop.restore()
    assert stop.received == signal.SIGTERM and stop.agreed() == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before
    assert torch.load(tmp_path / "last" / "state.pt", weights_only=True)["step"] == 7
    assert load_file(tmp_path / "last" / "model.safetensors").keys() == set(
        checkpoints.trained_weights(model))


def test_best_is_never_replaced_by_a_worse_run_and_nan_is_never_saved(
    demo_folder, tmp_path, monkeypatch
):
    val_losses = iter([2.0, 1.0, 3.0, float("nan")])
    monkeypatch.setattr(cleft, "validate", lambda *args: {"val_loss": next(val_losses)})
    with pytest.raises(SystemExit, match="the validation loss became nan by step 6"):
        train(demo_folder, tmp_path, "--max-steps", 8, "--eval-every", 2)
    best, last = (
        torch.load(tmp_path / d / "state.pt", weights_only=True) for d in ("best", "last")
    )
    assert (best["step"], best["best_val_loss"]) == (2, 1.0)
    assert (last["step"], last["best_val_loss"]) == (4, 1.0)


@pytest.fixture
def damaged_demo(demo_folder, tmp_path):
    """A copy of the small demo folder in which two images of the first training batch are
    damaged (one truncated, in rank 0's half under 2 processes; one missing, in rank 1's), and one
    validation and one 5x200 test image are missing."""
    folder = tmp_path / "damaged"
    shutil.copytree(demo_folder, folder)
    root = folder / "demo"
    splits = cleft.load_splits(cleft.parse_config(["--data-root", str(root)]))
    first_batch = next(iter(cleft.TrainBatches(len(splits["train"]), 8, seed=42)))
    truncated, missing = (Path(splits["train"][first_batch[k][0]][0]) for k in (0, 5))
    truncated.write_bytes(truncated.read_bytes()[:300])
    missing.unlink()
    for name in ("val", "test"):
        Path(splits[name][0][0]).unlink()
    return folder, truncated, missing, Path(splits["val"][0][0]), Path(splits["test"][0][0])


def test_unreadable_images_are_skipped_counted_and_reported(damaged_demo, tmp_path):
    """Each unreadable file is reported once per run, whichever split and however many
    evaluations (three here) meet it, on a line of its own, and all four are counted."""
    root, *damaged = damaged_demo
    result = run(root, tmp_path / "run", "--max-steps", 4, "--eval-every", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in damaged:
        assert result.stderr.count(f"warning: skipping unreadable image {path} (") == 1
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines()
               if "unreadable" in line)  # never glued to a progress bar's line
    assert "skipped in this run: 4 unreadable image(s)" in result.stdout


def test_unreadable_images_are_reported_once_by_rank_0_under_torchrun(damaged_demo, tmp_path):
    """Rank 1's unreadable training image reaches the user through rank 0, once, like the rest."""
    root, *damaged = damaged_demo
    process = start(stage1_flags(root, "--out-dir", tmp_path / "run", "--max-steps", 4,
                                 "--eval-every", 2, *FAST), torchrun=True)
    stdout = finish(process)
    for path in damaged:
        assert process.stderr_text.count(f"warning: skipping unreadable image {path} (") == 1
    assert "skipped in this run: 4 unreadable image(s)" in stdout


def test_strict_data_stops_at_the_first_unreadable_image(damaged_demo, tmp_path):
    root, truncated, *_ = damaged_demo
    result = run(root, tmp_path / "run", "--max-steps", 2, "--eval-every", 2, "--strict-data")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].startswith(f"error: unreadable image {truncated} (")
    assert error[0].endswith(" at step 0 (--strict-data): fix or remove it, or drop --strict-data "
                             "to skip such images.")


def nan_at_step(n, monkeypatch):
    """Training step n (counted from 0) diverges as a real one does: a NaN loss and NaN gradients
    (so the update makes the weights NaN), after a real forward and backward."""
    real, calls = cleft.train_step, []

    def train_step(model, *args, **kwargs):
        calls.append(1)
        loss = real(model, *args, **kwargs)
        if len(calls) != n + 1:
            return loss
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(float("nan"))
        return loss * float("nan")

    monkeypatch.setattr(cleft, "train_step", train_step)


def test_a_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
    demo_folder, tmp_path, monkeypatch
):
    """The loss is read at log steps only; whichever check meets the NaN first (the training
    loss at a log step, or the validation loss of the NaN weights), nothing after it is saved."""
    for log_every, message in ((1, "the loss became nan by step 3"),
                               (5, "the validation loss became nan by step 4")):
        nan_at_step(3, monkeypatch)
        out = tmp_path / str(log_every)
        with pytest.raises(SystemExit, match=message + f": {out}/last holds the last good"):
            train(demo_folder, out, "--max-steps", 6, "--eval-every", 2, "--log-every", log_every)
        monkeypatch.undo()
        assert torch.load(out / "last" / "state.pt", weights_only=True)["step"] == 2
        weights = load_file(out / "last" / "model.safetensors").values()
        assert all(torch.isfinite(v).all() for v in weights)


def test_clear_errors_for_empty_splits_and_uneven_batches(tmp_path, demo_folder, monkeypatch):
    (tmp_path / "train.csv").write_text(
        ",".join(cleft.CHEXPERT_COLUMNS)
        + "\n"
        + "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg,F,50,Lateral,"
        + "," * 13
        + "\n"
    )
    with pytest.raises(SystemExit, match="0 train and 0 val images after filtering; training"):
        cleft.main(["--data", "chexpert", "--data-root", str(tmp_path), "--out-dir", str(tmp_path)])
    monkeypatch.setattr(cleft, "setup_distributed", lambda: (0, 2, torch.device("cpu")))
    with pytest.raises(
        SystemExit, match="--batch-size 9 is the global batch and must divide by the 2 processes"
    ):
        cleft.main(stage1_flags(demo_folder, "--batch-size", 9, "--out-dir", tmp_path))


def test_an_output_folder_that_cannot_be_written_is_one_line(demo_folder, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    with pytest.raises(SystemExit, match=rf"^error: could not write {out}/metrics\.jsonl \(Not a "
                       r"directory\): pass a folder that can be written\.$"):
        train(demo_folder, out, "--max-steps", 2)


def test_checkpoints_never_run_pickled_code(demo_folder, tmp_path):
    train(demo_folder, tmp_path, "--max-steps", 2, "--eval-every", 2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 2, "payload": Payload()}, tmp_path / "last" / "state.pt")
    checkpoints.seal(tmp_path / "last")  # a manifest that vouches for it: torch.load must refuse
    result = run(demo_folder, tmp_path, "--max-steps", 4, "--resume")
    assert (
        result.returncode != 0
        and "was refused unread" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not marker.exists()


def test_no_token_and_no_remote_code_in_the_sources():
    import re

    for path in ROOT.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"hf_[A-Za-z0-9]{30,}", text), path  # no access token committed
        assert "trust_remote_code=True" not in text, path


def test_the_logit_scale_never_exceeds_100(demo_folder, tmp_path):
    """CLIP's clamp: after every step the scale is at most 100, even from a checkpoint above it."""
    train(demo_folder, tmp_path, "--eval-every", 2, "--max-steps", 2)
    weights = load_file(tmp_path / "last" / "model.safetensors")
    weights["logit_scale"] = torch.tensor(math.log(1000.0))
    save_file(weights, tmp_path / "last" / "model.safetensors")
    checkpoints.seal(tmp_path / "last")  # an edit on purpose: its manifest written anew
    train(demo_folder, tmp_path, "--eval-every", 2, "--max-steps", 4, "--resume")  # scale: 1000
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["step"] > 2]
    logged = [r["logit_scale"] for r in records if "logit_scale" in r]
    assert len(logged) == 2 and all(scale <= 100 + 1e-3 for scale in logged)
    final = load_file(tmp_path / "last" / "model.safetensors")["logit_scale"]
    assert final.exp().item() <= 100 + 1e-3


def test_a_stop_between_evaluations_saves_last_and_leaves_best(demo_folder, tmp_path,
                                                               monkeypatch):
    """Ctrl-C arrives during step 2's update (evaluations at 0 and 2): the run stops at step 3, an
    unvalidated one, so last/ holds step 3 and best/ still an evaluated step; main returns 130
    (the exit code of `python cleft.py`; SIGTERM's 143 is checked in a process of its own), which
    tells a requeue from a Ctrl-C."""
    steps, real_train_step = [], cleft.train_step

    def train_step(*args, **kwargs):
        steps.append(len(steps))
        if len(steps) == 3:  # step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_train_step(*args, **kwargs)

    monkeypatch.setattr(cleft, "train_step", train_step)
    returned = cleft.main(stage1_flags(demo_folder, "--out-dir", tmp_path, *FAST,
                                       "--max-steps", 6, "--eval-every", 2))
    assert returned == 130 and steps == [0, 1, 2]
    assert torch.load(tmp_path / "last" / "state.pt", weights_only=True)["step"] == 3
    assert torch.load(tmp_path / "best" / "state.pt", weights_only=True)["step"] in (0, 2)
    evaluated = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                                        .splitlines()) if "val_loss" in r]
    assert evaluated == [0, 2]


def test_a_disk_filled_by_the_save_itself_is_named_as_full(demo_folder, tmp_path, monkeypatch):
    """A disk with room for a 1 MB write but not for the checkpoint too: safetensors writes part
    of model.safetensors and reports it in words of its own. The OS is asked while DIR.tmp/ still
    takes its space, so the run ends in the one `error:` line with the OS's reason (asked after
    DIR.tmp/ is removed, the write would succeed, and the run would end in a traceback)."""
    train(demo_folder, tmp_path, "--max-steps", 2, "--eval-every", 2)
    used = lambda: sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    capacity = used() + 2**20 + 2**16  # the 1 MB probe fits; with the checkpoint's files, not
    real_save_file = checkpoints.save_file
    real_temporary_file = checkpoints.tempfile.TemporaryFile

    def save_file(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if used() > capacity:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    def temporary_file(*args, **kwargs):  # the OS's answer to the 1 MB probe on this disk
        if used() + 2**20 > capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_temporary_file(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", save_file)
    monkeypatch.setattr(checkpoints.tempfile, "TemporaryFile", temporary_file)
    with pytest.raises(SystemExit, match=rf"^error: could not write {tmp_path}/(best|last) \(No "
                       rf"space left on device\); {tmp_path}/last holds step 2: free space"):
        train(demo_folder, tmp_path, "--max-steps", 4, "--eval-every", 2, "--resume")
    assert not list(tmp_path.glob("*.tmp"))
