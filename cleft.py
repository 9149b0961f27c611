"""
CLEFT stage 1: contrastive language-image pre-training with a frozen causal LLM adapted by PEFT
(Du, Chang, Dvornek, MICCAI 2024). The text tower is BioMedLM (GPT-2 architecture) with LoRA, the
image tower is DINOv2 ViT-B/14, and both meet in a 512-d space under a symmetric InfoNCE loss.

Demo (offline, synthetic CheXpert-layout data, tiny random models, a few minutes on a CPU):
    python cleft.py
Real CheXpert on one GPU, then on two:
    python cleft.py --data chexpert --data-root /data/chexpert
    torchrun --nproc_per_node=2 cleft.py --data chexpert --data-root /data/chexpert
Your own image/report pairs (a CSV with `image` and `text` columns, paths relative to it):
    torchrun --nproc_per_node=8 cleft.py --data csv --data-root /data/pairs.csv
Several nodes: the same command under torchrun --nnodes=N --node_rank=R --rdzv-endpoint=HOST:PORT.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config: one dataclass; every field is a command-line flag (`help` is its documentation)


@dataclass
class Config:
    # data
    data: str = field(default="demo", metadata={"help": "dataset", "choices": ["demo", "chexpert", "csv"]})
    data_root: str = field(default="", metadata={"help": "CheXpert folder (with train.csv), the CSV file for --data csv, or where the demo is written (default data/demo)"})
    image_size: int = field(default=224, metadata={"help": "square input side in pixels (paper: 224)"})
    augment: str = field(default="cleft", metadata={"help": "training views: cleft = mild zoom, rotation, shift and brightness/contrast jitter; clip = centre crop with brightness/contrast jitter", "choices": ["cleft", "clip"]})
    hflip: bool = field(default=False, metadata={"help": "random horizontal flips; off because laterality matters in chest X-rays"})
    max_length: int = field(default=64, metadata={"help": "caption tokens kept, EOS included (public code: 64); batches are padded only to their longest caption"})
    num_workers: int = field(default=-1, metadata={"help": "data-loading processes per rank (-1: the node's CPU cores shared among its ranks, less one for each rank's own process)"})
    image_cache: str = field(default="", metadata={"help": "folder for a small decoded copy of each image, written on first read: later epochs skip the full-resolution decode (about 120 KB an image at 224 px; same results)"})
    strict_data: bool = field(default=False, metadata={"help": "stop at the first unreadable image instead of skipping it"})
    # model
    preset: str = field(default="", metadata={"help": "a named set of defaults, see PRESETS (explicit flags still win)", "choices": ["", "medclip-vit-l"]})
    text_model: str = field(default="stanford-crfm/BioMedLM", metadata={"help": "hub id, local save_pretrained directory, or 'tiny' / 'tiny-bert' (random, offline)"})
    vision_model: str = field(default="facebook/dinov2-base", metadata={"help": "hub id, local save_pretrained directory, or 'tiny' (random, offline)"})
    peft: str = field(default="lora", metadata={"help": "adapter on the frozen LM (paper Table 3)", "choices": ["lora", "ia3", "prefix", "none"]})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (paper: 8)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (paper: 32)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (paper: 0.1)"})
    prefix_tokens: int = field(default=20, metadata={"help": "virtual tokens for --peft prefix (paper: 20)"})
    freeze_lm: bool = field(default=False, metadata={"help": "ablation: no adapter, the LM fully frozen (implies --peft none)"})
    full_ft_lm: bool = field(default=False, metadata={"help": "ablation: no adapter, every LM weight trained (implies --peft none)"})
    train_embed: bool = field(default=False, metadata={"help": "also train the LM's token embeddings"})
    embed_dim: int = field(default=512, metadata={"help": "shared embedding width (paper: 512)"})
    grad_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward to save memory (both towers)"})
    multi_positive: bool = field(default=False, metadata={"help": "identical captions in the global batch count as positives (soft targets)"})
    # optimisation (paper section 3.3)
    batch_size: int = field(default=72, metadata={"help": "global batch, split over all ranks (paper: 72)"})
    accum_steps: int = field(default=1, metadata={"help": "split each rank's batch into K micro-batches; the gradient-cache method keeps the contrastive gradient exact"})
    lr: float = field(default=4e-5, metadata={"help": "peak learning rate (paper: 4e-5)"})
    weight_decay: float = field(default=0.2, metadata={"help": "AdamW weight decay on matrices (paper: 0.2)"})
    warmup_steps: int = field(default=4000, metadata={"help": "linear warm-up steps (paper: 4000)"})
    max_steps: int = field(default=40000, metadata={"help": "optimizer steps (paper: 40000)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0: off)"})
    skip_nonfinite: bool = field(default=False, metadata={"help": "skip a step whose loss is NaN or infinite instead of stopping"})
    dtype: str = field(default="auto", metadata={"help": "auto = bf16 autocast on CUDA, fp32 on CPU", "choices": ["auto", "bf16", "fp32"]})
    seed: int = field(default=42, metadata={"help": "seed for initialisation, data order and augmentation"})
    # bookkeeping
    eval_every: int = field(default=1000, metadata={"help": "validate, zero-shot and save every N steps (and at the end)"})
    log_every: int = field(default=50, metadata={"help": "one log line every N steps"})
    out_dir: str = field(default="runs/cleft", metadata={"help": "where last/, best/ and metrics.jsonl go"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/last/ even if its config differs (with the same config it resumes anyway)"})
    dry_run: bool = field(default=False, metadata={"help": "build the model on the meta device, print its parameter table and exit (offline, seconds; the paper's models unless --text-model/--vision-model say otherwise)"})

    def __post_init__(self):
        if self.freeze_lm and self.full_ft_lm:
            die("--freeze-lm and --full-ft-lm contradict each other: pass one of them.")
        if self.freeze_lm or self.full_ft_lm:
            self.peft = "none"


# `--preset NAME` replaces these defaults; "demo" holds what changes with --data demo as well
PRESETS = {
    # Med-CLIP-ViT-L: a ViT-L/14 image tower and a BERT-base text tower ([CLS] pooling, 77 tokens), both fully
    # trained; AdamW lr 5e-5, decoupled weight decay 0.1, 2,000 warm-up steps then cosine, global batch 4,096;
    # centre crops with colour jitter and horizontal flips
    "medclip-vit-l": {"defaults": dict(text_model="bert-base-uncased", vision_model="facebook/dinov2-large", peft="none",
                                       full_ft_lm=True, max_length=77, lr=5e-5, weight_decay=0.1, warmup_steps=2000,
                                       batch_size=4096, augment="clip", hflip=True),
                      "demo": dict(text_model="tiny-bert")},
}

# `--data demo` changes these defaults so the demo runs in minutes on a laptop CPU
DEMO_DEFAULTS = dict(data_root="data/demo", text_model="tiny", vision_model="tiny", image_size=112, max_length=256,
                     batch_size=32, lr=5e-4, warmup_steps=30, max_steps=300, eval_every=100, log_every=20,
                     num_workers=2, out_dir="runs/demo")


def parse_config(argv=None, config_class=Config, demo_defaults=DEMO_DEFAULTS, description=__doc__):
    """Fill `config_class` from the command line; with --data demo, `demo_defaults` replace its defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.type, default=None, choices=f.metadata.get("choices"),
                                help=f"{f.metadata['help']} (default: {f.default})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = PRESETS.get(given.get("preset"), {})
    demo = given.get("data", config_class.data) == "demo" and not given.get("dry_run")  # a dry run counts the real model
    defaults = {**preset.get("defaults", {}), **(demo_defaults if demo else {}), **(preset.get("demo", {}) if demo else {})}
    return config_class(**{**defaults, **given})  # explicit flags win over presets and the demo defaults


