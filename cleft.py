"""CLEFT stage 1: contrastive language-image pre-training with a frozen causal LLM adapted by PEFT
(Du, Chang, Dvornek, MICCAI 2024). The text tower is BioMedLM (GPT-2 architecture) with LoRA, the
image tower is DINOv2 ViT-B/14, and both meet in a 512-d space under a symmetric InfoNCE loss.

The offline demo (synthetic CheXpert-layout data, tiny random models, minutes on a CPU) is demo.py.
CheXpert on one GPU, then on two (several nodes: add --nnodes, --node_rank, --rdzv-endpoint):
    python cleft.py --data chexpert --data-root /data/chexpert
    torchrun --nproc_per_node=2 cleft.py --data chexpert --data-root /data/chexpert
Your own image/report pairs (a CSV with `image` and `text` columns, paths relative to it):
    torchrun --nproc_per_node=8 cleft.py --data csv --data-root /data/pairs.csv
Radiology reports (MIMIC-CXR-JPG, CheXpert Plus, Open-I, read by report_data.py), e.g.:
    python cleft.py --data mimic-cxr --data-root /data/mimic-cxr-jpg --max-length 256
"""

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from grad_cache import gradient_cache_step
from checkpoints import (StopSignals, append_metrics, checkpoint_dir, exit_code,
                         join_process_group, on_every_rank, read_json, read_saved, save_on_rank_0,
                         saved_folder, start_metrics, trained_weights)
from checks import (check_finite, check_resume, check_schedule, check_sources, die,
                    nothing_left_to_train, read_csv, stop_if_unreadable)
from held_out import patient_of, patient_record
from progress import progress_bar
from image_io import SQUARES, UNREADABLE, XrayDataset, make_loader, report_unreadable
from report_data import CAPTIONS, caption_lengths, chexpert_plus, mimic_cxr, openi

# peft 0.21 uses two arguments that transformers deprecates: hidden, as they are not ours to change
warnings.filterwarnings("ignore", "`(is_gradient_checkpointing|past_key_values)` is deprecated")
# transformers' bars for every model load and save, off; ours and the hub's download bars stay
hf_logging.set_tqdm_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))

# --- Config: one dataclass; every field is a command-line flag, `help` is its documentation
def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})

@dataclass
class Config:
    # data
    data: str = arg("chexpert", "chexpert, csv, mimic-cxr, chexpert-plus, openi; or several: a,b")
    data_root: str = arg("", "the data set's folder (csv: the CSV); several: one per source, a,b")
    reports_root: str = arg("", "mimic-cxr: the folder with the reports' files/, if not the root")
    caption: str = arg("findings-impression", "what of a report a step trains on", CAPTIONS)
    image_size: int = arg(224, "square input side in pixels (paper: 224)")
    square: str = arg("pad", "pad (black borders) or crop (the centre) to a square", SQUARES)
    augment: str = arg("cleft", "cleft: zoom, rotate, shift; clip: none", ["cleft", "clip"])
    hflip: bool = arg(False, "random horizontal flips (off: laterality matters in chest X-rays)")
    max_length: int = arg(64, "caption tokens kept, EOS included (public code: 64)")
    num_workers: int = arg(-1, "loader processes per rank (-1: the node's cores over its ranks)")
    image_cache: str = arg("", "folder for a small decoded copy of each image (same results)")
    strict_data: bool = arg(False, "stop at the first unreadable image instead of skipping it")
    val_fraction: float = arg(0.05, "share of patients (csv: images) held out, 2 at least")
    val_size: int = arg(0, "validate on a fixed sample of N held-out pairs (0: all of them)")
    # model
    preset: str = arg("", "a named set of defaults (explicit flags win)", ["", "medclip-vit-l"])
    text_model: str = arg("stanford-crfm/BioMedLM", "hub id or local save_pretrained folder")
    vision_model: str = arg("facebook/dinov2-base", "hub id or local save_pretrained folder")
    peft: str = arg("lora", "adapter on the frozen LM (Table 3)", ["lora", "ia3", "prefix", "none"])
    lora_r: int = arg(8, "LoRA rank (paper: 8)")
    lora_alpha: int = arg(32, "LoRA alpha (paper: 32)")
    lora_dropout: float = arg(0.1, "LoRA dropout (paper: 0.1)")
    prefix_tokens: int = arg(20, "virtual tokens for --peft prefix (paper: 20)")
    freeze_lm: bool = arg(False, "ablation: the LM fully frozen, no adapter")
    full_ft_lm: bool = arg(False, "ablation: every LM weight trained, no adapter")
    train_embed: bool = arg(False, "also train the LM's token embeddings")
    embed_dim: int = arg(512, "shared embedding width (paper: 512)")
    grad_checkpointing: bool = arg(True, "recompute activations in backward (prefix: ViT only)")
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
    resume: bool = arg(False, "continue OUT/last/ with other flags (the model's must match)")

    def __post_init__(self):  # the two ablations replace the adapter
        if self.freeze_lm and self.full_ft_lm:
            die("--freeze-lm and --full-ft-lm contradict each other: pass one of them.")
        self.peft = "none" if self.freeze_lm or self.full_ft_lm else self.peft

