"""
A run's files, written so that a crash never loses work: a checkpoint folder is written whole as
DIR.tmp and renamed into place (a crash between the two renames leaves DIR.old, which loading
falls back to), a write the OS refuses (a full disk) ends in one line with the OS's reason,
OUT/metrics.jsonl is cut back to the checkpoint's step on resume, and stage 2's prompt file is
written under a temporary name and renamed. SIGTERM and Ctrl-C are recorded, for the training loop
to stop between two steps and save first. cleft.py says what a checkpoint holds and loads it; this
is how the files are written. Not the method.
"""

import errno
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm


def trained_weights(model):
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


class SaveFailed(Exception):
    """A checkpoint the OS refused to write; the message says which, and why."""


def save_checkpoint(directory, model, optimizer, cfg, step, best_val_loss):
    """OUT/{last,best}/ (see cleft.py), written to DIR.tmp/ and renamed: a crash while saving
    leaves the previous one whole. A write the OS refuses (a full disk, a read-only or vanished
    folder) removes DIR.tmp/ and raises SaveFailed. Rank 0 alone calls this."""
    directory, tmp, old = Path(directory), Path(f"{directory}.tmp"), Path(f"{directory}.old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        save_file(trained_weights(model), tmp / "model.safetensors")
        if cfg.peft != "none":  # loadable by PeftModel.from_pretrained
            model.text_tower.model.save_pretrained(tmp / "adapter")
        torch.save({"step": step, "best_val_loss": best_val_loss,
                    "optimizer": optimizer.state_dict()}, tmp / "state.pt")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)  # a crash from here on: loading falls back to DIR.old
        os.replace(tmp, directory)
    except Exception as error:
        reason = refusal(error, directory.parent)  # asked before the space DIR.tmp takes is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:  # not the file system's doing: a bug, shown with its traceback
            raise
        raise SaveFailed(f"could not write {directory} ({reason})") from error
    shutil.rmtree(old, ignore_errors=True)


def save_on_rank_0(out_dir, names, model, optimizer, cfg, step, best_val_loss):
    """OUT/<name>/ for each name, written by rank 0; every rank calls this and gets rank 0's
    outcome: None, or what could not be written, why, and the step OUT/last/ still holds."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            for name in names:
                save_checkpoint(Path(out_dir) / name, model, optimizer, cfg, step, best_val_loss)
        except SaveFailed as failed:
            last = saved_folder(Path(out_dir) / "last")  # what a rerun resumes from
            held = f"{last} holds step {saved_step(last)}" if last else "nothing is saved yet"
            error = f"{failed}; {held}"
    return on_every_rank(error)[0]


def saved_step(folder):  # the step of a checkpoint, read without loading its optimizer state
    return torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True,
                      mmap=True)["step"]


def on_every_rank(value):  # [each rank's value] in rank order, via the host (all ranks call it)
    values = [value] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(values, value)
    return values


def refusal(error, folder):
    """The OS's reason for a failed write in `folder`, or None if it writes there. torch and
    safetensors tell of a full disk in words of their own ('unexpected pos'): a 1 MB write asks."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(bytes(2**20))
            probe.flush()
            os.fsync(probe.fileno())  # a network file system may only refuse here
    except OSError as refused:
        return refused.strerror or str(refused)
    return None


class StopSignals:
    """SIGTERM (a scheduler preempting the job) and SIGINT (Ctrl-C) recorded, not obeyed at once:
    the training loop asks agreed() between two steps, then saves and exits. A repeat changes
    nothing, so a second signal never interrupts the save. restore() puts the old handlers back."""

    def __init__(self):
        self.received = 0  # the first signal's number; 0: none
        self.previous = {number: signal.signal(number, self.record)
                         for number in (signal.SIGTERM, signal.SIGINT)}

    def record(self, number, frame):
        self.received = self.received or number

    def agreed(self):  # every rank calls it between two steps: the signal any rank got (0: none)
        received = torch.tensor(self.received)
        if dist.is_initialized():  # a CPU tensor: gloo, on the host, whatever the GPU is doing
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received)

    def restore(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def exit_code(main):
    """main()'s exit code (an `error:` line's too), after the process group is released, last:
    DDP holds the group, and if DDP's destructor freed it, it would wait, holding Python's lock,
    for gloo's threads, which need that lock to free a collective's tensors. An exception that is
    not a SystemExit (a bug) leaves as Python shows it."""
    try:
        code = main()
    except SystemExit as stop:  # die(): its line is printed by sys.exit(code)
        code = stop.code
    if dist.is_initialized():  # (a world of one has no group: its objects go at exit, as ever)
        gc.collect()  # main's objects, DDP included (the exception no longer holds its frames)
        dist.destroy_process_group()
    return code


def saved_folder(directory):
    """DIR, or DIR.old if a crash hit between a save's two renames; None if neither holds one."""
    for folder in (Path(directory), Path(f"{directory}.old")):
        if (folder / "model.safetensors").exists():
            return folder
    return None


def start_metrics(path, resumed_step=None):
    """A new JSON-lines log at path, or on resume the old one without the steps after the
    checkpoint (they run again). A folder that cannot be written stops the run in one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = path.read_text().splitlines() if resumed_step is not None and path.exists() else []
        kept = [line + "\n" for line in lines if line and json.loads(line)["step"] <= resumed_step]
        path.write_text("".join(kept))
    except OSError as refused:  # before the first step: nothing is lost
        raise SystemExit(f"error: could not write {path} ({refused.strerror}): pass a folder that "
                         "can be written.") from None
    return path


def append_metrics(path, record):
    """One JSON line more at the end of `path`. A disk that refuses it costs that line alone: it is
    cut back off (a half line would stop the resume), a warning says so, and training goes on
    (the next checkpoint's save stops the run, on every rank, if the disk is still full)."""
    line = (json.dumps(record) + "\n").encode()
    try:
        with open(path, "ab", buffering=0) as f:  # unbuffered: the OS answers this write
            size = f.tell()
            if f.write(line) < len(line):  # the disk filled up within the line
                f.truncate(size)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as refused:  # a full disk, a read-only or vanished folder
        tqdm.write(f"warning: could not append to {path} ({refused.strerror}): step "
                   f"{record['step']} is logged on screen only", file=sys.stderr)


def save_prompt(path, context, classes, cfg):
    """Stage 2's learned context (L, H), with its class names and config, to a safetensors file."""
    tmp = Path(f"{path}.tmp")
    save_file({"context": context.detach().cpu().contiguous()}, tmp,
              metadata={"classes": json.dumps(classes), "config": json.dumps(asdict(cfg))})
    os.replace(tmp, path)


def load_prompt(path):
    """(context (L, H), class names) from a file written by save_prompt."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("context"), json.loads(f.metadata()["classes"])