def die(message):
    """A mistake the user can fix: one clear sentence, no traceback."""
    raise SystemExit(f"error: {message}")


# -----------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK; plain `python cleft.py` is a world of one


def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def world():
    """(rank, world_size) of this process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def autocast_for(dtype, device):
    """(name, context): 'auto' is bf16 autocast on CUDA and fp32 on CPU; weights stay fp32 either way."""
    dtype = dtype if dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return dtype, (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext())


def print0(*args, **kwargs):
    if world()[0] == 0:
        print(*args, **kwargs, flush=True)


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient of every rank's copy and hands each
    rank the slice of its own rows: the local rows keep their gradient, and nothing is lost."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank computed a loss that reads these rows
        rank, world_size = world()
        rows = grad.shape[0] // world_size
        return grad[rank * rows:(rank + 1) * rows]


def sum_over_ranks(number, device):
    """The sum of a count over all ranks (all ranks call this); the count itself for one process."""
    if world()[1] == 1:
        return number
    total = torch.tensor(number, device=device)
    dist.all_reduce(total)
    return total.item()


def all_gather_rows(x):
    """Concatenate x from every rank in rank order (all ranks call this); identity for one process."""
    return GatherWithGrad.apply(x) if world()[1] > 1 else x


# -----------------------------------------------------------------------------
# Data: CheXpert-layout CSVs, captions from labels, image loading, samplers, the demo dataset

# label columns of CheXpert's train.csv, in the header's order
FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + FINDINGS
# CheXpert-5x200 (GLoRIA): the zero-shot classes, and the findings that must be absent besides them
FIVE_CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
MUST_BE_ABSENT = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
                  "Pleural Other", "Fracture", "Support Devices"]
CAPTION_PREFIX = "this is a chest x ray of a patient with "
SPLIT_SEED = 0  # the validation split stays fixed when --seed changes, so runs stay comparable


def caption_from_labels(row):
    """Positive findings (1.0 only; uncertain -1 and blank count as absent) in header order, lower case."""
    positives = [name.lower() for name in FINDINGS if row[name] in ("1", "1.0")]
    return CAPTION_PREFIX + (", ".join(positives) if positives else "no finding")


def class_prompts(names):
    """The hand-written zero-shot prompt of each class."""
    return [CAPTION_PREFIX + name.lower() for name in names]


def five_class_index(row):
    """Index into FIVE_CLASSES if the row is positive for exactly one of them and negative (blank = 0) for the
    other four and for MUST_BE_ABSENT, else None (GLoRIA's 5x200 rule; any uncertain -1 excludes the row)."""
    values = [float(row[name] or 0) for name in FIVE_CLASSES + MUST_BE_ABSENT]
    if any(v == -1 for v in values) or any(values[len(FIVE_CLASSES):]):
        return None
    positives = [i for i, v in enumerate(values[:len(FIVE_CLASSES)]) if v == 1]
    return positives[0] if len(positives) == 1 else None


def build_5x200(rows, per_class=200, seed=0):
    """Sample `per_class` frontal rows of each class under the 5x200 rule, with a fixed seed."""
    by_class = {i: [] for i in range(len(FIVE_CLASSES))}
    for row in rows:
        if row["Frontal/Lateral"] == "Frontal" and five_class_index(row) is not None:
            by_class[five_class_index(row)].append(row)
    rng = random.Random(seed)
    for i, candidates in by_class.items():
        if len(candidates) < per_class:
            die(f"only {len(candidates)} rows qualify for {FIVE_CLASSES[i]}, fewer than {per_class}: lower the count per class.")
    return [row for i in by_class for row in rng.sample(by_class[i], per_class)]


def patient_id(path):
    match = re.search(r"patient\d+", path)
    return match.group(0) if match else path


def read_csv(path, columns):
    """Rows of a CSV as dicts, after checking that the columns we need are there."""
    if not os.path.isfile(path):
        die(f"{path} does not exist: check --data-root.")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            die(f"{path} lacks the column(s) {missing}: point --data-root at a file with the expected header (see README).")
        return list(reader)


def split_by_patient(rows, fraction, key=lambda row: patient_id(row["Path"])):
    """(train, val): `fraction` of the patients, drawn with SPLIT_SEED, go to val."""
    patients = sorted({key(row) for row in rows})
    random.Random(SPLIT_SEED).shuffle(patients)
    val_patients = set(patients[:max(1, round(fraction * len(patients)))])
    return [r for r in rows if key(r) not in val_patients], [r for r in rows if key(r) in val_patients]


def chexpert_rows(root, val_fraction=0.05):
    """Frontal rows of a CheXpert-layout folder: {'train', 'val', 'test'}. test = chexpert_5x200.csv when present;
    its patients are excluded from train and val. Each row gets 'image', its path on disk."""
    if not str(root):
        die("--data chexpert needs --data-root: the CheXpert folder that holds train.csv.")
    root = Path(root)
    rows = [r for r in read_csv(root / "train.csv", CHEXPERT_COLUMNS) if r["Frontal/Lateral"] == "Frontal"]
    test = []
    if (root / "chexpert_5x200.csv").exists():
        test = [r for r in read_csv(root / "chexpert_5x200.csv", CHEXPERT_COLUMNS) if five_class_index(r) is not None]
    test_patients = {patient_id(r["Path"]) for r in test}  # excluded by patient, not only by image
    train, val = split_by_patient([r for r in rows if patient_id(r["Path"]) not in test_patients], val_fraction)
    for row in train + val + test:
        row["image"] = str(root.joinpath(*Path(row["Path"]).parts[1:]))  # drop 'CheXpert-v1.0-small/'
    return {"train": train, "val": val, "test": test}


def load_splits(cfg, val_fraction=0.05):
    """{'train': [(path, caption)], 'val': [(path, caption)], 'test': [(path, class index)]} for cfg.data."""
    if cfg.data == "csv":
        if not cfg.data_root:
            die("--data csv needs --data-root: the CSV file with image and text columns.")
        rows = read_csv(cfg.data_root, ["image", "text"])
        to_pair = lambda row: (str(Path(cfg.data_root).parent / row["image"]), row["text"])
        train, val = split_by_patient(rows, val_fraction, key=lambda row: row["image"])
        return {"train": [to_pair(r) for r in train], "val": [to_pair(r) for r in val], "test": []}
    splits = chexpert_rows(cfg.data_root, val_fraction)  # chexpert, and the demo, written in CheXpert's layout
    return {"train": [(r["image"], caption_from_labels(r)) for r in splits["train"]],
            "val": [(r["image"], caption_from_labels(r)) for r in splits["val"]],
            "test": [(r["image"], five_class_index(r)) for r in splits["test"]]}


def read_dicom(path):
    """A DICOM file as an 8-bit grayscale PIL image: scaled by its maximum, MONOCHROME1 inverted (RSNA)."""
    import pydicom  # optional: only DICOM datasets need it
    dicom = pydicom.dcmread(path)
    pixels = dicom.pixel_array.astype(np.float32)
    pixels = pixels / max(float(pixels.max()), 1e-6)
    if dicom.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = 1 - pixels
    return Image.fromarray((pixels * 255).astype(np.uint8))


def decode_xray(path, size):
    """The image at `path` as 8-bit grayscale, shrunk by a whole factor while its shorter side stays >= size:
    a JPEG is decoded at 1/2, 1/4 or 1/8 scale (draft mode), any other image is box-reduced after decoding."""
    if str(path).lower().endswith(".dcm"):
        image = read_dicom(path)
    else:
        with Image.open(path) as image:
            image.draft("L", (size, size))
            image = image.convert("L")
    factor = min(image.size) // size
    return image.reduce(factor) if factor > 1 else image


def cached_xray(path, size, cache):
    """decode_xray through a folder of .npy files: the first read of an image stores its small decoded copy
    (about 120 KB for a 224 px input), later reads load it and skip the full-resolution decode. The entry is
    keyed by path, size and modification time, and written atomically, so workers and ranks can share it."""
    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{size}".encode()).hexdigest()
    file = Path(cache, key[:2], key + ".npy")
    try:
        return Image.fromarray(np.load(file, allow_pickle=False))
    except (OSError, ValueError, EOFError):  # not cached yet, or a damaged entry: decode, store
        image = decode_xray(path, size)
    temp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".tmp", delete=False) as f:  # a unique name, any host
            temp = f.name
            np.save(f, np.asarray(image))
        os.replace(temp, file)
    except OSError as error:  # a full or read-only disk costs speed, never an image (warned once per process)
        warnings.warn(f"cannot write to the image cache {cache} ({error.strerror}): images are decoded without it")
        if temp:
            with suppress(OSError):
                os.unlink(temp)  # a partly written entry
    return image