# --preset NAME sets these defaults. Med-CLIP-ViT-L: ViT-L/14 and a domain BERT-base ([CLS]), both
# trained on MIMIC-CXR and Open-I reports, centre crops, 50,000 validation pairs
PRESETS = {"medclip-vit-l": dict(
    text_model="microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext",
    vision_model="facebook/dinov2-large", peft="none", full_ft_lm=True, max_length=77, lr=5e-5,
    weight_decay=0.1, warmup_steps=2000, batch_size=4096, augment="clip", hflip=True,
    data="mimic-cxr,openi", square="crop", val_size=50_000)}

def parse_config(argv=None, config_class=Config, description=__doc__):
    """Fill `config_class` from the command line: flags win over a preset's defaults."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=description, formatter_class=formatter)
    for f in fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"]
        if f.type is list:  # the files a script works on, given last (predict.py)
            parser.add_argument(f.name, nargs="*", help=help)
        elif f.type is bool:  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(flag, type=f.type, choices=f.metadata["choices"],
                                help=f"{help} (default: {f.default})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = PRESETS.get(given.get("preset"), {})
    return config_class(**{**preset, **given})

def changed_fields(cfg):  # the fields that differ from the dataclass's defaults
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != f.default}

# --- Distributed setup: torchrun sets RANK; plain `python cleft.py` is a world of one
def setup_distributed():  # (rank, world_size, device): nccl on CUDA, gloo on CPU
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # CUDA tensors go through nccl, the host's small agreements (stop, save, resume) through gloo;
    # the others wait in a collective while rank 0 saves (GBs with --full-ft-lm): 1 hour, not 10 min
    join_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size(), device

def autocast_for(dtype, device):
    """(name, context): 'auto' is bf16 autocast on CUDA, fp32 on CPU; weights stay fp32."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # fp32 is fp32: no TF32 in matmuls
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # nor in convolutions (default: TF32)
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
        append_metrics(path, record)
        print0(line)

def to_device(tensor, device):  # a host tensor, copied with no wait: the host runs ahead of the GPU
    return (tensor.pin_memory() if device.type == "cuda" else tensor).to(device, non_blocking=True)

class GatherWithGrad(torch.autograd.Function):
    """all_gather of rows; its backward sums every rank's gradient and keeps this rank's rows'."""

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

# --- Data: CheXpert captions and the 5x200 rule, CSV pairs, patient split, the sources, samplers
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

def split_by_patient(rows, fraction, key=lambda row: patient_of(row["Path"])):
    """(train, val): `fraction` of the patients, drawn with seed 0, go to val."""
    patients = sorted({key(row) for row in rows})
    random.Random(0).shuffle(patients)  # not --seed: runs with other seeds validate alike
    val = set(patients[:max(2, round(fraction * len(patients)))])  # 2: a pair alone scores 0
    return [r for r in rows if key(r) not in val], [r for r in rows if key(r) in val]

def image_under(root, path):  # 'CheXpert-v1.0-small/train/...' -> ROOT/train/...
    return str(Path(root).joinpath(*Path(path).parts[1:]))

def five_by_200_rows(root):
    """The rows of ROOT/chexpert_5x200.csv that keep the 5x200 rule (any view); none without it."""
    if not (Path(root) / "chexpert_5x200.csv").exists():
        return []
    rows = read_csv(Path(root) / "chexpert_5x200.csv", CHEXPERT_COLUMNS)
    return [{**r, "image": image_under(root, r["Path"])} for r in rows
            if five_class_index(r) is not None]

