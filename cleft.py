"""CLEFT stage 1: contrastive language-image pre-training with a frozen causal LLM adapted by PEFT
(Du, Chang, Dvornek, MICCAI 2024). The text tower is BioMedLM (GPT-2 architecture) with LoRA, the
image tower is DINOv2 ViT-B/14, and both meet in a 512-d space under a symmetric InfoNCE loss.

Demo (offline: synthetic CheXpert-layout data, tiny random models, a minute or two on a CPU):
    python cleft.py
CheXpert on one GPU, then on two (several nodes: add --nnodes, --node_rank, --rdzv-endpoint):
    python cleft.py --data chexpert --data-root /data/chexpert
    torchrun --nproc_per_node=2 cleft.py --data chexpert --data-root /data/chexpert
Your own image/report pairs (a CSV with `image` and `text` columns, paths relative to it):
    torchrun --nproc_per_node=8 cleft.py --data csv --data-root /data/pairs.csv
"""

import argparse
import csv
import gc
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

from grad_cache import gradient_cache_step
from checkpoints import saved_folder, save_checkpoint, start_metrics, trained_weights
from image_io import UNREADABLE, read_xray, report_unreadable, usable_cache

# peft 0.21 uses two arguments that transformers deprecates: hidden, as they are not ours to change
warnings.filterwarnings("ignore", "`(is_gradient_checkpointing|past_key_values)` is deprecated")

# --- Config: one dataclass; every field is a command-line flag, `help` is its documentation
def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})

@dataclass
class Config:
    # data
    data: str = arg("demo", "dataset", ["demo", "chexpert", "csv"])
    data_root: str = arg("", "CheXpert folder, the pairs CSV, or where the demo goes (data/demo)")
    image_size: int = arg(224, "square input side in pixels (paper: 224)")
    augment: str = arg("cleft", "cleft: zoom, rotate, shift; clip: none", ["cleft", "clip"])
    hflip: bool = arg(False, "random horizontal flips (off: laterality matters in chest X-rays)")
    max_length: int = arg(64, "caption tokens kept, EOS included (public code: 64)")
    num_workers: int = arg(-1, "loader processes per rank (-1: the node's cores over its ranks)")
    image_cache: str = arg("", "folder for a small decoded copy of each image (same results)")
    strict_data: bool = arg(False, "stop at the first unreadable image instead of skipping it")
    val_fraction: float = arg(0.05, "patients held out for validation (csv without a split column)")
    # model
    preset: str = arg("", "a named set of defaults (explicit flags win)", ["", "medclip-vit-l"])
    text_model: str = arg("stanford-crfm/BioMedLM", "hub id, local directory, tiny or tiny-bert")
    vision_model: str = arg("facebook/dinov2-base", "hub id, local directory, or tiny")
    peft: str = arg("lora", "adapter on the frozen LM (Table 3)", ["lora", "ia3", "prefix", "none"])
    lora_r: int = arg(8, "LoRA rank (paper: 8)")
    lora_alpha: int = arg(32, "LoRA alpha (paper: 32)")
    lora_dropout: float = arg(0.1, "LoRA dropout (paper: 0.1)")
    prefix_tokens: int = arg(20, "virtual tokens for --peft prefix (paper: 20)")
    freeze_lm: bool = arg(False, "ablation: the LM fully frozen, no adapter")
    full_ft_lm: bool = arg(False, "ablation: every LM weight trained, no adapter")
    train_embed: bool = arg(False, "also train the LM's token embeddings")
    embed_dim: int = arg(512, "shared embedding width (paper: 512)")
    grad_checkpointing: bool = arg(True, "recompute activations in backward (both towers)")
    multi_positive: bool = arg(False, "identical captions in the batch are positives too")
    # optimisation (paper section 3.3)
    batch_size: int = arg(72, "global batch, split over all ranks (paper: 72)")
    accum_steps: int = arg(1, "micro-batches per rank, exact gradients (gradient cache)")
    lr: float = arg(4e-5, "peak learning rate (paper: 4e-5)")
    weight_decay: float = arg(0.2, "AdamW weight decay on matrices (paper: 0.2)")
    warmup_steps: int = arg(4000, "linear warm-up steps (paper: 4000)")
    max_steps: int = arg(40000, "optimizer steps (paper: 40000)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0: off)")
    dtype: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", ["auto", "bf16", "fp32"])
    seed: int = arg(42, "seed for initialisation, data order, augmentation and dropout")
    # bookkeeping
    eval_every: int = arg(1000, "validate, zero-shot and save every N steps (and at the end)")
    log_every: int = arg(50, "one log line every N steps")
    out_dir: str = arg("runs/cleft", "where last/, best/ and metrics.jsonl go")
    resume: bool = arg(False, "continue OUT/last/ even if its config differs")

    def __post_init__(self):  # the two ablations replace the adapter
        if self.freeze_lm and self.full_ft_lm:
            die("--freeze-lm and --full-ft-lm contradict each other: pass one of them.")
        self.peft = "none" if self.freeze_lm or self.full_ft_lm else self.peft