def load_image(path, size, rng=None, hflip=False, affine=True, cache=""):
    """An X-ray as a (1, size, size) float tensor in [0, 1]; the image tower normalises it. The shorter side is
    scaled to `size` and the rest cropped (aspect ratio kept). rng=None gives the deterministic centre view used
    for evaluation; an rng gives a random training view: brightness and contrast, plus (affine=True) a mild
    zoom, rotation and shift. cache: a folder for cached_xray ('' = decode every time)."""
    image = cached_xray(path, size, cache) if cache else decode_xray(path, size)
    affine = affine and rng is not None
    zoom = rng.uniform(1.0, 1.15) if affine else 1.0
    scale = size * zoom / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    if affine:
        image = image.rotate(rng.uniform(-10, 10), Image.Resampling.BILINEAR)
        left, top = rng.integers(0, width - size + 1), rng.integers(0, height - size + 1)
    else:
        left, top = (width - size) // 2, (height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255  # (S, S)
    if rng:
        mean = pixels.mean()
        pixels = np.clip((pixels - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.8, 1.2), 0, 1)
        if hflip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(pixels))[None]  # (1, S, S); one channel is a third of the IPC


class XrayDataset(Dataset):
    """(image path, target) records; item (index, augmentation seed or None) -> (image, target, skipped), where
    skipped names the unreadable image the returned one stands in for ('' when there was none)."""

    def __init__(self, records, image_size, hflip=False, affine=True, cache=""):
        self.records, self.image_size, self.hflip, self.affine, self.cache = records, image_size, hflip, affine, cache
        self.reported = set()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        index, aug_seed = item
        skipped = ""
        for offset in range(len(self)):  # an unreadable image is skipped: the next one stands in, the batch stays full
            path, target = self.records[(index + offset) % len(self)]
            try:
                return load_image(path, self.image_size, np.random.default_rng(aug_seed) if aug_seed else None,
                                  self.hflip, self.affine, self.cache), target, skipped
            except (OSError, ValueError) as error:  # missing, truncated or corrupt
                skipped = skipped or path
                if path not in self.reported:
                    self.reported.add(path)
                    print(f"warning: skipping unreadable image {path} ({error})", file=sys.stderr, flush=True)
        raise RuntimeError(f"none of the {len(self)} images can be read (the first: {self.records[0][0]}): check the data root.")


class TrainBatches(Sampler):
    """Endless batches of (index, augmentation seed) for one rank. Global batch `step` is a fixed slice of
    a seeded permutation of epoch `step // steps_per_epoch`: it is the same whatever the number of ranks,
    and a resumed run starts at any step without replaying the data before it."""

    def __init__(self, n, batch_size, seed, start_step=0):
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.steps_per_epoch = n // batch_size

    def __iter__(self):
        rank, world_size = world()
        per_rank = self.batch_size // world_size
        step, epoch, order = self.start_step, None, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            start = (step % self.steps_per_epoch) * self.batch_size + rank * per_rank
            yield [(i, (self.seed, epoch, i)) for i in order[start:start + per_rank]]
            step += 1


def eval_batches(n, batch_size, pad):
    """This rank's share of fixed-order global batches over n items. Gathering a batch across ranks gives
    the items in dataset order. pad=True repeats the last item to fill the last batch (callers trim);
    pad=False drops the incomplete last batch (a contrastive loss needs full batches)."""
    rank, world_size = world()
    indices = list(range(n)) + [n - 1] * (-n % batch_size) if pad else list(range(n - n % batch_size))
    per_rank = batch_size // world_size
    return [[(i, None) for i in indices[start + rank * per_rank:start + (rank + 1) * per_rank]]
            for start in range(0, len(indices), batch_size)]


def make_loader(dataset, batches, cfg, device, persistent=False):
    workers = cfg.num_workers
    if workers < 0:  # every core of the node at work: decoding is the input pipeline's cost
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)
    # its own generator: starting a loader then leaves the global RNG (dropout) alone, so resumes replay exactly
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=persistent and workers > 0, generator=torch.Generator())