def chexpert_rows(root, val_fraction=0.05):
    """Rows of a CheXpert folder, {'train', 'val' (frontal views), 'test' (chexpert_5x200.csv's
    5x200 rows, any view)}."""
    rows = [r for r in read_csv(Path(root) / "train.csv", CHEXPERT_COLUMNS)
            if r["Frontal/Lateral"] == "Frontal"]
    test = five_by_200_rows(root)
    test_patients = {patient_of(r["Path"]) for r in test}  # by patient, not only by image
    rows = [r for r in rows if patient_of(r["Path"]) not in test_patients]
    train, val = split_by_patient(rows, val_fraction)
    for row in train + val:
        row["image"] = image_under(root, row["Path"])
    return {"train": train, "val": val, "test": test}

def load_source(name, root, cfg):
    """The splits of one --data source, by its own rules (load_splits)."""
    if name == "csv":
        rows = read_csv(root, ["image", "text"])
        folder = Path(root).parent  # image paths are relative to the CSV
        if "split" not in rows[0]:  # a split column (train/val; other rows unused) is kept as is
            _, held_out = split_by_patient(rows, cfg.val_fraction, key=lambda r: r["image"])
            for row in held_out:
                row["split"] = "val"
        pairs = lambda name: [(str(folder / r["image"]), r["text"]) for r in rows
                              if r.get("split", "train") == name]
        return {"train": pairs("train"), "val": pairs("val"), "test": []}
    if name == "mimic-cxr":  # its official split; the test split stays for evaluate.py
        return mimic_cxr(root, cfg.caption, cfg.reports_root)
    if name == "openi":  # held out by uid: one patient's study
        return openi(root, cfg.caption, lambda uids: split_by_patient(uids, cfg.val_fraction, str))
    if name == "chexpert-plus":  # its official split; CheXpert-5x200's patients stay out
        test = five_by_200_rows(root)
        splits = chexpert_plus(root, cfg.caption, {patient_of(r["Path"]) for r in test})
        return {**splits, "test": [(r["image"], five_class_index(r)) for r in test]}
    splits = chexpert_rows(root, cfg.val_fraction)
    return {"train": [(r["image"], caption_from_labels(r)) for r in splits["train"]],
            "val": [(r["image"], caption_from_labels(r)) for r in splits["val"]],
            "test": [(r["image"], five_class_index(r)) for r in splits["test"]]}

SOURCES = ["chexpert", "csv", "mimic-cxr", "chexpert-plus", "openi"]

def load_splits(cfg):
    """{'train': [(path, caption, or a tuple of captions each step draws one of)], 'val': [(path,
    caption)], 'test': [(path, class index)]}: each --data source by its own rules, joined."""
    sources = check_sources(cfg.data, cfg.data_root, SOURCES)  # [(name, root)]
    parts = [load_source(name, root, cfg) for name, root in sources]
    splits = {key: [r for part in parts for r in part[key]] for key in ("train", "val", "test")}
    held_out = len(splits["val"])
    if cfg.val_size and held_out > cfg.val_size:  # a fixed sample, the same for every --seed
        keep = sorted(random.Random(0).sample(range(held_out), cfg.val_size))
        splits["val"] = [splits["val"][i] for i in keep]
    elif cfg.val_size:
        print0(f"validation: all {held_out} held-out pairs, fewer than --val-size "
               f"{cfg.val_size} (a higher --val-fraction holds out more; official splits stay)")
    return splits

class TrainBatches(Sampler):
    """Endless batches of (index, augmentation seed) for one rank: global batch `step` is a slice
    of a seeded permutation, the same for any number of ranks and at any resumed step."""

    def __init__(self, n, batch_size, seed, start_step=0):
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.steps_per_epoch = n // batch_size

    def __iter__(self):
        rank = world()[0]
        per_rank = self.batch_size // world()[1]  # this rank's share of each global batch
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
    rank = world()[0]
    per_rank = batch_size // world()[1]
    indices = list(range(n)) + [n - 1] * (-n % batch_size)
    return [[(i, None) for i in indices[start + rank * per_rank:start + (rank + 1) * per_rank]]
            for start in range(0, len(indices), batch_size)]

