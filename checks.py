"""
A user's mistakes, caught before they cost a run and told in one line that names the fix: `die`
(an `error:` line, exit code 1 on every rank), the CSV reader's checks (a missing file, a folder
where a file goes or a file where a folder goes, a missing column), a resumed run whose flags
change the model, and a warm-up that outlasts the run. cleft.py is the method; this file only
checks what it is given.
"""

import csv
import os
import sys
from dataclasses import fields
from pathlib import Path


def die(message, this_rank_only=False):
    """A mistake the user can fix: one line (rank 0's, or this rank's alone), exit code 1 on all.
    The process group stays: `checkpoints.exit_code` releases it after the objects that hold it."""
    speaks = this_rank_only or os.environ.get("RANK", "0") == "0"
    raise SystemExit(f"error: {message}" if speaks else 1)  # exit code 1 either way


def warn(message):  # one line on stderr, from rank 0 (or a plain python process)
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def read_csv(path, columns, flag="--data-root"):
    """Rows of a CSV as dicts, after checking that it is a file with the columns we need; `flag`
    is the option that named it, for the error line."""
    path = Path(path)
    if path.is_dir():
        die(f"{path} is a folder: {flag} takes the CSV file itself.")
    if path.parent.is_file():  # FILE.csv/train.csv: a CSV where a dataset's folder goes
        die(f"{path.parent} is a file, not a dataset folder: for a CSV of your own pass "
            "--data csv.")
    if not path.is_file():
        die(f"{path} does not exist: check {flag}.")
    with open(path, newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" has a BOM
        reader = csv.DictReader(f)
        if missing := [c for c in columns if c not in (reader.fieldnames or [])]:
            die(f"{path} lacks the column(s) {missing}: give {flag} a file with the expected "
                "header (see README).")
        rows = list(reader)
    if not rows:
        die(f"{path} has a header and no rows: give {flag} a file with data.")
    return rows


# what a checkpoint's trained tensors are, and what they compute: a resumed run keeps them all
MODEL_FLAGS = ["text_model", "vision_model", "peft", "lora_r", "lora_alpha", "lora_dropout",
               "prefix_tokens", "freeze_lm", "full_ft_lm", "train_embed", "embed_dim"]
# how a run is watched, not what it computes: a run resumes with other values without --resume
BOOKKEEPING = ["resume", "num_workers", "image_cache", "log_every", "eval_every", "strict_data"]


def check_resume(saved, given, out_dir):
    """A run in out_dir continues under the flags `given` only with the saved model's flags; any
    other flag that differs (schedule, data, ...) needs --resume. Both configs: cleft.Config."""
    def differing(names):  # '--lora-r 8 (saved) vs 16 (given)' for each differing flag
        return [f"--{name.replace('_', '-')} {getattr(saved, name)} (saved) vs "
                f"{getattr(given, name)} (given)" for name in names
                if getattr(saved, name) != getattr(given, name)]
    if model := differing(MODEL_FLAGS):
        die(f"{out_dir} holds a run of another model ({', '.join(model)}): pass the saved flags "
            "to resume it, or choose another --out-dir.")
    others = [f.name for f in fields(given) if f.name not in MODEL_FLAGS + BOOKKEEPING]
    if (changed := differing(others)) and not given.resume:
        die(f"{out_dir} holds a run with other flags ({', '.join(changed)}): pass --resume to "
            "continue it with these flags, or choose another --out-dir.")


def check_schedule(warmup_steps, max_steps):
    if warmup_steps >= max_steps:
        warn(f"--warmup-steps {warmup_steps} is at or above --max-steps {max_steps}: the learning "
             "rate climbs for the whole run (to --lr at the last step at most, with no decay); "
             "lower --warmup-steps.")
