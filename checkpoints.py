"""
A run's files, written so that a crash never loses work: a checkpoint folder is written whole as
DIR.tmp and renamed into place (a crash between the two renames leaves DIR.old, which loading
falls back to), sealed by a manifest of its files' sizes and SHA-256 that loading checks (a file
damaged later, or one that no longer parses, is named in one line with what to do), its files
following the umask; a write the OS refuses (a full disk) ends in one line with the OS's reason,
OUT/metrics.jsonl is cut back to the checkpoint's step on resume, and stage 2's prompt file is
written under a temporary name and renamed. SIGTERM and Ctrl-C are recorded, for the training loop
to stop between two steps and save first. The process group is joined so that workers torchrun
restarts form a new one, and released last at exit. cleft.py says what a checkpoint holds and loads
it; this is how the files are written, found (checkpoint_dir) and checked. Not the method.
"""

import errno
import gc
import hashlib
import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from checks import die

MANIFEST = "manifest.json"  # {file: {bytes, sha256}} of a checkpoint folder, written last
SPLIT_FILE = "split.safetensors"  # the patients stage 1 trained on and held out: held_out.py
# what reading a cut, emptied or overwritten file raises: json, safetensors, torch.load (zip)
READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, LookupError, SafetensorError)


def trained_weights(model):
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


class SaveFailed(Exception):
    """A checkpoint the OS refused to write; the message says which, and why."""


def save_checkpoint(directory, model, optimizer, cfg, step, best_val_loss, patients=None):
    """OUT/{last,best}/ (see cleft.py), written to DIR.tmp/ and renamed: a crash while saving
    leaves the previous one whole. patients: held_out.patient_record's {'tensors', 'metadata'},
    saved as SPLIT_FILE. A write the OS refuses (a full disk, a read-only or vanished folder)
    removes DIR.tmp/ and raises SaveFailed. Rank 0 alone calls this."""
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
        if patients is not None:
            save_file(patients["tensors"], tmp / SPLIT_FILE, metadata=patients["metadata"])
        seal(tmp)
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


def save_on_rank_0(out_dir, names, model, optimizer, cfg, step, best_val_loss, patients=None):
    """OUT/<name>/ for each name (save_checkpoint), written by rank 0; every rank calls this and
    gets rank 0's outcome: None, or what could not be written, why, and the step OUT/last/ still
    holds."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            for name in names:
                save_checkpoint(Path(out_dir) / name, model, optimizer, cfg, step, best_val_loss,
                                patients)
        except SaveFailed as failed:
            last = saved_folder(Path(out_dir) / "last")  # what a rerun resumes from
            try:
                held = f"{last} holds step {saved_step(last)}" if last else "nothing is saved yet"
            except READ_ERRORS:  # its state.pt damaged too: the line still reaches every rank
                held = f"{last} is there, its step unreadable"
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


def join_process_group(backend, timeout):
    """dist.init_process_group from torchrun's environment, each restart of the workers in a key
    space of its own. torchrun keeps its key store across restarts (torch 2.13; upstream issue
    135712) and writes no prefix per attempt, so a restarted rank could read a dead rank's address
    and wait for ever in gloo's connect; with `attempt_N/` the new ranks meet only each other."""
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's own store
        store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)


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


def sha256_of(path, chunk=2**24):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def follow_umask(path):  # safetensors writes its files 0600; every other file follows the umask
    umask = os.umask(0o022)  # read by setting it: put back at once (no thread of ours writes now)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def seal(folder):
    """Every file of a checkpoint folder made to follow the umask, then MANIFEST: each one's size
    and SHA-256, so that damage after the save is found when it is loaded."""
    files = sorted(path for path in Path(folder).rglob("*")
                   if path.is_file() and path.name != MANIFEST)
    with ThreadPoolExecutor() as pool:  # hashlib lets go of Python's lock: files hashed at once
        digests = list(pool.map(sha256_of, files))
    manifest = {}
    for path, digest in zip(files, digests):
        follow_umask(path)
        manifest[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                        "sha256": digest}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1))


CHECKED = {}  # (folder, its manifest's mtime) -> damage(folder): each is hashed once per process


def damage(folder):
    """'FILE (what is wrong)' for the first file of a checkpoint folder that its manifest does not
    match, or None (also for a folder saved without a manifest)."""
    manifest = Path(folder) / MANIFEST
    if not manifest.exists():
        return None
    key = (str(manifest.resolve()), manifest.stat().st_mtime_ns)
    if key not in CHECKED:
        CHECKED[key] = first_damaged(folder, manifest)
    return CHECKED[key]


