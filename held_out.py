"""
Held-out sets that stay held out across the three scripts: stage 1 records in each checkpoint the
patients it trained on and those it held out (CKPT/split.safetensors, a sorted 64-bit hash per
patient: 0.5 MB for CheXpert's 64k), stage 2 validates on exactly the ones it held out, and test
images of patients it trained on stop stage 2 and the evaluation in one line (--allow-overlap: a
warning). Without it, another --val-fraction or a chexpert_5x200.csv built after stage 1 would
validate and test on images stage 1 learned from, and nothing would say so. Bookkeeping, not the
method: cleft.py imports this file, never the other way round.
"""

import hashlib
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from checkpoints import SPLIT_FILE, checkpoint_dir, read_saved, saved_folder
from checks import die, note, warn

# the folder of a patient in an image's path: the last one, nearest the file, if several match
CHEXPERT_PATIENT = re.compile(r"patient\d+")  # CheXpert, CheXpert Plus: train/patient00001/...
MIMIC_SUBJECT = re.compile(r"(?:^|[/\\])(p\d{8})[/\\]")  # MIMIC-CXR: files/p10/p10000032/s5.../


def patient_of(path):
    """The patient of an image: 'patient00001' (CheXpert, CheXpert Plus), 'p10000032' (MIMIC-CXR),
    else the image itself as an absolute path (CSV pairs, Open-I, RSNA, EMBED: one image, one key,
    the same whether a path came relative to a CSV's folder or joined to a data root)."""
    path = str(path)
    for pattern in (CHEXPERT_PATIENT, MIMIC_SUBJECT):
        if found := pattern.findall(path):
            return found[-1]
    return os.path.abspath(path)


def patient_hash(path):  # a signed 64-bit int: the first 8 bytes of the key's blake2b
    digest = hashlib.blake2b(patient_of(path).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def patient_hashes(paths):  # (N,) int64, one per path
    return torch.tensor([patient_hash(path) for path in paths], dtype=torch.int64)


def patient_record(splits, cfg):
    """What stage 1 writes to every checkpoint: {'tensors': {'train', 'val': the sorted, distinct
    patient hashes of its training and validation pairs}, 'metadata': where they came from}.
    'train' keeps the patients of OUT/last/'s record too (a run resumed with other data trained on
    them), and 'val' leaves out every patient trained on (two sources may split one patient
    apart). With --val-size, 'val' is the patients of the sample it validates on."""
    train = patient_hashes([pair[0] for pair in splits["train"]])
    val = patient_hashes([pair[0] for pair in splits["val"]])
    last = Path(cfg.out_dir) / "last"
    earlier = read_record(last) if saved_folder(last) else None  # the run this one resumes
    if earlier is not None:
        train = torch.cat([train, earlier["train"]])
    train = train.unique()  # sorted
    tensors = {"train": train, "val": val[~torch.isin(val, train)].unique()}
    metadata = {"data": cfg.data, "data_root": cfg.data_root, "val_fraction": str(cfg.val_fraction),
                "val_size": str(cfg.val_size),
                "hash": "blake2b, 8 bytes, little-endian, signed, of held_out.patient_of(image)"}
    return {"tensors": tensors, "metadata": metadata}


def read_record(ckpt):
    """{'train', 'val': patient hashes} of a stage-1 checkpoint folder, or None if it was saved
    before stage 1 recorded them. Read with safetensors alone (no pickle); a damaged file ends in
    one line (its manifest, or its format)."""
    path = checkpoint_dir(ckpt) / SPLIT_FILE
    if not path.exists():
        return None
    return read_saved(path, load_file)


def stage_1_split(splits, ckpt):
    """{'train', 'val', 'test'} of (image, label) pairs with 'val' made the pairs whose patient
    stage 1 held out and 'train' all the others ('test' as it is). Unchanged, with a note, if the
    checkpoint has no record or none of these patients is in it (another data set); unchanged
    and silent without a checkpoint (ckpt '': a baseline)."""
    if not ckpt:
        return splits
    record = read_record(ckpt)
    drawn_here = "the validation patients are drawn here (--val-fraction)"
    if record is None:
        note(f"{ckpt} has no record of the patients stage 1 held out (saved by an older "
             f"cleft.py): {drawn_here}, and stage 1 may have trained on them.")
        return splits
    pairs = splits["train"] + splits["val"]
    patients = patient_hashes([image for image, _ in pairs])
    if not torch.isin(patients, torch.cat([record["train"], record["val"]])).any():
        note(f"none of these {len(pairs)} images' patients is in {ckpt}'s record of stage 1's "
             f"(another data set): {drawn_here}.")
        return splits
    in_val = torch.isin(patients, record["val"]).tolist()
    return {"train": [pair for pair, out in zip(pairs, in_val) if not out],
            "val": [pair for pair, out in zip(pairs, in_val) if out],
            "test": splits["test"]}


def check_test(records, ckpt, allow, script):
    """How many test images (records: [(image, label)]) are of patients stage 1 trained on: one
    `error:` line if any, naming --allow-overlap, which turns it into a warning. None if that is
    not known (no checkpoint, or one saved before stage 1 recorded its patients)."""
    record = read_record(ckpt) if ckpt else None
    if record is None:
        return None
    trained_on = torch.isin(patient_hashes([image for image, _ in records]), record["train"])
    overlap = int(trained_on.sum())
    if overlap == 0:
        return 0
    first_image, _ = records[trained_on.tolist().index(True)]
    example = patient_of(first_image)
    found = (f"{overlap} of {len(records)} test images are of patients stage 1 trained on "
             f"({example}, e.g.)")
    if not allow:
        die(f"{found}: hold them out of stage 1 (CheXpert: build chexpert_5x200.csv before it) and "
            f"train again, or pass --allow-overlap to {script} for results that are not held out.")
    warn(f"{found}: --allow-overlap, so these test results are not held out.")
    return overlap
