"""
A user's mistakes, caught before they cost a run and told in one line that names the fix: `die`
(an `error:` line, exit code 1 on every rank), the CSV reader's checks (a missing file, a folder
where a file goes or a file where a folder goes, a missing column), the --data sources and their
folders, a resumed run whose flags change the model, a warm-up that outlasts the run, and the
stops of a run (a loss that is not finite, an unreadable image under --strict-data). cleft.py is
the method; this file only checks what it is given. Also the --prompts file's reader.
"""

import csv
import gzip
import json
import math
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


def note(message):  # one line on stdout, from rank 0 (or a plain python process)
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", flush=True)


def read_csv(path, columns, flag="--data-root"):
    """Rows of a CSV as dicts, after checking that it is a file with the columns we need; `flag`
    is the option that named it, for the error line."""
    header, rows = csv_rows(path, columns, flag)
    rows = [dict(zip(header, row)) for row in rows]
    if not rows:
        die(f"{path} has a header and no rows: give {flag} a file with data.")
    return rows


def write_csv(path, rows, columns):  # written whole or not at all: a temporary file, renamed
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_prompts(path, classes=None):
    """{class: [prompt, ...]} of a --prompts JSON file (a class's prompts: a list, or one string),
    in `classes`' order when given: then it must name each class and no other."""
    try:
        prompts = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        die(f"cannot read --prompts {path} ({error}): give a JSON file of class -> prompts.")
    def is_prompts(value):  # one prompt, or a list of one or more
        listed = isinstance(value, list) and len(value) > 0
        return isinstance(value, str) or (listed and all(isinstance(t, str) for t in value))
    if not isinstance(prompts, dict) or not all(map(is_prompts, prompts.values())):
        die(f"--prompts {path} is not a JSON object of class -> list of prompts (strings, one at "
            'least): write it as {"Edema": ["... with edema", "... with pulmonary edema"], ...}.')
    prompts = {name: [p] if isinstance(p, str) else p for name, p in prompts.items()}
    if classes is not None and set(prompts) != set(classes):
        die(f"--prompts {path} names the classes {sorted(prompts)}, the data's are {classes}: give "
            "each class its prompts, under its name.")
    return {name: prompts[name] for name in classes or prompts}


def csv_rows(path, columns, flag="--data-root"):
    """(header, the rows as lists, read as they are consumed) of a CSV, or of a gzipped one
    (`.csv.gz`), after checking that it is a file with `columns`."""
    path = Path(path)
    if path.is_dir():
        die(f"{path} is a folder: {flag} takes the CSV file itself.")
    if path.parent.is_file():  # FILE.csv/train.csv: a CSV where a dataset's folder goes
        die(f"{path.parent} is a file, not a dataset folder: for a CSV of your own pass "
            "--data csv.")
    if not path.is_file():
        die(f"{path} does not exist: check {flag}.")
    opener = gzip.open if path.suffix == ".gz" else open
    file = opener(path, "rt", newline="", encoding="utf-8-sig")  # Excel's "CSV UTF-8": a BOM
    reader = csv.reader(file)
    header = next(reader, [])
    if missing := [c for c in columns if c not in header]:
        file.close()
        die(f"{path} lacks the column(s) {missing}: give {flag} a file with the expected "
            "header (see README).")

    def rows():  # the file is closed when they are all read
        with file:
            yield from reader
    return header, rows()


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


def check_sources(data, data_root, known):
    """[(source, its root)] of --data a,b and --data-root A,B, after checking them."""
    names = data.split(",")
    roots = data_root.split(",")
    if not data_root:
        die("no data: pass --data-root, the data set's folder (see README) or with --data csv a "
            "CSV of image,text pairs; `python demo.py` runs the offline demo.")
    if unknown := [name for name in names if name not in known]:
        die(f"unknown --data {unknown}: choose among {', '.join(known)} (several: a,b).")
    if len(roots) != len(names):
        die(f"--data names {len(names)} source(s) and --data-root {len(roots)} folder(s): give "
            "one folder per source, comma-separated, in the same order.")
    return list(zip(names, roots))


def check_finite(loss, name, step, out_dir, progress):  # every rank calls it with the same loss
    if not math.isfinite(loss):  # stop before anything is saved: OUT/last/ stays good
        progress.close()
        die(f"the {name} became {loss} by step {step}: {out_dir}/last holds the last good "
            "weights; lower --lr or raise --warmup-steps.")


def stop_if_unreadable(skipped, step, progress):  # --strict-data: this rank's batch stops the run
    if any(skipped):
        first = next(text for text in skipped if text).splitlines()[0]
        progress.close()
        die(f"unreadable image {first} at step {step} (--strict-data): "
            "fix or remove it, or drop --strict-data to skip such images.", this_rank_only=True)


def nothing_left_to_train(saved_step, max_steps, last):
    """A resumed run whose --max-steps is below the step it holds ends here, with exit code 0."""
    if saved_step > max_steps:
        if os.environ.get("RANK", "0") == "0":
            print(f"{last} holds step {saved_step}, past --max-steps {max_steps}: nothing to "
                  "train, and nothing is changed (a higher --max-steps with --resume continues "
                  "it).", flush=True)
        raise SystemExit(0)