def render_xray(findings, rng, height=160, width=128):
    """A synthetic frontal chest X-ray (uint8, height x width) in which each finding is a visible pattern."""
    v, u = np.mgrid[-1:1:height * 1j, -1:1:width * 1j]  # v down, u across, both in [-1, 1]
    inside = lambda cu, cv, ru, rv: ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 < 1
    blob = lambda cu, cv, r: np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * r * r))
    smooth_noise = lambda cells: np.asarray(Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32))
                                            .resize((width, height), Image.Resampling.BICUBIC))
    s, du, dv = rng.uniform(0.9, 1.1), *rng.uniform(-0.06, 0.06, 2)  # body size and position vary
    image = np.full((height, width), 0.08) + 0.47 * inside(du, dv + 0.05, 0.9 * s, 1.0 * s)
    lung_centres = [du - 0.4 * s, du + 0.4 * s]
    lungs = [inside(cu, dv - 0.05, 0.3 * s, 0.62 * s) for cu in lung_centres]
    either_lung = lungs[0] | lungs[1]
    image[either_lung] = 0.2
    image += 0.05 * smooth_noise(12) * either_lung  # vessel texture
    image += 0.2 * (np.abs(u - du) < 0.07)  # spine
    heart = rng.uniform(1.3, 1.55) if "Cardiomegaly" in findings else rng.uniform(0.85, 1.1)
    image[inside(du + 0.12, dv + 0.3, 0.23 * heart * s, 0.17 * heart * s)] = 0.7
    side = rng.integers(2)  # the lung a one-sided finding appears in
    if "Pleural Effusion" in findings:  # fluid filling the base of one or both lungs, with a meniscus
        for k in ([side] if rng.random() < 0.6 else [0, 1]):
            level = dv + 0.57 * s - rng.uniform(0.2, 0.4) - 0.3 * (u - lung_centres[k]) ** 2
            image[lungs[k] & (v > level)] = rng.uniform(0.5, 0.62)
    if "Consolidation" in findings:  # a dense patch with mottled texture
        cu, cv, r = lung_centres[side] + rng.uniform(-0.1, 0.1), dv + rng.uniform(-0.3, 0.3), rng.uniform(0.08, 0.14)
        image += rng.uniform(0.25, 0.4) * blob(cu, cv, r) * (0.8 + 0.4 * smooth_noise(20)) * lungs[side]
    if "Atelectasis" in findings:  # a thin plate-like band in a lower lung
        cu, cv, angle = lung_centres[side], dv + rng.uniform(0.1, 0.35), rng.uniform(-0.4, 0.4)
        along, across = (u - cu) * np.cos(angle) + (v - cv) * np.sin(angle), -(u - cu) * np.sin(angle) + (v - cv) * np.cos(angle)
        image += rng.uniform(0.2, 0.35) * ((np.abs(across) < 0.03) & (np.abs(along) < 0.22)) * lungs[side]
    if "Edema" in findings:  # bilateral perihilar haze and short horizontal (Kerley B) lines at the edges
        image += rng.uniform(0.1, 0.18) * blob(du, dv, 0.45) * either_lung
        for _ in range(6):
            cv, cu = dv + rng.uniform(0.1, 0.5), du + rng.choice([-1, 1]) * rng.uniform(0.55, 0.65) * s
            image += 0.15 * ((np.abs(v - cv) < 0.012) & (np.abs(u - cu) < 0.08)) * either_lung
    if "Pneumothorax" in findings:  # air without vessels at the apex of one lung
        image[lungs[side] & (v < dv - 0.35) & (np.abs(u - lung_centres[side]) > 0.05)] = 0.06
    if "Support Devices" in findings:  # a tube running down the middle
        image += 0.5 * ((np.abs(u - du - 0.03 - 0.05 * v) < 0.012) & (v < dv + 0.25))
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 0.035, image.shape)  # exposure and noise
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


DEMO_FINDINGS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]  # what it renders


def make_demo_dataset(root, patients=1200, per_class=50, seed=0):
    """Write a synthetic CheXpert-layout dataset (train.csv, valid.csv, chexpert_5x200.csv and JPEGs) into
    `root`; an existing one is kept. Built in a temporary folder and renamed, so it is never half there."""
    root = Path(root)
    if (root / "train.csv").exists():
        return
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    print0(f"writing the synthetic demo dataset to {root} (once)")
    splits = {"train": [], "valid": []}
    for p in range(1, patients + 1):
        split = "valid" if p > patients - 20 else "train"
        sex, age = rng.choice(["Male", "Female"]), int(rng.integers(18, 90))
        for study in range(1, int(rng.integers(1, 3)) + 1):
            k = rng.choice(4, p=[0.3, 0.45, 0.2, 0.05])  # how many of the five findings this study shows
            shown = list(rng.choice(DEMO_FINDINGS, size=k, replace=False))
            shown += [extra for extra, prob in [("Support Devices", 0.15), ("Pneumothorax", 0.05)] if rng.random() < prob]
            labels = {name: rng.choice(["", "0.0"]) for name in FINDINGS}  # unmentioned: blank or negative
            for name in shown:
                labels[name] = "-1.0" if rng.random() < 0.1 else "1.0"  # sometimes the report is uncertain
            if ("Consolidation" in shown or "Edema" in shown) and rng.random() < 0.3:
                labels["Lung Opacity"] = "1.0"
            labels["No Finding"] = "" if shown else "1.0"
            for view in ["frontal"] + (["lateral"] if rng.random() < 0.3 else []):
                relative = f"{split}/patient{p:05d}/study{study}/view{1 if view == 'frontal' else 2}_{view}.jpg"
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                pixels = render_xray(shown, rng)
                Image.fromarray(pixels if view == "frontal" else np.rot90(pixels)).save(tmp / relative, quality=90)
                splits[split].append({"Path": f"CheXpert-v1.0-small/{relative}", "Sex": sex, "Age": age,
                                      "Frontal/Lateral": view.capitalize(),
                                      "AP/PA": rng.choice(["AP", "PA"]) if view == "frontal" else "", **labels})
    tables = {"train.csv": splits["train"], "valid.csv": splits["valid"],
              "chexpert_5x200.csv": build_5x200(splits["train"], per_class=per_class, seed=seed)}
    for name, rows in tables.items():
        with open(tmp / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CHEXPERT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)


def prepare_demo(cfg):
    """With --data demo, rank 0 writes the synthetic dataset once and the other ranks wait for it."""
    if cfg.data == "demo":
        if world()[0] == 0:
            make_demo_dataset(cfg.data_root)
        if world()[1] > 1:
            dist.barrier()


# -----------------------------------------------------------------------------
# Model: image tower (DINOv2), text tower (frozen causal LM + PEFT), CLEFT = both + projections