def make_loaders(splits, cfg, device, world_size, start_step=0):
    """Stage 1's (endless train iterator, val loader, test loader), after checking the batch."""
    if cfg.batch_size % world_size or (cfg.batch_size // world_size) % cfg.accum_steps:
        die(f"--batch-size {cfg.batch_size} is the global batch and must divide by the "
            f"{world_size} processes, and each one's share must divide by --accum-steps "
            f"{cfg.accum_steps}: change one.")
    if len(splits["train"]) < cfg.batch_size or len(splits["val"]) < 2:
        die(f"{len(splits['train'])} train and {len(splits['val'])} val images after filtering; "
            f"training needs {cfg.batch_size} (one global batch), validation 2 (the loss of one "
            "pair is always 0): lower --batch-size, give more data, or check --data-root.")

    def loader(name, batches, **view):
        dataset = XrayDataset(splits[name], cfg.image_size, name, cache=cfg.image_cache,
                              square=cfg.square, **view)
        return make_loader(dataset, batches, cfg.num_workers, device, persistent=name == "train")
    batches = TrainBatches(len(splits["train"]), cfg.batch_size, cfg.seed, start_step)
    return (iter(loader("train", batches, hflip=cfg.hflip, affine=cfg.augment == "cleft")),
            loader("val", eval_batches(len(splits["val"]), cfg.batch_size)),
            loader("test", eval_batches(len(splits["test"]), cfg.batch_size)))

# --- Model: image tower (DINOv2), text tower (frozen causal LM + PEFT), CLEFT = both + projections
def load_pretrained(name, kind):
    """(model, tokenizer; None for kind 'vision') from a hub id or a save_pretrained folder, in
    fp32. A model that cannot be loaded raises OSError, with the fix."""
    try:
        model = AutoModel.from_pretrained(name, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(name) if kind == "text" else None
    except (OSError, ValueError) as error:
        raise OSError(f"cannot load the {kind} model '{name}' ({str(error).splitlines()[0]}): "
                      "download it once with network access (or unset HF_HUB_OFFLINE), or pass "
                      "a local save_pretrained folder") from None

class ImageTower(nn.Module):
    """DINOv2; the image feature is the mean of the last block's tokens, final norm removed."""

    def __init__(self, vit, checkpointing=True):
        super().__init__()
        self.model = vit
        # as the public code: the last block's tokens as they are, without DINOv2's final LayerNorm
        self.model.layernorm = nn.Identity()
        # used only by masked-image pre-training; DDP fails on a trained tensor with no gradient
        self.model.embeddings.mask_token.requires_grad_(False)
        self.width = vit.config.hidden_size
        if checkpointing:  # activations recomputed in the backward (non-reentrant: the default)
            vit.activation_checkpointing_enable()
        statistics = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # ImageNet's
        for name, values in statistics.items():  # buffers: moved once with the model
            self.register_buffer(name, torch.tensor(values).view(3, 1, 1), persistent=False)

    def tokens(self, images):  # (B, 1 or 3, S, S) pixels in [0, 1] -> (B, T, width): every token
        pixels = (images.expand(-1, 3, -1, -1) - self.mean) / self.std  # gray to 3 channels
        return self.model(pixel_values=pixels).last_hidden_state

    def forward(self, images):  # -> (B, width): the image feature, the mean of the tokens
        return self.tokens(images).mean(dim=1)

def adapter_config(kind, lora_r=8, lora_alpha=32, lora_dropout=0.1, prefix_tokens=20):
    """The peft config of `kind` for GPT-2 (paper section 3.3), or None for 'none'."""
    if kind == "lora":  # GPT-2's fused q/k/v projection is a Conv1D: fan_in_fan_out
        return LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=["c_attn"], fan_in_fan_out=True)
    if kind == "ia3":
        return IA3Config(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                         feedforward_modules=["mlp.c_proj"])
    prefix = PrefixTuningConfig(num_virtual_tokens=prefix_tokens, task_type="FEATURE_EXTRACTION")
    return prefix if kind == "prefix" else None

class TextTower(nn.Module):
    """A causal LM read at the end-of-sequence token, the one position that has seen the whole
    caption (paper 2.1). The LM is frozen unless train_lm; the adapter (peft config) is trained."""

    def __init__(self, lm, tokenizer, adapter=None, max_length=64, train_lm=False,
                 checkpointing=True):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.width = lm.config.hidden_size
        lm.requires_grad_(train_lm)
        self.prefix = getattr(adapter, "peft_type", "") == "PREFIX_TUNING"  # its prefix: a cache
        self.model = lm if adapter is None else get_peft_model(lm, adapter)
        if checkpointing and not self.prefix:  # peft supports not both
            lm.activation_checkpointing_enable()  # non-reentrant, as for the image tower
            lm.disable_input_require_grads()  # its hook: backward through the frozen LM for nothing

    def tokenize(self, captions):
        """(input_ids (B, T), causal mask (1, 1, T, T), EOS positions (B,)); right-padded, EOS kept
        under truncation. No EOS sees the padding after it: no padding mask (GPT-2: 2 host syncs)"""
        eos_id = self.tokenizer.eos_token_id
        ids = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        ids = [x[:self.max_length - 1] + [eos_id] for x in ids]
        longest = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [eos_id] * (longest - len(x)) for x in ids])
        causal = torch.ones(1, 1, longest, longest, dtype=torch.bool).tril()  # True: attended
        return input_ids, causal, torch.tensor([len(x) - 1 for x in ids])

    def forward(self, captions):  # list of B strings -> (B, width)
        unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}  # labels repeat: once each
        tensors = *self.tokenize(list(unique)), torch.tensor([unique[c] for c in captions])
        input_ids, mask, eos, index = (to_device(t, self.model.device) for t in tensors)
        mask = None if self.prefix else mask  # peft masks the prefix by its length
        pooled = self.pool_at_eos(eos, input_ids=input_ids, attention_mask=mask)  # (U, width)
        return pooled[index]  # (B, width)

    def pool_at_eos(self, eos_positions, **inputs):  # the LM on ids or embeddings, at the EOS
        hidden = self.model(**inputs, use_cache=False).last_hidden_state  # (B, T, width)
        return hidden[torch.arange(len(hidden), device=hidden.device), eos_positions]