# --preset NAME sets these defaults. Med-CLIP-ViT-L: ViT-L/14 and BERT-base ([CLS]), both trained
PRESETS = {"medclip-vit-l": dict(
    text_model="bert-base-uncased", vision_model="facebook/dinov2-large", peft="none",
    full_ft_lm=True, max_length=77, lr=5e-5, weight_decay=0.1, warmup_steps=2000,
    batch_size=4096, augment="clip", hflip=True)}

def parse_config(argv=None, config_class=Config, description=__doc__):
    """Fill `config_class` from the command line: flags win over a preset and the demo defaults."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=description, formatter_class=formatter)
    for f in fields(config_class):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(flag, type=f.type, choices=f.metadata["choices"],
                                help=f"{help} (default: {f.default})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    defaults = PRESETS.get(given.get("preset"), {})
    if given.get("data", config_class.data) == "demo":
        import demo  # smaller data and tiny models, so the demo runs in minutes on a CPU
        defaults = {**defaults, **demo.DEFAULTS[config_class.__name__],
                    **demo.PRESET_DEFAULTS.get(given.get("preset"), {})}
    return config_class(**{**defaults, **given})

def changed_fields(cfg):  # the fields that differ from the dataclass's defaults
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != f.default}

def die(message, this_rank_only=False):
    """A mistake the user can fix: one clear sentence, no traceback, exit code 1 on every rank.
    Under torchrun rank 0 alone prints it, unless this rank alone met the problem."""
    if dist.is_initialized():  # released first: gloo can abort at exit while it is alive
        dist.destroy_process_group()
    raise SystemExit(f"error: {message}" if this_rank_only or os.environ.get("RANK", "0") == "0"
                     else 1)

# --- Distributed setup: torchrun sets RANK; plain `python cleft.py` is a world of one
def setup_distributed():  # (rank, world_size, device): nccl on CUDA, gloo on CPU
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device

def autocast_for(dtype, device):
    """(name, context): 'auto' is bf16 autocast on CUDA, fp32 on CPU; weights stay fp32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 parts
    dtype = dtype if dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return dtype, torch.autocast(device.type, torch.bfloat16) if dtype == "bf16" else nullcontext()

def world():  # (rank, world_size) of this process
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def print0(*args, file=None):  # rank 0 prints, above the progress bar, at once (logs are piped)
    if world()[0] == 0:
        tqdm.write(" ".join(map(str, args)), file=file)
        (file or sys.stdout).flush()

def log(path, record, line):  # rank 0: one JSON line appended to `path`, one line on screen
    if world()[0] == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print0(line)

def to_device(tensor, device):  # a host tensor, copied with no wait: the host runs ahead of the GPU
    return (tensor.pin_memory() if device.type == "cuda" else tensor).to(device, non_blocking=True)

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
        return grad.chunk(world()[1])[world()[0]]  # the rows this rank contributed

def all_gather_rows(x):  # x from every rank in rank order (all ranks call this)
    return GatherWithGrad.apply(x) if world()[1] > 1 else x

# --- Data: CheXpert captions and the 5x200 rule, CSV pairs, patient split, images, samplers
# label columns of CheXpert's train.csv, in the header's order
FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
            "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
            "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + FINDINGS
# CheXpert-5x200 (GLoRIA): the zero-shot classes, and the findings that must be absent besides
FIVE_CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
MUST_BE_ABSENT = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia",
                  "Pneumothorax", "Pleural Other", "Fracture", "Support Devices"]
CAPTION_PREFIX = "this is a chest x ray of a patient with "

def caption_from_labels(row):
    """Positive findings (1.0 only: uncertain -1 and blank are absent) in header order: 'no finding'
    only when that column is 1; a row of uncertain or blank labels gets the bare prefix."""
    positives = [name.lower() for name in FINDINGS if row[name] in ("1", "1.0")]
    return CAPTION_PREFIX + ", ".join(positives)

def class_prompts(names):  # the hand-written zero-shot prompt of each class
    return [CAPTION_PREFIX + name.lower() for name in names]

def five_class_index(row):
    """Index into FIVE_CLASSES if the row is 1 for exactly one of them and 0 (or blank) for the
    other four and MUST_BE_ABSENT, else None (GLoRIA's 5x200 rule; any -1 excludes the row)."""
    values = [float(row[name] or 0) for name in FIVE_CLASSES + MUST_BE_ABSENT]
    if any(v == -1 for v in values) or any(values[len(FIVE_CLASSES):]):
        return None
    positives = [i for i, v in enumerate(values[:len(FIVE_CLASSES)]) if v == 1]
    return positives[0] if len(positives) == 1 else None