def tiny_tokenizer(bert=False):
    """A byte-level tokenizer (256 bytes + EOS) that encodes any text and needs no download. bert=True adds
    BERT's [CLS] caption [SEP] framing and a [PAD] token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if not bert:
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    tokenizer.add_special_tokens(["[CLS]", "[SEP]", "[PAD]"])  # ids 257, 258, 259
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 257), ("[SEP]", 258)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")


# The architectures (configs, not weights) of the default and preset models, so --dry-run works offline
ARCHITECTURES = {
    "stanford-crfm/BioMedLM": ("gpt2", dict(vocab_size=28896, n_positions=1024, n_embd=2560, n_layer=32, n_head=20,
                                            bos_token_id=28895, eos_token_id=28895)),
    "facebook/dinov2-base": ("dinov2", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518, patch_size=14)),
    "facebook/dinov2-with-registers-base": ("dinov2_with_registers", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                                        image_size=518, patch_size=14, num_register_tokens=4)),
    "facebook/dinov2-large": ("dinov2", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14)),
    "bert-base-uncased": ("bert", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12)),
    # small versions of the same architectures, random and offline, for demos and tests
    "tiny text": ("gpt2", dict(vocab_size=257, n_positions=512, n_embd=64, n_layer=2, n_head=4, bos_token_id=256, eos_token_id=256)),
    "tiny vision": ("dinov2", dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=112, patch_size=14)),
    "tiny-bert text": ("bert", dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    pad_token_id=259)),
}


def model_config(name, kind):
    """The architecture of model `name`: 'tiny' ones from ARCHITECTURES; others from the hub or a local
    directory, falling back to the copy in ARCHITECTURES when that cannot be reached."""
    from transformers import AutoConfig
    if name.startswith("tiny"):
        name = f"{name} {kind}"
        if name not in ARCHITECTURES:
            die(f"there is no {name} model: use --{kind}-model tiny" + (" or tiny-bert." if kind == "text" else "."))
    else:
        try:
            return AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            if name not in ARCHITECTURES:
                die(f"cannot read the config of '{name}' ({str(error).splitlines()[0]}): download it once with network "
                    "access (or unset HF_HUB_OFFLINE), or pass a local save_pretrained directory.")
    model_type, kwargs = ARCHITECTURES[name]
    return AutoConfig.for_model(model_type, **kwargs)


def load_pretrained(name, kind, weights=True):
    """(model, tokenizer or None) from a hub id or local directory; 'tiny' and 'tiny-bert' build random small
    models; weights=False builds the architecture alone (for --dry-run, under the meta device)."""
    from transformers import AutoModel, AutoTokenizer
    if name.startswith("tiny") or not weights:
        with torch.random.fork_rng():  # the same frozen weights every time: checkpoints store only trained ones
            torch.manual_seed(0)
            model = AutoModel.from_config(model_config(name, kind))
        tiny_text = name.startswith("tiny") and kind == "text"
        return model, tiny_tokenizer(bert=name == "tiny-bert") if tiny_text else None
    try:
        model = AutoModel.from_pretrained(name, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(name) if kind == "text" else None
    except (OSError, ValueError) as error:
        die(f"cannot load the {kind} model '{name}' ({str(error).splitlines()[0]}): download it once with network "
            f"access (or unset HF_HUB_OFFLINE), pass a local save_pretrained directory, or use --{kind}-model tiny.")


def enable_checkpointing(model):
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # DINOv2 was trained on ImageNet statistics
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class ImageTower(nn.Module):
    """DINOv2; the image feature is the mean of the last block's tokens, final layer norm removed (paper)."""

    def __init__(self, cfg):
        super().__init__()
        self.model, _ = load_pretrained(cfg.vision_model, "vision", weights=not cfg.dry_run)
        self.model.layernorm = nn.Identity()
        # used only by masked-image pre-training; DDP fails on a trainable parameter that gets no gradient
        self.model.embeddings.mask_token.requires_grad_(False)
        self.width = self.model.config.hidden_size
        if cfg.grad_checkpointing:
            enable_checkpointing(self.model)
        # buffers, so .to(device) moves them once (not a blocking copy every step); not in checkpoints
        self.register_buffer("mean", IMAGE_MEAN.clone(), persistent=False)
        self.register_buffer("std", IMAGE_STD.clone(), persistent=False)

    def forward(self, images):  # (B, 1 or 3, S, S) pixels in [0, 1] -> (B, width)
        pixels = (images.expand(-1, 3, -1, -1) - self.mean) / self.std  # gray copied to 3 channels, normalised
        return self.model(pixel_values=pixels).last_hidden_state.mean(dim=1)


def peft_config(cfg):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig
    if cfg.peft == "lora":  # GPT-2's fused q/k/v projection is a Conv1D: fan_in_fan_out
        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=["c_attn"], fan_in_fan_out=True)
    if cfg.peft == "ia3":
        return IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)
    return PrefixTuningConfig(num_virtual_tokens=cfg.prefix_tokens, task_type="FEATURE_EXTRACTION")


class TextTower(nn.Module):
    """A causal LM read at the end-of-sequence token: with causal attention that is the one position
    that has seen the whole caption (paper section 2.1). The LM is frozen; PEFT adds what is trained.
    An encoder such as BERT (the medclip-vit-l preset) is read at its [CLS] token instead."""

    def __init__(self, cfg):
        super().__init__()
        model, self.tokenizer = load_pretrained(cfg.text_model, "text", weights=not cfg.dry_run)
        self.read_cls = self.tokenizer.cls_token is not None if self.tokenizer else model.config.model_type == "bert"
        self.eos_id = self.tokenizer.eos_token_id if self.tokenizer else model.config.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer and self.tokenizer.pad_token else self.eos_id
        self.max_length, self.width = cfg.max_length, model.config.hidden_size
        if getattr(model, "pooler", None) is not None:  # BERT's pooler layer: unused by [CLS] pooling, and DDP
            model.pooler = None  # fails on a trainable parameter that never gets a gradient
        model.requires_grad_(cfg.full_ft_lm)
        if cfg.grad_checkpointing and cfg.peft == "prefix":
            print0("note: peft does not support prefix tuning with gradient checkpointing; the text tower runs without it")
        elif cfg.grad_checkpointing:
            enable_checkpointing(model)
        if cfg.peft != "none":
            from peft import get_peft_model
            model = get_peft_model(model, peft_config(cfg))
        if cfg.train_embed:
            model.get_input_embeddings().requires_grad_(True)
        self.model = model

    def tokenize(self, captions):
        """(input_ids (B, T), attention_mask (B, T), pooled positions (B,)), right-padded only to the longest
        caption. Causal LM: an EOS appended explicitly and kept under truncation, pooled there. Encoder: the
        tokenizer's own [CLS] ... [SEP], pooled at [CLS] (position 0)."""
        if self.read_cls:
            ids = self.tokenizer(list(captions), truncation=True, max_length=self.max_length)["input_ids"]
        else:
            ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
            ids = [x[:self.max_length - 1] + [self.eos_id] for x in ids]
        longest = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [self.pad_id] * (longest - len(x)) for x in ids])
        attention_mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])
        positions = [0 if self.read_cls else len(x) - 1 for x in ids]
        return input_ids, attention_mask, torch.tensor(positions)

    def forward(self, captions):  # list of B strings -> (B, width)
        position = {c: i for i, c in enumerate(dict.fromkeys(captions))}  # labels repeat: encode each caption once
        unique = list(position)
        input_ids, attention_mask, eos_positions = (t.to(self.model.device) for t in self.tokenize(unique))
        pooled = self.pool_at_eos(eos_positions, input_ids=input_ids, attention_mask=attention_mask)  # (U, width)
        return pooled[torch.tensor([position[c] for c in captions], device=pooled.device)]  # (B, width)

    def pool_at_eos(self, eos_positions, **inputs):
        """Run the LM on input_ids or inputs_embeds (B, T, ...) and return the hidden states at the EOS, (B, width)."""
        hidden = self.model(**inputs).last_hidden_state  # (B, T, width)
        return hidden[torch.arange(len(hidden), device=hidden.device), eos_positions]