class EncoderTextTower(TextTower):
    """An encoder such as BERT (the Med-CLIP preset), read at [CLS]. Its pooler is dropped: [CLS]
    pooling leaves it unused, and DDP fails on a trained tensor that never gets a gradient."""

    def __init__(self, encoder, *args, **kwargs):
        encoder.pooler = None
        super().__init__(encoder, *args, **kwargs)

    def tokenize(self, captions):  # the tokenizer's own [CLS] ... [SEP], padded; [CLS] is read
        batch = self.tokenizer(captions, truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"], torch.zeros(len(captions), dtype=int)

class CLEFT(nn.Module):
    """Both towers, their projections to the shared space, and the learnable temperature."""

    def __init__(self, image_tower, text_tower, embed_dim=512):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = nn.Linear(image_tower.width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature 0.07

    def encode_image(self, images):  # (B, 1 or 3, S, S) in [0, 1] -> (B, D), unit length, fp32
        return F.normalize(self.image_projection(self.image_tower(images)).float(), dim=-1)

    def encode_text(self, captions):  # B strings -> (B, D), unit length, fp32
        return F.normalize(self.text_projection(self.text_tower(captions)).float(), dim=-1)

    def forward(self, images, captions):  # the scale too: DDP sees every trained tensor used
        return self.encode_image(images), self.encode_text(captions), self.logit_scale

def build_model(cfg, load=load_pretrained):
    """CLEFT as a run's config describes it (the one builder that reads the config). load(name,
    kind) -> (model, tokenizer): the hub or a folder; the dry run builds on the meta device."""
    try:
        vit, _ = load(cfg.vision_model, "vision")
        lm, tokenizer = load(cfg.text_model, "text")
    except OSError as error:
        die(f"{error}; `python demo.py` runs offline on tiny models.")
    adapter = adapter_config(cfg.peft, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                             cfg.prefix_tokens)
    tower = EncoderTextTower if hasattr(lm, "pooler") else TextTower  # BERT has a [CLS] pooler
    text_tower = tower(lm, tokenizer, adapter, cfg.max_length, cfg.full_ft_lm,
                       cfg.grad_checkpointing)
    if cfg.train_embed:  # Table 3's ablation: the token embeddings trained too
        text_tower.model.get_input_embeddings().requires_grad_(True)
    return CLEFT(ImageTower(vit, cfg.grad_checkpointing), text_tower, cfg.embed_dim)

def frozen_to_bf16(model):
    """The frozen weights and biases of GPT-2's matmuls (Conv1D) in bf16, as bf16 autocast uses
    them: half the size."""
    frozen = [p for module in model.modules() if type(module).__name__ == "Conv1D"
              for p in module.parameters(recurse=False) if not p.requires_grad]
    for p in frozen:  # LoRA's and IA3's own weights are trained: they stay fp32
        p.data = p.data.bfloat16()
    return model

# --- Loss: symmetric InfoNCE over the global batch (paper Eq. 1)
def contrastive_loss(image_features, text_features, logit_scale, ids=None, gather=True):
    """Paper Eq. 1 in fp32 for this rank's b pairs, (b, D) unit vectors, against the N of the global
    batch. ids (b,): pairs with identical captions are positives too. gather=False: the rows are
    the whole batch (validation)."""
    gathered = all_gather_rows if gather else lambda rows: rows
    all_images = gathered(image_features)  # (N, D): the global batch
    all_texts = gathered(text_features)  # (N, D)
    scale = logit_scale.float().exp()
    logits_per_image = scale * image_features.float() @ all_texts.float().T  # (b, N)
    logits_per_text = scale * text_features.float() @ all_images.float().T  # (b, N)
    if ids is None:  # the gathered batch is in rank order: this rank's pairs start at rank * b
        first_row = world()[0] * len(image_features) if gather else 0
        targets = first_row + torch.arange(len(image_features), device=image_features.device)
    else:  # class probabilities as targets: each caption identical to ours weighs 1 / their count
        same = (ids[:, None] == gathered(ids)[None, :]).float()  # (b, N)
        targets = same / same.sum(dim=1, keepdim=True)
    # the mean over this rank's rows; DDP's mean over the ranks makes it the global batch's
    return (F.cross_entropy(logits_per_image, targets)
            + F.cross_entropy(logits_per_text, targets)) / 2

def caption_ids(captions):  # a 63-bit id per caption, the same on every rank, on the host
    digest = lambda c: hashlib.blake2b(c.encode(), digest_size=8).digest()
    return torch.tensor([int.from_bytes(digest(c), "little") >> 1 for c in captions])

# --- Train step
def train_step(model, images, captions, autocast, accum_steps=1, multi_positive=False):
    """Forward and backward of this rank's share of one global batch; the loss (detached)."""
    ids = to_device(caption_ids(captions), images.device) if multi_positive else None
    loss_fn = partial(contrastive_loss, ids=ids)  # (image features, text features, scale) -> loss
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
# adapter/ (peft's), state.pt (step, best val loss, optimizer), split.safetensors (the patients
# trained on and held out: held_out.py), manifest.json; written and checked by checkpoints.py
def load_config(directory):
    saved = read_json(checkpoint_dir(directory) / "config.json")
    return Config(**{f.name: saved[f.name] for f in fields(Config) if f.name in saved})

def load_model(directory, cfg=None):
    """CLEFT with the weights trained in checkpoint `directory` (the rest: the base models)."""
    directory = checkpoint_dir(directory)
    model = build_model(cfg or load_config(directory))
    saved = read_saved(directory / "model.safetensors", load_file)
    if saved.keys() != trained_weights(model).keys():
        die(f"{directory} does not match its config.json: was it written by another cleft.py?")
    model.load_state_dict(saved, strict=False)
    return model

def resume_state(cfg):
    """state.pt of OUT/last/, to the CPU, if resuming (--resume, or this config's run is there)."""
    last = Path(cfg.out_dir) / "last"
    found = saved_folder(last) is not None
    if len(set(on_every_rank(found))) > 1:  # every rank decides alike, or none goes on
        die(f"some processes see a checkpoint in {last} and others do not: put --out-dir on a "
            "file system that every node shares.")
    if not (cfg.resume or found):
        return None
    check_resume(load_config(last), cfg, cfg.out_dir)  # the same model; other flags: --resume
    load = partial(torch.load, map_location="cpu", weights_only=True)
    state = read_saved(checkpoint_dir(last) / "state.pt", load)
    nothing_left_to_train(state["step"], cfg.max_steps, last)  # a shortened run: exit 0, a line
    return state

# --- Evaluation: validation loss and zero-shot accuracy (all ranks take part: they gather)
@torch.no_grad()
def validate(model, val_loader, test_loader, autocast, batch_size):
    """{'val_loss': the contrastive loss per held-out pair, scored in batches of batch_size (the
    last one smaller, one pair alone joining the one before: its loss would be 0; fixed, so values
    compare across the run), and with a test split 'zero_shot_acc': % of argmax over classes of
    cos(image, hand-written prompt)}."""
    model.eval()
    n_val = len(val_loader.dataset)
    images, texts = embed(model, val_loader, n_val, autocast)  # (n_val, D) each
    sizes = [min(batch_size, n_val - start) for start in range(0, n_val, batch_size)]
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    losses = [contrastive_loss(i, t, model.logit_scale, gather=False) * len(i)
              for i, t in zip(images.split(sizes), texts.split(sizes))]
    record = {"val_loss": (sum(losses) / n_val).item()}
    if n_test := len(test_loader.dataset):  # the five classes of CheXpert-5x200
        with autocast:
            class_features = model.encode_text(class_prompts(FIVE_CLASSES))  # (C, D)
        image_features, labels = embed(model, test_loader, n_test, autocast)  # (n_test, D)
        correct = (image_features @ class_features.T).argmax(dim=1) == labels
        record["zero_shot_acc"] = 100 * correct.float().mean().item()
    model.train()
    return record

@torch.no_grad()
def embed(model, loader, n, autocast, progress=False, encode=None):
    """(image features (n, D), targets: labels (n,) or caption features (n, D)) of an eval_batches
    loader, on every rank: each embeds its share, then they are gathered (all ranks call it).
    encode: images -> features (default model.encode_image)."""
    device = next(model.parameters()).device
    encode = encode or model.encode_image
    features, targets, unreadable = [], [], []
    for images, target, skipped in progress_bar(loader, "images", disable=not progress):
        with autocast:
            features.append(all_gather_rows(encode(images.to(device)).float()))  # (B, D)
            if not torch.is_tensor(target):  # captions
                target = model.encode_text(list(target))  # (B, D)
        targets.append(all_gather_rows(target.to(device)))
        unreadable += skipped
    report_unreadable(unreadable)
    return torch.cat(features)[:n], torch.cat(targets)[:n]

# --- Main
def model_and_optimizer(cfg, state, device, dtype):
    """The model (OUT/last/'s trained weights when resuming) in training mode, and its AdamW."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = load_model(Path(cfg.out_dir) / "last", cfg) if state else build_model(cfg)
    if dtype == "bf16":  # before the move: the fp32 copy never reaches the device
        frozen_to_bf16(model)
    model = model.to(device).train()  # set, not inherited: from_pretrained returns eval mode
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, fused=device.type == "cuda")
    if state:  # the optimizer's tensors are copied to its parameters' device, the CPU copy freed
        optimizer.load_state_dict(state.pop("optimizer"))
        print0(f"resumed from {Path(cfg.out_dir) / 'last'} at step {state['step']}")
    print0(f"trained parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    return model, optimizer

def save(names, model, optimizer, cfg, step, best_val_loss, patients, progress):
    """OUT/<name>/ for each name, written by rank 0; every rank calls it. A write the OS refuses
    (a full disk, a read-only or vanished folder) stops every rank with one line."""
    error = save_on_rank_0(cfg.out_dir, names, model, optimizer, cfg, step, best_val_loss, patients)
    if error:
        progress.close()
        die(f"{error}: free space there or make it writable, then run the same command to resume.")

def main(argv=None):
    cfg = parse_config(argv)
    rank, world_size, device = setup_distributed()
    dtype, autocast = autocast_for(cfg.dtype, device)
    print0(f"config, where it differs from the defaults (all of it: OUT/last/config.json): "
           f"{json.dumps(changed_fields(cfg))}\nworld size {world_size} on {device}, {dtype}")
    check_schedule(cfg.warmup_steps, cfg.max_steps)  # a warning if the warm-up never ends
    splits = load_splits(cfg)
    patients = patient_record(splits, cfg)  # whom it trains on and holds out: in each checkpoint
    state = resume_state(cfg)  # None for a fresh run
    start_step = state["step"] if state else 0
    best_val_loss = state["best_val_loss"] if state else math.inf
    train_loader, val_loader, test_loader = make_loaders(splits, cfg, device, world_size,
                                                         start_step)
    model, optimizer = model_and_optimizer(cfg, state, device, dtype)
    print0(caption_lengths(splits, model.text_tower.tokenizer, cfg.max_length))
    device_ids = None if device.type == "cpu" else [device.index]  # DDP trains, the model is saved
    ddp_model = DistributedDataParallel(model, device_ids) if world_size > 1 else model
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    if rank == 0:  # on resume, the lines after the checkpoint go: those steps run again
        start_metrics(metrics, start_step if state else None)
    progress = progress_bar(total=cfg.max_steps, initial=start_step, desc="train")  # rank 0's

    UNREADABLE.clear()
    losses = []  # this log line's steps: their losses stay on the device until it is written
    window_start = time.time()
    stop = StopSignals()  # SIGTERM (preemption) and Ctrl-C: the step finishes, last/ is saved
    for step in range(start_step, cfg.max_steps + 1):
        # evaluate and save every eval_every steps and at the end (a resumed run: not at its start)
        due = step % cfg.eval_every == 0 or step == cfg.max_steps
        just_resumed = state is not None and step == start_step  # its checkpoint did it
        if due and not just_resumed:
            record = {"step": step, **validate(model, val_loader, test_loader, autocast,
                                               cfg.batch_size)}
            check_finite(record["val_loss"], "validation loss", step, cfg.out_dir, progress)
            log(metrics, record, " | ".join(f"{k} {round(v, 4)}" for k, v in record.items()))
            improved = record["val_loss"] < best_val_loss
            best_val_loss = min(best_val_loss, record["val_loss"])
            names = (["best"] if improved else []) + ["last"]  # best/ if the val loss improved
            save(names, model, optimizer, cfg, step, best_val_loss, patients, progress)
            losses = []  # a log line averages the steps since: resumed runs log the same
            window_start = time.time()
        # SIGTERM or Ctrl-C on any rank: all stop at this step (the last step needs no agreement)
        stopped_by = stop.agreed() if step < cfg.max_steps else 0
        if step == cfg.max_steps or stopped_by:
            break

        # one optimisation step on the global batch
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions, skipped = next(train_loader)
        if cfg.strict_data:
            stop_if_unreadable(skipped, step, progress)
        report_unreadable(skipped)  # rank 0 prints each new one (every rank takes part)
        # dropout masks depend on (seed, step, rank) alone, so a resumed run draws the same ones
        # (rank and step below 2**20 each: every triple gets its own seed)
        torch.manual_seed(cfg.seed * 2**40 + step * 2**20 + rank)
        loss = train_step(ddp_model, images.to(device, non_blocking=True), captions, autocast,
                          cfg.accum_steps, cfg.multi_positive)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP: the scale never exceeds 100
        losses.append(loss)
        progress.update(1)
        if (step + 1) % cfg.log_every == 0:  # the host reads the loss here only
            mean_loss = sum(on_every_rank(sum(losses).item())) / world_size / len(losses)
            check_finite(mean_loss, "loss", step, cfg.out_dir, progress)
            record = {"step": step + 1, "loss": mean_loss, "lr": lr,
                      "logit_scale": model.logit_scale.exp().item(),
                      "images_per_s": cfg.batch_size * len(losses) / (time.time() - window_start)}
            log(metrics, record, "step {step}/{n} | loss {loss:.4f} | lr {lr:.2e} | scale "
                "{logit_scale:.1f} | {images_per_s:.0f} img/s".format(n=cfg.max_steps, **record))
            losses = []
            window_start = time.time()
    progress.close()
    if stopped_by and not due:  # last/ at this step, without validation (unless just saved)
        save(["last"], model, optimizer, cfg, step, best_val_loss, patients, progress)
    stop.restore()  # after the save: a second signal does not interrupt it
    if UNREADABLE:
        print0(f"skipped in this run: {len(UNREADABLE)} unreadable image(s), each named above")
    if stopped_by:
        print0(f"stopped by {signal.Signals(stopped_by).name} at step {step}: "
               f"{Path(cfg.out_dir) / 'last'} holds it; run the same command to resume.")
    else:
        print0(f"done: best validation loss {best_val_loss:.4f}; checkpoints in {cfg.out_dir}")
    return 128 + stopped_by if stopped_by else 0  # 143 after SIGTERM: a stop to resume, no error

if __name__ == "__main__":
    sys.exit(exit_code(main))