def patient_id(path):
    match = re.search(r"patient\d+", path)
    return match.group(0) if match else path

def read_csv(path, columns):
    """Rows of a CSV as dicts, after checking that the columns we need are there."""
    if not os.path.isfile(path):
        die(f"{path} does not exist: check --data-root.")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if missing := [c for c in columns if c not in (reader.fieldnames or [])]:
            die(f"{path} lacks the column(s) {missing}: point --data-root at a file with the "
                "expected header (see README).")
        return list(reader)

def split_by_patient(rows, fraction, key=lambda row: patient_id(row["Path"])):
    """(train, val): `fraction` of the patients, drawn with seed 0, go to val."""
    patients = sorted({key(row) for row in rows})
    random.Random(0).shuffle(patients)  # not --seed: runs with other seeds validate alike
    val = set(patients[:max(1, round(fraction * len(patients)))])
    return [r for r in rows if key(r) not in val], [r for r in rows if key(r) in val]

def chexpert_rows(root, val_fraction=0.05):
    """Frontal rows of a CheXpert folder, {'train', 'val', 'test' (chexpert_5x200.csv)}."""
    if not str(root):
        die("--data chexpert needs --data-root: the CheXpert folder that holds train.csv.")
    root, test = Path(root), []
    rows = [r for r in read_csv(root / "train.csv", CHEXPERT_COLUMNS)
            if r["Frontal/Lateral"] == "Frontal"]
    if (root / "chexpert_5x200.csv").exists():
        test = [r for r in read_csv(root / "chexpert_5x200.csv", CHEXPERT_COLUMNS)
                if five_class_index(r) is not None]
    test_patients = {patient_id(r["Path"]) for r in test}  # by patient, not only by image
    rows = [r for r in rows if patient_id(r["Path"]) not in test_patients]
    train, val = split_by_patient(rows, val_fraction)
    for row in train + val + test:  # without the first component, 'CheXpert-v1.0-small/'
        row["image"] = str(root.joinpath(*Path(row["Path"]).parts[1:]))
    return {"train": train, "val": val, "test": test}

def load_splits(cfg):
    """{'train': [(path, caption)], 'val': [(path, caption)], 'test': [(path, class index)]}."""
    if cfg.data == "demo":  # written once, in CheXpert's layout
        import demo
        demo.prepare(cfg.data_root)
    if cfg.data == "csv":
        if not cfg.data_root:
            die("--data csv needs --data-root: the CSV file with image and text columns.")
        rows, folder = read_csv(cfg.data_root, ["image", "text"]), Path(cfg.data_root).parent
        if "split" not in rows[0]:  # a split column (train/val; other rows unused) is kept as is
            for row in split_by_patient(rows, cfg.val_fraction, key=lambda r: r["image"])[1]:
                row["split"] = "val"
        pairs = lambda name: [(str(folder / r["image"]), r["text"]) for r in rows
                              if r.get("split", "train") == name]
        return {"train": pairs("train"), "val": pairs("val"), "test": []}
    splits = chexpert_rows(cfg.data_root, cfg.val_fraction)
    return {"train": [(r["image"], caption_from_labels(r)) for r in splits["train"]],
            "val": [(r["image"], caption_from_labels(r)) for r in splits["val"]],
            "test": [(r["image"], five_class_index(r)) for r in splits["test"]]}