class CLEFT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.image_tower = ImageTower(cfg)
        self.text_tower = TextTower(cfg)
        self.image_projection = nn.Linear(self.image_tower.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text_tower.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature 0.07 (CLIP)

    def encode_image(self, images):  # (B, 1 or 3, S, S) in [0, 1] -> (B, D), unit length, fp32
        return F.normalize(self.image_projection(self.image_tower(images)).float(), dim=-1)

    def encode_text(self, captions):  # B strings -> (B, D), unit length, fp32
        return F.normalize(self.text_projection(self.text_tower(captions)).float(), dim=-1)

    def forward(self, images, captions):  # the scale too, so DDP sees every trained tensor used in forward
        return self.encode_image(images), self.encode_text(captions), self.logit_scale


# -----------------------------------------------------------------------------
# Loss: symmetric InfoNCE over the global batch (paper Eq. 1)


def caption_ids(captions, device):
    """A stable 63-bit id per caption, equal on every rank for equal text (for --multi-positive)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") >> 1
                         for c in captions], device=device)


def contrastive_loss(image_features, text_features, logit_scale, ids=None):
    """Paper Eq. 1 for this rank's rows against the whole global batch, in fp32.

    image_features, text_features: (b, D) unit vectors of this rank's pairs; every rank has the same b.
    ids: (b,) caption ids; when given, pairs with identical captions are positives too (soft targets).
    Each rank averages over its own rows and DDP averages over ranks: that is the full-batch mean, and
    with GatherWithGrad the gradients equal a one-process run on the global batch."""
    rank, _ = world()
    all_images, all_texts = all_gather_rows(image_features), all_gather_rows(text_features)  # (N, D)
    scale = logit_scale.float().exp()
    logits_per_image = scale * image_features.float() @ all_texts.float().T  # (b, N)
    logits_per_text = scale * text_features.float() @ all_images.float().T  # (b, N)
    if ids is None:
        targets = torch.arange(len(image_features), device=image_features.device) + rank * len(image_features)
    else:
        same = (ids[:, None] == all_gather_rows(ids)[None, :]).float()  # (b, N)
        targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def train_step(model, images, captions, cfg, autocast):
    """Forward and backward of this rank's share of one global batch; returns the loss (detached).

    With cfg.accum_steps = K > 1 the batch goes through in K micro-batches, and the gradient is still exactly
    that of the whole batch (gradient cache): dividing InfoNCE over micro-batches would give each one fewer
    negatives. 1) embed every micro-batch without a graph; 2) compute the loss over the whole batch and its
    gradient with respect to the embeddings; 3) re-run each micro-batch with a graph, replaying its dropout,
    and back-propagate those gradients. Under DDP, gradients are synchronised on the last micro-batch only."""
    ids = caption_ids(captions, images.device) if cfg.multi_positive else None
    if cfg.accum_steps == 1:
        with autocast:
            image_features, text_features, logit_scale = model(images, captions)
        loss = contrastive_loss(image_features, text_features, logit_scale, ids)
        loss.backward()
        return loss.detach()
    size = len(captions) // cfg.accum_steps
    chunks = [(images[k:k + size], captions[k:k + size]) for k in range(0, len(captions), size)]
    states, image_parts, text_parts = [], [], []
    with torch.no_grad():  # 1)
        for chunk_images, chunk_captions in chunks:
            states.append(rng_state())
            with autocast:
                image_part, text_part, logit_scale = model(chunk_images, chunk_captions)
            image_parts.append(image_part)
            text_parts.append(text_part)
    image_features = torch.cat(image_parts).requires_grad_()  # (b, D)
    text_features = torch.cat(text_parts).requires_grad_()  # (b, D)
    scale = logit_scale.detach().requires_grad_()
    loss = contrastive_loss(image_features, text_features, scale, ids)  # 2)
    loss.backward()
    for k, (chunk_images, chunk_captions) in enumerate(chunks):  # 3)
        last = k == len(chunks) - 1
        set_rng_state(states[k])  # the same dropout masks as in 1)
        with nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync():
            with autocast:
                image_part, text_part, logit_scale = model(chunk_images, chunk_captions)
            rows = slice(k * size, (k + 1) * size)
            outputs, grads = [image_part, text_part], [image_features.grad[rows], text_features.grad[rows]]
            if last:  # the temperature's gradient goes in once, with the last backward
                outputs, grads = outputs + [logit_scale], grads + [scale.grad]
            torch.autograd.backward(outputs, grads)
    return loss.detach()


# -----------------------------------------------------------------------------
# Optimizer and schedule


def get_lr(step, cfg):
    # 1) linear warm-up from 0 to cfg.lr over warmup_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    # 2) then cosine decay to 0 at max_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices only: not on biases, norms, IA3 vectors or the logit scale."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def count_parameters(model):
    trainable = lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad)
    towers = {"image tower": trainable(model.image_tower), "text tower": trainable(model.text_tower)}
    return {**towers, "projections and temperature": trainable(model) - sum(towers.values()), "total": trainable(model)}


def parameter_report(cfg):
    """--dry-run: the configured model built on the meta device (no weights, no memory, no download), counted,
    and set against the paper's comparison: a CLIP whose text tower is a fully trained BERT-base."""
    cfg = replace(cfg, dry_run=True)
    with torch.device("meta"):
        model = CLEFT(cfg)
        bert = CLEFT(replace(cfg, text_model="bert-base-uncased", peft="none", full_ft_lm=True, freeze_lm=False))
    count = lambda params: sum(p.numel() for p in params)
    trained = lambda module: count(p for p in module.parameters() if p.requires_grad)
    lm_mode = "frozen" if cfg.freeze_lm else "fully trained" if cfg.full_ft_lm else cfg.peft
    rows = [(f"image tower ({cfg.vision_model})", model.image_tower),
            (f"text tower ({cfg.text_model}, {lm_mode}{', embeddings trained' if cfg.train_embed else ''})", model.text_tower),
            ("projections", nn.ModuleList([model.image_projection, model.text_projection]))]
    lines = ["| part | parameters | trained |", "|---|---:|---:|"]
    lines += [f"| {name} | {count(m.parameters()):,} | {trained(m):,} |" for name, m in rows]
    lines += ["| temperature | 1 | 1 |", f"| **total** | **{count(model.parameters()):,}** | **{trained(model):,}** |", ""]
    lm_trained, lm_total = trained(model.text_tower), count(model.text_tower.parameters())
    bert_text = trained(bert.text_tower)
    lines += [f"trained share of the text tower: {100 * lm_trained / lm_total:.3f}% ({lm_trained:,} of {lm_total:,})",
              f"trained text-tower parameters vs a fully trained BERT-base text tower ({bert_text:,}): {100 * lm_trained / bert_text:.2f}%",
              f"trained parameters in all vs that CLIP baseline ({trained(bert):,}): {100 * trained(model) / trained(bert):.1f}%"]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Checkpoints: OUT/{last,best}/ = config.json, model.safetensors (trained weights), adapter/ (peft), state.pt