def first_damaged(folder, manifest):
    try:
        for name, saved in json.loads(manifest.read_text()).items():
            path = Path(folder) / name
            if not path.is_file():
                return f"{path} (missing)"
            if (size := path.stat().st_size) != saved["bytes"]:
                return f"{path} ({size} bytes, {saved['bytes']} when saved)"
            if sha256_of(path) != saved["sha256"]:
                return f"{path} (its SHA-256 is not the one saved with it)"
    except (*READ_ERRORS, TypeError, AttributeError) as error:  # a manifest that is not one
        return f"{manifest} ({type(error).__name__})"
    return None


def what_to_do(folder):
    """How to go on from a damaged checkpoint folder: for OUT/last/, resume from OUT/best/ if it is
    intact; otherwise another checkpoint, or a fresh copy of this one."""
    folder = Path(folder)
    best = saved_folder(folder.parent / "best")
    checked = best is not None and (best / MANIFEST).exists() and not damage(best)
    if folder.name.startswith("last") and checked:
        return (f"{best} (step {saved_step(best)}) is intact: to resume from it, "
                f"`rm -r {folder} && cp -r {best} {folder}` and run the same command; or pass "
                "another --out-dir to start afresh")
    if folder.name.startswith("last"):
        return "no checkpoint beside it is known to be intact: pass another --out-dir to begin anew"
    return "copy the checkpoint again from where it came, or pass another one"


def check_intact(folder):
    """One `error:` line if the checkpoint folder's manifest names a damaged file."""
    if found := damage(folder):
        die(f"{found} is damaged: {what_to_do(folder)}.")


def read_saved(path, read, fix=None):
    """read(path) for a file of a checkpoint; one `error:` line naming the file if it is damaged
    or unreadable (cut short, empty, overwritten, or a config.json edited into broken JSON), with
    `fix` (default: what_to_do with its folder)."""
    try:
        with warnings.catch_warnings():  # torch.load's about a pickle protocol of random bytes
            warnings.simplefilter("ignore")
            return read(path)
    except (*READ_ERRORS, pickle.UnpicklingError) as error:
        refused = isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path)
        if refused:  # torch's own format, whole, and weights_only=True would not run its code
            die(f"{path} holds more than tensors and numbers, so it was refused unread "
                f"({str(error).splitlines()[0][:80]}): resume only from checkpoints of cleft.py.")
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:80]}"
        die(f"{path} is damaged or unreadable ({reason}): {fix or what_to_do(Path(path).parent)}.")


def checkpoint_dir(directory):
    """DIR (or DIR.old, if a crash hit between a save's two renames), checked against its manifest;
    one `error:` line if it holds no checkpoint or a damaged one."""
    folder = saved_folder(directory)
    if folder is None:
        die(f"no checkpoint in {directory}: pass the last/ or best/ folder of a cleft.py run.")
    check_intact(folder)  # its files as saved (their sizes and SHA-256), or one line naming one
    return folder


def read_json(path):  # a checkpoint's config.json, as read_saved reads any of its files
    return read_saved(path, lambda file: json.loads(file.read_text()))


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
    """Stage 2's learned context (L, H), with its class names, config and the SHA-256 of its
    values, to a safetensors file that follows the umask."""
    tmp = Path(f"{path}.tmp")
    context = context.detach().float().cpu().contiguous()
    metadata = {"classes": json.dumps(classes), "config": json.dumps(asdict(cfg)),
                "sha256": hashlib.sha256(context.numpy().tobytes()).hexdigest()}
    save_file({"context": context}, tmp, metadata=metadata)
    follow_umask(tmp)
    os.replace(tmp, path)


def load_prompt(path):
    """(context (L, H), class names) from a file written by save_prompt; one `error:` line if it
    is damaged."""
    def read(path):  # the context, its classes, the SHA-256 saved with its values (if any)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return f.get_tensor("context"), json.loads(metadata["classes"]), metadata.get("sha256")
    fix = "run prompt_tune.py again to write it, or drop --prompt for the hand-written prompts"
    context, classes, saved_sha256 = read_saved(path, read, fix)
    sha256 = hashlib.sha256(context.float().numpy().tobytes()).hexdigest()
    if saved_sha256 and sha256 != saved_sha256:
        die(f"{path} is damaged (its values' SHA-256 is not the one saved with them): {fix}.")
    return context, classes