def load_image(path, size, rng=None, hflip=False, affine=True, cache=""):
    """A (1, size, size) tensor in [0, 1]: the X-ray padded with black to a square (the whole chest
    in view), scaled. rng=None: the evaluation view; else jitter and (affine) zoom/rotate/shift."""
    image = read_xray(path, size, cache)  # grayscale, decoded at reduced size (image_io.py)
    square = Image.new("L", (max(image.size),) * 2)  # black
    square.paste(image, ((square.width - image.width) // 2, (square.height - image.height) // 2))
    affine = affine and rng is not None
    side = round(size * (rng.uniform(1.0, 1.15) if affine else 1.0))  # the zoomed square
    image = square.resize((side, side), Image.Resampling.BILINEAR)
    if affine:
        image = image.rotate(rng.uniform(-10, 10), Image.Resampling.BILINEAR)
        left, top = rng.integers(0, side - size + 1, size=2)
    else:
        left = top = (side - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
    if rng:
        mean = pixels.mean()
        pixels = (pixels - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.8, 1.2)
        pixels = np.clip(pixels[:, ::-1] if hflip and rng.random() < 0.5 else pixels, 0, 1)
    # one channel: a third of the bytes through the loader; the image tower makes it three
    return torch.from_numpy(np.ascontiguousarray(pixels))[None]  # (1, S, S)

class XrayDataset(Dataset):
    """(path, target) records; item (index, augmentation seed or None) -> (image, target, 'path
    (error)' lines of the unreadable images it stands in for: the caller reports them, once)."""

    def __init__(self, records, image_size, hflip=False, affine=True, cache=""):
        self.records, self.image_size, self.hflip, self.affine = records, image_size, hflip, affine
        self.cache = usable_cache(cache)  # '' if that folder cannot be written

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        index, aug_seed = item
        rng, unreadable = np.random.default_rng(aug_seed) if aug_seed else None, []
        for offset in range(len(self)):  # unreadable: the next stands in, batches stay full
            path, target = self.records[(index + offset) % len(self)]
            try:
                image = load_image(path, self.image_size, rng, self.hflip, self.affine, self.cache)
                return image, target, "\n".join(unreadable)
            except (OSError, ValueError) as error:  # missing, truncated or corrupt
                unreadable.append(f"{path} ({error})")
        raise RuntimeError(f"none of the {len(self)} images can be read: check --data-root.")

class TrainBatches(Sampler):
    """Endless batches of (index, augmentation seed) for one rank: global batch `step` is a slice
    of a seeded permutation, the same for any number of ranks and at any resumed step."""

    def __init__(self, n, batch_size, seed, start_step=0):
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.steps_per_epoch = n // batch_size

    def __iter__(self):
        rank, per_rank = world()[0], self.batch_size // world()[1]
        for step in range(self.start_step, sys.maxsize):
            epoch = step // self.steps_per_epoch
            if step == self.start_step or step % self.steps_per_epoch == 0:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.n, generator=generator).tolist()
            start = (step % self.steps_per_epoch) * self.batch_size + rank * per_rank
            yield [(i, (self.seed, epoch, i)) for i in order[start:start + per_rank]]

def eval_batches(n, batch_size):
    """This rank's share of fixed-order global batches over n items, the last one padded with
    repeats of item n - 1 that callers trim (every rank gathers batches of the same size)."""
    rank, per_rank = world()[0], batch_size // world()[1]
    indices = list(range(n)) + [n - 1] * (-n % batch_size)
    return [[(i, None) for i in indices[start + rank * per_rank:start + (rank + 1) * per_rank]]
            for start in range(0, len(indices), batch_size)]

def make_loader(dataset, batches, num_workers, device, persistent=False):
    if num_workers < 0:  # the node's cores shared among its ranks, one left for each rank
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        num_workers = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator(),
                      persistent_workers=persistent and num_workers > 0)

def make_loaders(splits, cfg, device, world_size, start_step=0):
    """Stage 1's (endless train iterator, val loader, test loader), after checking the batch."""
    if cfg.batch_size % world_size or (cfg.batch_size // world_size) % cfg.accum_steps:
        die(f"--batch-size {cfg.batch_size} is the global batch and must divide by the "
            f"{world_size} processes, and each one's share must divide by --accum-steps "
            f"{cfg.accum_steps}: change one.")
    if len(splits["train"]) < cfg.batch_size or not splits["val"]:  # any val size >= 1 is scored
        die(f"{len(splits['train'])} train and {len(splits['val'])} val images after filtering; "
            f"training needs {cfg.batch_size} (one global batch), validation 1: lower --batch-size "
            "or check --data-root.")
    loader = lambda name, batches, **kw: make_loader(
        XrayDataset(splits[name], cfg.image_size, cache=cfg.image_cache, **kw), batches,
        cfg.num_workers, device, persistent=name == "train")
    batches = TrainBatches(len(splits["train"]), cfg.batch_size, cfg.seed, start_step)
    return (iter(loader("train", batches, hflip=cfg.hflip, affine=cfg.augment == "cleft")),
            loader("val", eval_batches(len(splits["val"]), cfg.batch_size)),
            loader("test", eval_batches(len(splits["test"]), cfg.batch_size)))

# --- Model: image tower (DINOv2), text tower (frozen causal LM + PEFT), CLEFT = both + projections
def load_pretrained(name, kind, weights=True):
    """(model, tokenizer or None) from a hub id or a save_pretrained directory."""
    if name.startswith("tiny"):
        import demo
        return demo.tiny_pretrained(name, kind)
    try:
        if not weights:
            import dry_run  # the stored architectures
            return AutoModel.from_config(dry_run.architecture(name)), None
        model = AutoModel.from_pretrained(name, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(name) if kind == "text" else None
    except (OSError, ValueError) as error:
        die(f"cannot load the {kind} model '{name}' ({str(error).splitlines()[0]}): download it "
            "once with network access (or unset HF_HUB_OFFLINE), pass a local save_pretrained "
            f"directory, or use --{kind}-model tiny.")

def enable_checkpointing(model):
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

class ImageTower(nn.Module):
    """DINOv2; the image feature is the mean of the last block's tokens, final norm removed."""

    def __init__(self, name, checkpointing=True, weights=True):
        super().__init__()
        self.model, _ = load_pretrained(name, "vision", weights)
        self.model.layernorm = nn.Identity()
        # used only by masked-image pre-training; DDP fails on a trained tensor with no gradient
        self.model.embeddings.mask_token.requires_grad_(False)
        self.width = self.model.config.hidden_size
        if checkpointing:
            enable_checkpointing(self.model)
        statistics = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # ImageNet's
        for name, values in statistics.items():  # buffers: moved once with the model
            self.register_buffer(name, torch.tensor(values).view(3, 1, 1), persistent=False)

    def forward(self, images):  # (B, 1 or 3, S, S) pixels in [0, 1] -> (B, width)
        pixels = (images.expand(-1, 3, -1, -1) - self.mean) / self.std  # gray to 3 channels
        return self.model(pixel_values=pixels).last_hidden_state.mean(dim=1)

def adapter_config(kind, lora_r=8, lora_alpha=32, lora_dropout=0.1, prefix_tokens=20):
    """The peft config of `kind` for GPT-2 (paper section 3.3), or None for 'none'."""
    if kind == "lora":  # GPT-2's fused q/k/v projection is a Conv1D: fan_in_fan_out
        return LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=["c_attn"], fan_in_fan_out=True)
    if kind == "ia3":
        return IA3Config(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                         feedforward_modules=["mlp.c_proj"])
    if kind == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=prefix_tokens, task_type="FEATURE_EXTRACTION")

class TextTower(nn.Module):
    """A causal LM read at the end-of-sequence token: with causal attention, the one position that
    has seen the whole caption (paper 2.1). The LM is frozen unless train_lm; the adapter (a peft
    config) is what is trained. An encoder such as BERT is read at [CLS] instead."""

    def __init__(self, name, adapter=None, max_length=64, train_lm=False, train_embeddings=False,
                 checkpointing=True, weights=True):
        super().__init__()
        model, tokenizer = load_pretrained(name, "text", weights)  # no weights, no tokenizer
        self.tokenizer, self.max_length = tokenizer, max_length
        self.width = model.config.hidden_size
        self.read_cls = tokenizer is not None and tokenizer.cls_token is not None
        self.eos_id = tokenizer.eos_token_id if tokenizer else None
        self.pad_id = tokenizer.pad_token_id if tokenizer and tokenizer.pad_token else self.eos_id
        if getattr(model, "pooler", None) is not None:  # BERT's pooler: unused by [CLS] pooling,
            model.pooler = None  # and DDP fails on a trained tensor that never gets a gradient
        model.requires_grad_(train_lm)
        if checkpointing and getattr(adapter, "peft_type", "") != "PREFIX_TUNING":  # peft: not both
            enable_checkpointing(model)
        if adapter is not None:
            model = get_peft_model(model, adapter)
        if train_embeddings:
            model.get_input_embeddings().requires_grad_(True)
        self.model = model

    def tokenize(self, captions):
        """(input_ids (B, T), attention_mask (B, T), pooled positions (B,)), right-padded to the
        longest caption only. Causal LM: an EOS appended, kept under truncation, pooled there.
        Encoder: the tokenizer's own [CLS] ... [SEP], pooled at [CLS] (position 0)."""
        if self.read_cls:
            ids = self.tokenizer(captions, truncation=True, max_length=self.max_length)["input_ids"]
        else:
            ids = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
            ids = [x[:self.max_length - 1] + [self.eos_id] for x in ids]
        longest = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [self.pad_id] * (longest - len(x)) for x in ids])
        attention_mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])
        positions = torch.tensor([0 if self.read_cls else len(x) - 1 for x in ids])
        return input_ids, attention_mask, positions

    def forward(self, captions):  # list of B strings -> (B, width)
        unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}  # labels repeat: once each
        tensors = *self.tokenize(list(unique)), torch.tensor([unique[c] for c in captions])
        input_ids, mask, eos, index = (to_device(t, self.model.device) for t in tensors)
        pooled = self.pool_at_eos(eos, input_ids=input_ids, attention_mask=mask)  # (U, width)
        return pooled[index]  # (B, width)

    def pool_at_eos(self, eos_positions, **inputs):
        """The LM on input_ids or inputs_embeds (B, T, ...), read at the EOS: (B, width)."""
        hidden = self.model(**inputs).last_hidden_state  # (B, T, width)
        return hidden[torch.arange(len(hidden), device=hidden.device), eos_positions]