def trained_weights(model):
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory, model, optimizer, cfg, step, best_val_loss, progress=None):
    """Every rank calls this (the RNG states are gathered); rank 0 writes into a temporary folder and
    renames it into place, so a crash while saving leaves the previous checkpoint whole."""
    rank, world_size = world()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0)}
    rng_per_rank = [rng]
    if world_size > 1:
        rng_per_rank = [None] * world_size
        dist.all_gather_object(rng_per_rank, rng)
    if rank != 0:
        return
    directory, tmp, old = Path(directory), Path(f"{directory}.tmp"), Path(f"{directory}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    save_file(trained_weights(model), tmp / "model.safetensors")
    if cfg.peft != "none":
        model.text_tower.model.save_pretrained(tmp / "adapter")  # loadable by PeftModel.from_pretrained
    torch.save({"step": step, "best_val_loss": best_val_loss, "optimizer": optimizer.state_dict(), "rng": rng_per_rank,
                "progress": progress or {}}, tmp / "state.pt")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(directory):
    """The checkpoint folder, or the previous one if a crash hit between the two renames of a save."""
    directory = Path(directory)
    if not (directory / "model.safetensors").exists() and (Path(f"{directory}.old") / "model.safetensors").exists():
        return Path(f"{directory}.old")
    if not (directory / "model.safetensors").exists():
        die(f"no checkpoint in {directory}: pass the last/ or best/ folder of a finished cleft.py run.")
    return directory


def load_state(directory):
    """state.pt of a checkpoint: plain tensors and numbers only (weights_only=True: no pickled code can run)."""
    path = checkpoint_dir(directory) / "state.pt"
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        die(f"{path} holds more than tensors and numbers, so it was refused unread ({str(error).splitlines()[0][:80]}): "
            "resume only from checkpoints written by cleft.py.")


def config_differences(saved, cfg, ignore=("resume", "num_workers", "image_cache", "log_every", "eval_every", "strict_data", "dry_run")):
    """Names of the config fields (other than bookkeeping) in which `saved` and `cfg` differ."""
    return [f.name for f in fields(Config) if f.name not in ignore and getattr(saved, f.name) != getattr(cfg, f.name)]


def load_config(directory):
    saved = json.loads((checkpoint_dir(directory) / "config.json").read_text())
    return Config(**{f.name: saved[f.name] for f in fields(Config) if f.name in saved})


def load_model(directory, cfg=None):
    """CLEFT with the weights trained in checkpoint `directory` (untrained weights come from the base models)."""
    directory = checkpoint_dir(directory)
    cfg = cfg or load_config(directory)
    model = CLEFT(cfg)
    saved = load_file(directory / "model.safetensors")
    mismatch = saved.keys() ^ trained_weights(model).keys()  # the file must hold exactly the trained weights
    if mismatch:
        die(f"{directory} does not match its config.json ({sorted(mismatch)[:3]}...): was it written by another "
            "version of cleft.py?")
    model.load_state_dict(saved, strict=False)
    return model


# -----------------------------------------------------------------------------
# Evaluation: validation loss and zero-shot accuracy (all ranks take part: they gather features)


@torch.no_grad()
def validation_loss(model, loader, autocast):
    """Mean contrastive loss over the full global batches of the held-out split; the same on every rank."""
    losses = []
    for images, captions, _ in loader:
        with autocast:
            image_features, text_features, _ = model(images.to(model.logit_scale.device), captions)
        losses.append(contrastive_loss(image_features, text_features, model.logit_scale))  # this rank's rows
    loss = torch.stack(losses).mean()
    if world()[1] > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # every rank must agree on whether best/ improved
    return loss.item()


@torch.no_grad()
def embed_images(model, loader, n, autocast, progress=False, encode=None):
    """(features (n, D), labels (n,)) of an eval_batches(pad=True) loader over n items, on every rank:
    each rank embeds its share of every batch and the shares are gathered. encode: images -> features
    (default: the unit-length shared-space embedding, model.encode_image)."""
    device, encode = model.logit_scale.device, encode or model.encode_image
    features, labels = [], []
    for images, targets, _ in tqdm(loader, desc="image features", disable=not progress or world()[0] != 0, leave=False):
        with autocast:
            features.append(all_gather_rows(encode(images.to(device)).float()))  # (B, D)
        labels.append(all_gather_rows(targets.to(device)))  # (B,)
    return torch.cat(features)[:n], torch.cat(labels)[:n]


@torch.no_grad()
def zero_shot_accuracy(model, loader, n, classes, autocast):
    """Accuracy (%) of argmax over classes of cos(image, hand-written class prompt) on n images."""
    with autocast:
        class_features = model.encode_text(class_prompts(classes))  # (C, D)
    image_features, labels = embed_images(model, loader, n, autocast)
    return 100 * ((image_features @ class_features.T).argmax(dim=1) == labels).float().mean().item()


# -----------------------------------------------------------------------------
# Main


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.dry_run:
        print(parameter_report(cfg))
        return
    rank, world_size, device = setup_distributed()
    master = rank == 0
    if cfg.batch_size % world_size:
        die(f"--batch-size {cfg.batch_size} is the global batch and must divide by the {world_size} processes: change one.")
    if (cfg.batch_size // world_size) % cfg.accum_steps:
        die(f"each process's batch ({cfg.batch_size // world_size}) must divide by --accum-steps {cfg.accum_steps}: change one.")
    dtype, autocast = autocast_for(cfg.dtype, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print0(f"config: {json.dumps(asdict(cfg))}\nworld size {world_size} on {device}, {dtype}")

    prepare_demo(cfg)
    splits = load_splits(cfg)
    for name in ("train", "val"):
        if not splits[name]:
            die(f"the {name} split is empty after filtering (frontal views only, 5x200 patients excluded): check --data-root.")
        if len(splits[name]) < cfg.batch_size:
            die(f"the {name} split has {len(splits[name])} images, fewer than one global batch ({cfg.batch_size}): lower --batch-size.")
    print0(f"data: {len(splits['train'])} train, {len(splits['val'])} val, {len(splits['test'])} zero-shot test images")
    with suppress(OSError), Image.open(splits["train"][0][0]) as first:  # the header only
        if not cfg.image_cache and min(first.size) >= 4 * cfg.image_size:
            print0(f"tip: these images are large ({first.width} x {first.height}); with --image-cache DIR each is decoded "
                   "once and later epochs read a small copy, many times faster (README, Performance)")
    # resume: asked for, or a run with the same config already in --out-dir (a restarted job picks up by itself)
    out_dir, last = Path(cfg.out_dir), Path(cfg.out_dir) / "last"
    found = any((d / "model.safetensors").exists() for d in (last, Path(f"{last}.old")))
    if found and not cfg.resume:
        differences = config_differences(load_config(last), cfg)
        if differences:
            die(f"{out_dir} holds a run with a different config ({', '.join(differences[:5])}): pass --resume to continue "
                "it with these flags, or choose another --out-dir.")
    resume = cfg.resume or found
    start_step, best_val_loss, state = 0, float("inf"), None
    if resume:
        state = load_state(last)
        start_step, best_val_loss = state["step"], state["best_val_loss"]

    # model and optimizer (the same seed on every rank: identical initial weights)
    torch.manual_seed(cfg.seed)
    model = (load_model(last, cfg) if resume else CLEFT(cfg)).to(device)
    optimizer = make_optimizer(model, cfg, device)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and len(rng["cuda"]):
            torch.cuda.set_rng_state(rng["cuda"])
        print0(f"resumed from {last} at step {start_step}")
    else:
        torch.manual_seed(cfg.seed + rank)  # different dropout on each rank
    for name, count in count_parameters(model).items():
        print0(f"trainable parameters, {name}: {count:,}")
    raw_model = model
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_set = XrayDataset(splits["train"], cfg.image_size, cfg.hflip, cfg.augment == "cleft", cfg.image_cache)
    train_batches = TrainBatches(len(train_set), cfg.batch_size, cfg.seed, start_step)
    train_loader = iter(make_loader(train_set, train_batches, cfg, device, persistent=True))
    val_set = XrayDataset(splits["val"], cfg.image_size, cache=cfg.image_cache)
    val_loader = make_loader(val_set, eval_batches(len(val_set), cfg.batch_size, pad=False), cfg, device)
    test_set = XrayDataset(splits["test"], cfg.image_size, cache=cfg.image_cache)
    test_loader = make_loader(test_set, eval_batches(len(test_set), cfg.batch_size, pad=True), cfg, device)

    if master:  # on resume, drop what was logged after the checkpoint: those steps run again
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume and (out_dir / "metrics.jsonl").exists():
            kept = [line for line in (out_dir / "metrics.jsonl").read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        metrics = open(out_dir / "metrics.jsonl", "w")
        metrics.write("".join(line + "\n" for line in kept))

    progress = tqdm(total=cfg.max_steps, initial=start_step, disable=not master, dynamic_ncols=True, desc="train")

    def log(record, line):  # rank 0: one JSON line in metrics.jsonl, one line on screen
        if master:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            progress.write(line)

    counters = state.get("progress", {}) if state else {}  # absent from checkpoints of older versions
    loss_sum, nonfinite = counters.get("loss_sum", 0.0), counters.get("nonfinite", 0)
    skipped = counters.get("skipped", 0) if master else 0  # each rank counts its own; the saved count is their sum
    timer, timed_steps = time.time(), 0
    if resume and start_step == cfg.max_steps:
        print0(f"{last} is already at step {cfg.max_steps}: nothing to do (raise --max-steps to train on)")
    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        resumed_here = resume and step == start_step  # this step's evaluation and checkpoint are the ones resumed from

        # evaluate and save every eval_every steps and at the end (all ranks take part)
        if (step % cfg.eval_every == 0 or last_step) and not resumed_here:
            model.eval()
            record = {"step": step, "val_loss": validation_loss(raw_model, val_loader, autocast)}
            if len(test_set):
                record["zero_shot_acc"] = zero_shot_accuracy(raw_model, test_loader, len(test_set), FIVE_CLASSES, autocast)
            model.train()
            log(record, " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            counters = {"loss_sum": loss_sum, "skipped": sum_over_ranks(skipped, device), "nonfinite": nonfinite}
            if record["val_loss"] < best_val_loss:  # NaN never compares smaller: best/ is never replaced by it
                best_val_loss = record["val_loss"]
                save_checkpoint(out_dir / "best", raw_model, optimizer, cfg, step, best_val_loss, counters)
            save_checkpoint(last, raw_model, optimizer, cfg, step, best_val_loss, counters)
            timer, timed_steps = time.time(), 0  # evaluation time is not training throughput
        if last_step:
            break

        # one optimisation step on the global batch
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions, unreadable = next(train_loader)
        unreadable = [path for path in unreadable if path]
        if unreadable and cfg.strict_data:
            die(f"unreadable image {unreadable[0]} at step {step} (--strict-data): fix or remove it, or drop --strict-data to skip such images.")
        skipped += len(unreadable)
        loss = train_step(model, images.to(device, non_blocking=True), captions, cfg, autocast)

        # every rank learns the mean loss (one scalar), so a non-finite one stops, or is skipped by, all of them
        if world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        loss = loss.item()
        if not math.isfinite(loss):
            if not cfg.skip_nonfinite:
                die(f"the loss became {loss} at step {step}; no update was made and {last} holds the last good "
                    "weights: lower --lr, or pass --skip-nonfinite to skip such steps.")
            optimizer.zero_grad(set_to_none=True)
            nonfinite += 1
            print0(f"warning: the loss became {loss} at step {step}; the step was skipped (--skip-nonfinite)")
            progress.update(1)
            continue
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            raw_model.logit_scale.clamp_(0, math.log(100))  # CLIP: the scale never exceeds 100
        loss_sum, timed_steps = loss_sum + loss, timed_steps + 1
        progress.update(1)
        if (step + 1) % cfg.log_every == 0:
            record = {"step": step + 1, "loss": loss_sum / cfg.log_every, "lr": lr,
                      "logit_scale": raw_model.logit_scale.exp().item(),
                      "images_per_s": cfg.batch_size * timed_steps / (time.time() - timer)}
            log(record, f"step {step + 1}/{cfg.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                        f"scale {record['logit_scale']:.1f} | {record['images_per_s']:.0f} img/s")
            timer, timed_steps, loss_sum = time.time(), 0, 0.0
    progress.close()
    skipped = sum_over_ranks(skipped, device)
    if skipped or nonfinite:
        print0(f"skipped during training: {skipped} unreadable image(s) (warnings above), {nonfinite} non-finite step(s)")
    print0(f"done: best validation loss {best_val_loss:.4f}; checkpoints in {out_dir}/best and {out_dir}/last")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