class CLEFT(nn.Module):
    """Both towers, their projections to the shared space, and the learnable temperature."""

    def __init__(self, cfg, weights=True):  # the one constructor that reads the config
        super().__init__()
        self.image_tower = ImageTower(cfg.vision_model, cfg.grad_checkpointing, weights)
        adapter = adapter_config(cfg.peft, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                 cfg.prefix_tokens)
        self.text_tower = TextTower(cfg.text_model, adapter, cfg.max_length, cfg.full_ft_lm,
                                    cfg.train_embed, cfg.grad_checkpointing, weights)
        self.image_projection = nn.Linear(self.image_tower.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text_tower.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature 0.07

    def encode_image(self, images):  # (B, 1 or 3, S, S) in [0, 1] -> (B, D), unit length, fp32
        return F.normalize(self.image_projection(self.image_tower(images)).float(), dim=-1)

    def encode_text(self, captions):  # B strings -> (B, D), unit length, fp32
        return F.normalize(self.text_projection(self.text_tower(captions)).float(), dim=-1)

    def forward(self, images, captions):  # the scale too: DDP sees every trained tensor used
        return self.encode_image(images), self.encode_text(captions), self.logit_scale

def frozen_to_bf16(model):
    """Frozen matmul weights (GPT-2's Conv1D) in bf16, as bf16 autocast uses them: half the size."""
    for module in model.modules():
        for p in module.parameters(recurse=False) if type(module).__name__ == "Conv1D" else []:
            p.data = p.data if p.requires_grad else p.data.bfloat16()
    return model

# --- Loss: symmetric InfoNCE over the global batch (paper Eq. 1)
def contrastive_loss(image_features, text_features, logit_scale, ids=None, gather=True):
    """Paper Eq. 1 for this rank's rows against the whole global batch, in fp32.

    image_features, text_features: (b, D) unit vectors of this rank's pairs (the same b on every
    rank). ids: (b,) caption ids; when given, pairs with identical captions are positives too
    (soft targets). Each rank averages over its rows and DDP averages over ranks: that is the
    full-batch mean, and with GatherWithGrad the gradients equal one process on the global batch
    (gather=False: the rows are the whole batch, whatever the ranks; used by validation)."""
    rank, gathered = (world()[0], all_gather_rows) if gather else (0, lambda rows: rows)
    all_images = gathered(image_features)  # (N, D): the global batch
    all_texts = gathered(text_features)  # (N, D)
    scale = logit_scale.float().exp()
    logits_per_image = scale * image_features.float() @ all_texts.float().T  # (b, N)
    logits_per_text = scale * text_features.float() @ all_images.float().T  # (b, N)
    if ids is None:
        targets = torch.arange(len(image_features), device=image_features.device)
        targets = targets + rank * len(image_features)
    else:
        same = (ids[:, None] == gathered(ids)[None, :]).float()  # (b, N)
        targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits_per_image, targets)
            + F.cross_entropy(logits_per_text, targets)) / 2

def caption_ids(captions):  # a 63-bit id per caption, the same on every rank, on the host
    digest = lambda c: hashlib.blake2b(c.encode(), digest_size=8).digest()
    return torch.tensor([int.from_bytes(digest(c), "little") >> 1 for c in captions])

# --- Train step
def train_step(model, images, captions, autocast, accum_steps=1, multi_positive=False):
    """Forward and backward of this rank's share of one global batch; the loss (detached)."""
    ids = to_device(caption_ids(captions), images.device) if multi_positive else None
    loss_fn = lambda image_features, text_features, scale: contrastive_loss(
        image_features, text_features, scale, ids)
    if accum_steps > 1:  # the same gradient in micro-batches (grad_cache.py)
        return gradient_cache_step(model, images, captions, autocast, accum_steps, loss_fn)
    with autocast:
        image_features, text_features, logit_scale = model(images, captions)
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    return loss.detach()

# --- Optimizer and schedule
def get_lr(step, max_lr, warmup_steps, max_steps):
    # 1) linear warm-up from 0 to max_lr over warmup_steps
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    # 2) then cosine decay to 0 at max_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

def make_optimizer(model, lr, weight_decay, fused=False):
    """AdamW; weight decay on matrices only: not on biases, norms, IA3 vectors or the scale."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrix = lambda n, p: p.ndim >= 2 and "ia3_l" not in n  # peft keeps IA3 vectors as (d, 1)
    groups = [{"params": [p for n, p in trainable if matrix(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if not matrix(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused)

# --- Checkpoints: OUT/{last,best}/ = config.json, model.safetensors (trained weights only),
# adapter/ (peft's format), state.pt (step, best validation loss, optimizer): checkpoints.py
def checkpoint_dir(directory):  # or DIR.old, if a crash hit between a save's two renames
    return saved_folder(directory) or die(f"no checkpoint in {directory}: pass the last/ or best/ "
                                          "folder of a finished cleft.py run.")

def load_config(directory):
    saved = json.loads((checkpoint_dir(directory) / "config.json").read_text())
    return Config(**{f.name: saved[f.name] for f in fields(Config) if f.name in saved})

def load_model(directory, cfg=None):
    """CLEFT with the weights trained in checkpoint `directory` (the rest: the base models)."""
    directory = checkpoint_dir(directory)
    model, saved = CLEFT(cfg or load_config(directory)), load_file(directory / "model.safetensors")
    if saved.keys() != trained_weights(model).keys():
        die(f"{directory} does not match its config.json: was it written by another cleft.py?")
    model.load_state_dict(saved, strict=False)
    return model

def resume_state(cfg):
    """state.pt of OUT/last/, to the CPU, if resuming (--resume, or this config's run is there)."""
    last = Path(cfg.out_dir) / "last"
    found = saved_folder(last) is not None
    everyone = [found] * world()[1]
    if world()[1] > 1:  # every rank decides alike, or none goes on
        dist.all_gather_object(everyone, found)
    if len(set(everyone)) > 1:
        die(f"some processes see a checkpoint in {last} and others do not: put --out-dir on a "
            "file system that every node shares.")
    if not (cfg.resume or found):
        return None
    saved, bookkeeping = load_config(last), ("resume", "num_workers", "image_cache", "log_every",
                                             "eval_every", "strict_data")
    changed = [f.name for f in fields(Config)
               if f.name not in bookkeeping and getattr(saved, f.name) != getattr(cfg, f.name)]
    if changed and not cfg.resume:
        die(f"{cfg.out_dir} holds a run with a different config ({', '.join(changed[:5])}): pass "
            "--resume to continue it with these flags, or choose another --out-dir.")
    try:
        return torch.load(checkpoint_dir(last) / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        die(f"{last}/state.pt holds more than tensors and numbers, so it was refused unread "
            f"({str(error).splitlines()[0][:80]}): resume only from checkpoints of cleft.py.")

# --- Evaluation: validation loss and zero-shot accuracy (all ranks take part: they gather)
@torch.no_grad()
def validate(model, val_loader, test_loader, autocast, batch_size):
    """{'val_loss': the contrastive loss per held-out pair, scored in batches of batch_size (the
    last one smaller; fixed, so values compare across the run), and with a test split
    'zero_shot_acc': % of argmax over classes of cos(image, hand-written prompt)}."""
    model.eval()
    images, texts = embed(model, val_loader, n := len(val_loader.dataset), autocast)  # (n, D) each
    losses = [contrastive_loss(i, t, model.logit_scale, gather=False) * len(i)
              for i, t in zip(images.split(batch_size), texts.split(batch_size))]
    record = {"val_loss": (sum(losses) / n).item()}
    if n := len(test_loader.dataset):  # the five classes of CheXpert-5x200
        with autocast:
            class_features = model.encode_text(class_prompts(FIVE_CLASSES))  # (C, D)
        image_features, labels = embed(model, test_loader, n, autocast)  # (n, D), (n,)
        correct = (image_features @ class_features.T).argmax(dim=1) == labels
        record["zero_shot_acc"] = 100 * correct.float().mean().item()
    model.train()
    return record

@torch.no_grad()
def embed(model, loader, n, autocast, progress=False, encode=None):
    """(image features (n, D), targets: labels (n,) or caption features (n, D)) of an eval_batches
    loader, on every rank: each embeds its share, then they are gathered (all ranks call it).
    encode: images -> features (default model.encode_image)."""
    device, encode = model.logit_scale.device, encode or model.encode_image
    features, targets, unreadable = [], [], []
    for images, target, skipped in tqdm(loader, "images", disable=world()[0] or not progress):
        with autocast:
            features.append(all_gather_rows(encode(images.to(device)).float()))  # (B, D)
            if not torch.is_tensor(target):  # captions
                target = model.encode_text(list(target))  # (B, D)
        targets.append(all_gather_rows(target.to(device)))
        unreadable += skipped
    report_unreadable(unreadable)
    return torch.cat(features)[:n], torch.cat(targets)[:n]

# --- Main
def check_finite(loss, name, step, out_dir, progress):  # every rank calls it with the same loss
    if not math.isfinite(loss):  # stop before anything is saved: OUT/last/ stays good
        progress.close()
        die(f"the {name} became {loss} by step {step}: {out_dir}/last holds the last good "
            "weights; lower --lr or raise --warmup-steps.")

def main(argv=None):
    cfg = parse_config(argv)
    rank, world_size, device = setup_distributed()
    dtype, autocast = autocast_for(cfg.dtype, device)
    print0(f"config, where it differs from the defaults (all of it: OUT/last/config.json): "
           f"{json.dumps(changed_fields(cfg))}\nworld size {world_size} on {device}, {dtype}")
    splits = load_splits(cfg)
    print0("data: " + ", ".join(f"{len(records)} {name}" for name, records in splits.items()))
    out_dir, state = Path(cfg.out_dir), resume_state(cfg)
    start_step, best_val_loss = (state["step"], state["best_val_loss"]) if state else (0, math.inf)
    train_loader, val_loader, test_loader = make_loaders(splits, cfg, device, world_size,
                                                         start_step)
    torch.manual_seed(cfg.seed)  # the model, from OUT/last/ on resume: the same on every rank
    model = (load_model(out_dir / "last", cfg) if state else CLEFT(cfg)).to(device)
    model = frozen_to_bf16(model) if dtype == "bf16" else model
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, fused=device.type == "cuda")
    if state:  # the optimizer's tensors are copied to its parameters' device, the CPU copy freed
        optimizer.load_state_dict(state.pop("optimizer"))
        print0(f"resumed from {out_dir / 'last'} at step {start_step}")
    print0(f"trained parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    device_ids = None if device.type == "cpu" else [device.index]  # DDP trains, the model is saved
    ddp_model = DistributedDataParallel(model, device_ids) if world_size > 1 else model
    metrics = start_metrics(out_dir / "metrics.jsonl", state and start_step) if rank == 0 else None
    progress = tqdm(total=cfg.max_steps, initial=start_step, disable=rank != 0, desc="train")

    UNREADABLE.clear()
    unreadable, timer, timed_steps, loss_sum = [], time.time(), 0, 0.0
    for step in range(start_step, cfg.max_steps + 1):
        # evaluate and save every eval_every steps and at the end (a resumed run: not at its start)
        due = step % cfg.eval_every == 0 or step == cfg.max_steps
        if due and not (state and step == start_step):
            report_unreadable(unreadable)  # the training images' since the last report
            record = {"step": step, **validate(model, val_loader, test_loader, autocast,
                                               cfg.batch_size)}
            check_finite(record["val_loss"], "validation loss", step, out_dir, progress)
            log(metrics, record, " | ".join(f"{k} {round(v, 4)}" for k, v in record.items()))
            improved = record["val_loss"] < best_val_loss
            best_val_loss = min(best_val_loss, record["val_loss"])
            if rank == 0:  # best/ when the validation loss improved, last/ every time
                for name in (["best"] if improved else []) + ["last"]:
                    save_checkpoint(out_dir / name, model, optimizer, cfg, step, best_val_loss)
            # a log line averages the steps since the last line or evaluation: resumes log the same
            timer, timed_steps, loss_sum = time.time(), 0, 0.0
        if step == cfg.max_steps:
            break

        # one optimisation step on the global batch
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions, skipped = next(train_loader)
        if cfg.strict_data and any(skipped):  # this rank's batch alone: it stops the run
            first = next(text for text in skipped if text).splitlines()[0]
            progress.close()
            die(f"unreadable image {first} at step {step} (--strict-data): "
                "fix or remove it, or drop --strict-data to skip such images.", this_rank_only=True)
        unreadable += skipped
        # dropout masks depend on (seed, step, rank) alone: a resumed run draws the same ones
        torch.manual_seed(cfg.seed * 2**40 + step * 2**20 + rank)
        loss = train_step(ddp_model, images.to(device, non_blocking=True), captions, autocast,
                          cfg.accum_steps, cfg.multi_positive)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP: the scale never exceeds 100
        loss_sum, timed_steps = loss_sum + loss, timed_steps + 1  # on the device: no host wait
        progress.update(1)
        if (step + 1) % cfg.log_every == 0:  # the host reads the loss here only
            report_unreadable(unreadable)
            if world_size > 1:  # the mean over ranks: a non-finite loss stops every rank
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            check_finite(loss := loss_sum.item() / timed_steps, "loss", step, out_dir, progress)
            record = {"step": step + 1, "loss": loss, "lr": lr,
                      "logit_scale": model.logit_scale.exp().item(),
                      "images_per_s": cfg.batch_size * timed_steps / (time.time() - timer)}
            log(metrics, record, "step {step}/{n} | loss {loss:.4f} | lr {lr:.2e} | scale "
                "{logit_scale:.1f} | {images_per_s:.0f} img/s".format(n=cfg.max_steps, **record))
            timer, timed_steps, loss_sum = time.time(), 0, 0.0
    progress.close()
    if UNREADABLE:
        print0(f"skipped in this run: {len(UNREADABLE)} unreadable image(s), each named above")
    print0(f"done: best validation loss {best_val_loss:.4f}; checkpoints in {out_dir}")
    if world_size > 1:  # DDP holds the process group: free it first, or gloo can abort at exit
        del ddp_model
        gc.collect()
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
