"""Evaluate a CLEFT checkpoint as the paper does (Tables 1 and 2: zero-shot, linear probe,
fine-tune, and data efficiency with 1%, 10% or 100% of the training split), plus image-text
retrieval (its future work); or, without a checkpoint, the paper's baseline rows (baselines.py).
Prints a Markdown table in the layout of the paper's Table 1 and writes results.json; --compare
sets results in the paper's columns, beside its published values where entered (tables.py).

    python evaluate.py --ckpt RUN/best --prompt RUN/best/prompt.safetensors \\
        --data chexpert5x200 --data-root /data/chexpert --task all
    python evaluate.py --ckpt RUN/best --data rsna --data-root /data/rsna --task linear \\
        --data-pct 0.01
    python evaluate.py --ckpt RUN/best --data embed-birads --data-root /data/embed --task zeroshot
    python evaluate.py --vision-model facebook/dinov2-base --data rsna --data-root /data/rsna
    python evaluate.py --compare RUN/best/results_rsna.json runs/baselines/*.json
"""

import copy
import json
import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import load_baseline
from checkpoints import load_prompt
from checks import read_prompts, write_csv
from held_out import check_test, stage_1_split
from cleft import (CAPTION_PREFIX, CHEXPERT_COLUMNS, FIVE_CLASSES, Config, TrainBatches, arg,
                   autocast_for, caption_from_labels, chexpert_rows, die, embed,
                   eval_batches, five_class_index, get_lr, load_config, load_model, make_loader,
                   make_optimizer, parse_config, print0, read_csv, split_by_patient)
from progress import progress_bar
from image_io import XrayDataset
from mammography import BIRADS, DENSITY, MAMMOGRAM_PREFIX, embed_records, export_embed
from metrics import accuracy, auc, recall_at_k, resample_counts, summary
from predict import class_features, ensemble_features, zero_shot_probabilities
from prompt_tune import labelled_splits
from report_data import retrieval_pairs
from tables import TASKS as TABLE_TASKS, comparison, markdown_table

# --- Config
DATASETS = ["chexpert", "chexpert5x200", "rsna", "embed-birads", "embed-density", "csv",
            "mimic-cxr", "openi"]
TASKS = TABLE_TASKS + ["retrieval"]  # the table's three, and retrieval beside it

@dataclass
class EvalConfig:
    ckpt: str = arg("", "stage-1 checkpoint folder, e.g. runs/cleft/best (or --vision-model)")
    vision_model: str = arg("", "no --ckpt: a baseline's image model, hub id or folder (a CLIP "
                            "one with its text tower)")
    random_init: bool = arg(False, "--vision-model's architecture, weights drawn with --seed")
    image_size: int = arg(0, "no --ckpt: the input side (0: 224, or a CLIP model's own)")
    prompt: str = arg("", "stage-2 context file for zero-shot (default: the hand-written prompt)")
    data: str = arg("chexpert", "dataset (chexpert and chexpert5x200 are the same)", DATASETS)
    data_root: str = arg("", "the dataset's folder, or the CSV file for --data csv")
    reports_root: str = arg("", "mimic-cxr: the folder with the reports' files/, if not the root")
    task: str = arg("all", "what to evaluate", TASKS + ["all"])
    data_pct: float = arg(1.0, "fraction of the training split for linear/finetune (1, 0.1, 0.01)")
    build_5x200: bool = arg(False, "build chexpert_5x200.csv from train.csv if missing (seed 0)")
    per_class: int = arg(200, "--build-5x200: images per class (GLoRIA: 200)")
    rsna_split: str = arg("balanced", "balanced: the paper's 1:1 subset; gloria: GLoRIA/MGCA's "
                          "unbalanced 70/15/15", ["balanced", "gloria"])
    classes: str = arg("", "--data csv: comma-separated class names, as in the label column")
    prompts: str = arg("", "a JSON file of class -> list of zero-shot prompts (an ensemble); "
                       "--data csv also takes 'p1; p2', one prompt per class")
    batch_size: int = arg(36, "linear probe / fine-tune batch (paper: 36)")
    lr: float = arg(5e-4, "linear probe / fine-tune learning rate, AdamW (paper: 5e-4)")
    weight_decay: float = arg(1e-3, "linear probe / fine-tune weight decay (paper: 1e-3)")
    warmup_steps: int = arg(-1, "linear probe / fine-tune warm-up steps (-1: a tenth of the steps)")
    max_steps: int = arg(8000, "linear probe / fine-tune steps (paper: 8000)")
    eval_every: int = arg(500, "validate every N steps; the best validation loss is tested")
    seed: int = arg(0, "seed for the head, the batches and the --data-pct subset")
    seeds: str = arg("", "linear/finetune: comma-separated seeds, e.g. 0,1,2, each with its own "
                     "--data-pct subset: mean and sd over them")
    num_workers: int = arg(-1, "data-loading processes (-1: the CPU cores, less one)")
    val_fraction: float = arg(0.05, "CheXpert, csv: share of patients held out, where --ckpt has "
                              "no record of stage 1's")
    dtype: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", ["auto", "bf16", "fp32"])
    out: str = arg("", "results file (default: CKPT/results_DATA.json; --compare: comparison.md)")
    export: str = arg("", "EMBED: also write the train/val captions and labels to this CSV")
    allow_overlap: bool = arg(False, "go on if test images are of patients stage 1 trained on")
    compare: bool = arg(False, "the results files given in the paper's columns, beside its values")
    results: list = arg((), "--compare: results files written by evaluate.py")

# --- Datasets: classes, their hand-written prompts, splits of (path, class), paired captions
@dataclass
class EvalData:
    classes: list  # class names
    prompts: list  # the hand-written zero-shot prompt of each class
    class_texts: list  # what follows a learned context for each class (stage 2)
    splits: dict  # 'train', 'val', 'test' -> [(image path, class index)]
    pairs: list = field(default_factory=list)  # (image path, caption) for retrieval; or none

def build_5x200(rows, per_class=200, seed=0):
    """Sample `per_class` frontal rows of each class under the 5x200 rule, with a fixed seed."""
    by_class = {i: [] for i in range(len(FIVE_CLASSES))}
    for row in rows:
        if row["Frontal/Lateral"] == "Frontal" and five_class_index(row) is not None:
            by_class[five_class_index(row)].append(row)
    for i, candidates in by_class.items():
        if len(candidates) < per_class:
            die(f"only {len(candidates)} rows qualify for {FIVE_CLASSES[i]}, fewer than "
                f"{per_class}: lower the count per class (--per-class).")
    rng = random.Random(seed)
    return [row for i in by_class for row in rng.sample(by_class[i], per_class)]

def chexpert5x200_data(cfg):
    """CheXpert-5x200 (GLoRIA): test = chexpert_5x200.csv; train/val = frontal images positive for
    exactly one of the five classes, from stage 1's patient split, never the 5x200 patients.
    Retrieval: stage 1's validation pairs."""
    root = Path(cfg.data_root)
    if not (root / "chexpert_5x200.csv").exists():
        if not cfg.build_5x200:
            die(f"no chexpert_5x200.csv in {root}: pass --build-5x200 to build it from train.csv "
                "(GLoRIA rule, seed 0).")
        rows = build_5x200(read_csv(root / "train.csv", CHEXPERT_COLUMNS), cfg.per_class, seed=0)
        write_csv(root / "chexpert_5x200.csv", rows, CHEXPERT_COLUMNS)
        print0(f"wrote {root / 'chexpert_5x200.csv'} ({len(rows)} images)")
    splits = labelled_splits(cfg, FIVE_CLASSES)
    if dropped := len(read_csv(root / "chexpert_5x200.csv", ["Path"])) - len(splits["test"]):
        print0(f"note: {dropped} rows of chexpert_5x200.csv break the 5x200 rule (an uncertain -1, "
               "two of the classes, or another finding present) and are left out")
    rows = chexpert_rows(root, cfg.val_fraction)
    captioned = {name: [(r["image"], caption_from_labels(r)) for r in rows[name]]
                 for name in ("train", "val")}
    pairs = stage_1_split({**captioned, "test": []}, cfg.ckpt)["val"]  # stage 1's held-out ones
    texts = [name.lower() for name in FIVE_CLASSES]
    return EvalData(FIVE_CLASSES, [CAPTION_PREFIX + t for t in texts], texts, splits, pairs)

def sklearn_split(items, test_size):
    """(train, test) as scikit-learn's train_test_split(items, test_size, random_state=0)."""
    permutation = np.random.RandomState(0).permutation(len(items))
    n_test = int(np.ceil(test_size * len(items)))
    return [items[i] for i in permutation[n_test:]], [items[i] for i in permutation[:n_test]]

def rsna_split(patients):
    """GLoRIA/MGCA's RSNA split of the sorted patient ids: 70% train, the rest halved."""
    train, rest = sklearn_split(sorted(patients), 0.3)
    test, val = sklearn_split(rest, 0.5)  # their code names the first part test, the second valid
    return {"train": train, "val": val, "test": test}

def rsna_balanced(target, root, seed=0):
    """The paper's (MedCLIP's) 1:1 subset: every positive patient and as many negatives, seeded;
    3,538 / 12,024 of each class for test, so 8,486 / 3,538 images on the full release. The
    public code's stage_2_{train,test}_balance.csv in the data root are used when present.
    Validation: a tenth of each class of the training patients."""
    rng, files = random.Random(seed), [root / f"stage_2_{n}_balance.csv" for n in ("train", "test")]
    if all(file.exists() for file in files):
        train, test = ([r["patientId"] for r in read_csv(file, ["patientId"])] for file in files)
    else:
        positives = rng.sample(sorted(p for p, t in target.items() if t), sum(target.values()))
        negatives = rng.sample(sorted(p for p, t in target.items() if not t), len(positives))
        n_test = round(len(positives) * 3538 / 12024)
        train = positives[n_test:] + negatives[n_test:]
        test = positives[:n_test] + negatives[:n_test]
    train = rng.sample(train, len(train))
    of_class = lambda label: [p for p in train if target[p] == label]
    val = set(p for label in (0, 1) for p in of_class(label)[:round(len(of_class(label)) / 10)])
    return {"train": [p for p in train if p not in val], "val": sorted(val), "test": test}

def rsna_data(cfg):
    """RSNA Pneumonia: a patient is positive if any of its boxes has Target 1. Images are
    stage_2_train_images/<patientId>.png, .jpg or .dcm (DICOM needs pydicom)."""
    root = Path(cfg.data_root)
    target = {}
    for row in read_csv(root / "stage_2_train_labels.csv", ["patientId", "Target"]):
        target[row["patientId"]] = max(target.get(row["patientId"], 0), int(row["Target"]))
    images = root / "stage_2_train_images"

    def image_of(patient):
        for suffix in (".png", ".jpg", ".jpeg", ".dcm"):
            if (images / f"{patient}{suffix}").exists():
                return str(images / f"{patient}{suffix}")
        die(f"no image for patient {patient} in {images}: expected {patient}.png, .jpg or .dcm.")

    paths = {p: image_of(p) for p in target}
    parts = rsna_split(target) if cfg.rsna_split == "gloria" else rsna_balanced(target, root)
    splits = {name: [(paths[p], target[p]) for p in patients] for name, patients in parts.items()}
    texts = ["no finding", "pneumonia"]  # the public code's "pneumothorax" here is a bug
    return EvalData(["Normal", "Pneumonia"], [CAPTION_PREFIX + t for t in texts], texts, splits)

def embed_data(cfg):
    """EMBED BI-RADS or density: train and val images of embed_records; the test set is balanced
    and drawn from the other 20% (seed 0): BI-RADS 7 classes x 200, density 4 x 500 (the paper)."""
    root, task = Path(cfg.data_root), cfg.data.split("-")[1]
    labels, per_class = (BIRADS, 200) if task == "birads" else (DENSITY, 500)
    keys, parts = list(labels), embed_records(root)
    by_class = [[r for r in parts["rest"] if r.get(task) == k] for k in keys]
    if (have := min(map(len, by_class))) == 0:
        die(f"the test part of {root} lacks a {task} class: check the two EMBED CSVs (README).")
    if have < per_class:
        print0(f"note: a {task} class has {have} test images, fewer than {per_class}: the balanced "
               f"test set holds {have} per class")
    rng, n = random.Random(0), min(have, per_class)
    test = [r for records in by_class for r in rng.sample(records, n)]
    parts = {"train": parts["train"], "val": parts["val"], "test": test}
    splits = {name: [(r["image"], keys.index(r[task])) for r in records if task in r]
              for name, records in parts.items()}
    texts = [labels[k] for k in keys]
    if cfg.export:  # the pairs and labels for pre-training and stage 2 on EMBED (README)
        export_embed(parts, task, labels, Path(cfg.export))
    return EvalData(keys, [MAMMOGRAM_PREFIX + t for t in texts], texts, splits)

def csv_data(cfg):
    """Any dataset: a CSV with image and label columns (paths relative to it), an optional split
    column (train/val/test; else 70/15/15 by image, seed 0) and an optional text column."""
    if not cfg.classes:
        die("--data csv needs --classes: the label column's class names, comma-separated.")
    classes = [c.strip() for c in cfg.classes.split(",")]
    rows = read_csv(cfg.data_root, ["image", "label"])
    if unknown := sorted({r["label"] for r in rows} - set(classes)):
        die(f"{cfg.data_root} has labels {unknown[:5]} that are not in --classes: list every "
            "class name.")
    root = Path(cfg.data_root).parent
    if "split" not in rows[0]:
        train, rest = split_by_patient(rows, 0.3, key=lambda r: r["image"])
        val, test = split_by_patient(rest, 0.5, key=lambda r: r["image"])
        for part, name in [(train, "train"), (val, "val"), (test, "test")]:
            for r in part:
                r["split"] = name
    splits = {name: [(str(root / r["image"]), classes.index(r["label"])) for r in rows
                     if r["split"] == name] for name in ("train", "val", "test")}
    pairs = [(str(root / r["image"]), r["text"]) for r in rows
             if r["split"] == "test" and r.get("text")]
    prompts = [CAPTION_PREFIX + c.lower() for c in classes]  # a file: read in zero_shot
    if cfg.prompts and not Path(cfg.prompts).is_file():
        prompts = [p.strip() for p in cfg.prompts.split(";")]
    if len(prompts) != len(classes):
        die(f"--prompts has {len(prompts)} entries for {len(classes)} classes: give one prompt "
            "per class, ';'-separated.")
    return EvalData(classes, prompts, [c.lower() for c in classes], splits, pairs)

def load_data(cfg):
    if not cfg.data_root:
        die(f"--data {cfg.data} needs --data-root (see the README for each dataset's layout).")
    if cfg.data in ("mimic-cxr", "openi"):  # report pairs alone, for retrieval: no classes
        pairs = retrieval_pairs(cfg.data, cfg.data_root, cfg.reports_root)
        return EvalData([], [], [], {"train": [], "val": [], "test": []}, pairs)
    loader = {"chexpert": chexpert5x200_data, "chexpert5x200": chexpert5x200_data,
              "rsna": rsna_data, "embed-birads": embed_data, "embed-density": embed_data,
              "csv": csv_data}[cfg.data]
    return loader(cfg)

def subset(records, fraction, seed):
    """A seeded fraction of the records. Subsets are nested: the 1% one lies inside the 10% one."""
    keep = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in sorted(keep[:max(1, round(fraction * len(records)))])]

# --- Tasks
def dataset_of(records, cfg):  # images as stage 1 saw them (size, square, cache); a baseline's size
    return XrayDataset.as_trained(records, load_config(cfg.ckpt) if cfg.ckpt
                                  else Config(image_size=cfg.image_size))

def features_of(model, records, cfg, device, autocast, encode=None):
    """(features, labels) of (path, class) records, evaluation view, computed once."""
    batches = eval_batches(len(records), 64)
    loader = make_loader(dataset_of(records, cfg), batches, cfg.num_workers, device)
    features, labels = embed(model, loader, len(records), autocast, True, encode)
    return features, labels.cpu().numpy()

def scores(runs, labels, classes):
    """Accuracy and AUC (%) of runs (each seed's probabilities (n, C)) on the same test images, with
    95% bootstrap intervals (and the sd over seeds); AUC None if a class has no test image."""
    counts = resample_counts(len(labels))  # (1 + 1000, n): the test set, then its resamples
    accuracies = summary("acc", np.stack([accuracy(p, labels, counts) for p in runs]))
    if absent := [name for i, name in enumerate(classes) if i not in labels]:
        return {**accuracies, "auc": None, "auc_undefined": f"no test image of {absent}"}
    return {**accuracies, **summary("auc", np.stack([auc(p, labels, counts) for p in runs]))}

def prompts_of(data, cfg):  # {class: [hand-written prompts]}: the data's one each, or a file's
    if cfg.prompts and Path(cfg.prompts).is_file():
        return read_prompts(cfg.prompts, data.classes)
    return {name: [prompt] for name, prompt in zip(data.classes, data.prompts)}

@torch.no_grad()
def zero_shot(model, data, cfg, device, autocast):
    """argmax over classes of scale * cos(image, prompt); a class's several prompts: the mean of
    their features; with --prompt, the learned context."""
    with autocast:  # (C, D)
        if cfg.prompt:  # the learned context; the classes are the data set's
            context, _ = load_prompt(cfg.prompt)
            text_features = class_features(model, data.class_texts, context)
        else:
            text_features = ensemble_features(model, list(prompts_of(data, cfg).values()))
    image_features, labels = features_of(model, data.splits["test"], cfg, device, autocast)
    probabilities = zero_shot_probabilities(model, image_features, text_features).cpu().numpy()
    return scores([probabilities], labels, data.classes)

def fit(module, batch_loss, val_loss, cfg, desc):
    """AdamW (no weight decay on biases and norms) for cfg.max_steps on batch_loss(step), with
    stage 1's warm-up and cosine schedule; every eval_every steps, keep the parameters with the
    smallest val_loss(). The best parameters are loaded back in place."""
    optimizer, params = make_optimizer(module, cfg.lr, cfg.weight_decay), list(module.parameters())
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else cfg.max_steps // 10
    best = (float("inf"), None)
    for step in progress_bar(range(cfg.max_steps + 1), desc=desc, leave=False):
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            if (loss := val_loss()) < best[0]:
                best = (loss, [p.detach().clone() for p in params])
        if step == cfg.max_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg.lr, warmup, cfg.max_steps)
        batch_loss(step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, saved in zip(params, best[1]):
            p.copy_(saved)

def linear_probe(model, data, cfg, device, autocast, train):
    """The image tower is frozen, so its features (before the projection) are computed once and
    a linear head is trained on them with cross-entropy."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        features_of(model, records, cfg, device, autocast, model.image_tower)
        for records in (train, data.splits["val"], data.splits["test"]))
    y_train, y_val = torch.as_tensor(y_train, device=device), torch.as_tensor(y_val, device=device)
    torch.manual_seed(cfg.seed)
    head = nn.Linear(x_train.shape[1], len(data.classes)).to(device)
    batches, batch = torch.Generator().manual_seed(cfg.seed), min(cfg.batch_size, len(y_train))

    def batch_loss(step):
        index = torch.randint(len(y_train), (batch,), generator=batches).to(device)
        return F.cross_entropy(head(x_train[index]), y_train[index])

    val_loss = lambda: F.cross_entropy(head(x_val), y_val).item()
    fit(head, batch_loss, val_loss, cfg, "linear probe")
    with torch.no_grad():
        return head(x_test).softmax(dim=1).cpu().numpy(), y_test  # (n, C) probabilities, labels

def fine_tune(model, data, cfg, device, autocast, train):
    """The image tower and a linear head trained end to end on augmented training images."""
    tower = copy.deepcopy(model.image_tower).train().requires_grad_(True)  # the checkpoint stays
    torch.manual_seed(cfg.seed)
    head = nn.Linear(tower.width, len(data.classes)).to(device)

    def classify(images):  # (B, C) logits: the tower under the caller's autocast, the head in fp32
        features = tower(images).float()
        with torch.autocast(device.type, enabled=False):
            return head(features)
    train_set = dataset_of(train, cfg)
    val_set = dataset_of(data.splits["val"], cfg)
    batches = TrainBatches(len(train), min(cfg.batch_size, len(train)), cfg.seed)
    loader = iter(make_loader(train_set, batches, cfg.num_workers, device, persistent=True))
    val_loader = make_loader(val_set, eval_batches(len(val_set), 64), cfg.num_workers, device)

    def batch_loss(step):
        images, labels, _ = next(loader)
        with autocast:
            logits = classify(images.to(device))
        return F.cross_entropy(logits, labels.to(device))

    def val_loss():
        tower.eval()
        logits, labels = embed(model, val_loader, len(val_set), autocast, encode=classify)
        tower.train()
        return F.cross_entropy(logits, labels).item()

    fit(nn.ModuleList([tower, head]), batch_loss, val_loss, cfg, "fine-tune")
    tower.eval()
    with torch.no_grad():
        logits, labels = features_of(model, data.splits["test"], cfg, device, autocast, classify)
    return logits.softmax(dim=1).cpu().numpy(), labels  # (n, C) probabilities, labels

@torch.no_grad()
def retrieval(model, data, cfg, device, autocast):
    """Image->text and text->image Recall@1/5/10. Captions built from labels repeat, so the text
    gallery holds each distinct caption once, and any image with that caption is a hit for it."""
    if not data.pairs:
        return None
    captions = sorted({caption for _, caption in data.pairs})
    index = {caption: i for i, caption in enumerate(captions)}
    records = [(path, index[c]) for path, c in data.pairs]
    image_features, targets = features_of(model, records, cfg, device, autocast)
    with autocast:
        text_features = torch.cat([model.encode_text(captions[i:i + 256])
                                   for i in range(0, len(captions), 256)])
    similarity = (image_features @ text_features.T).cpu().numpy()  # (images, captions)
    relevant = targets[:, None] == np.arange(len(captions))[None, :]
    results = {}  # the intervals resample the queries: images for i2t, captions for t2i
    for direction, queries, hits in [("i2t", similarity, relevant),
                                     ("t2i", similarity.T, relevant.T)]:
        for name, values in recall_at_k(queries, hits, resample_counts(len(queries))).items():
            results.update(summary(f"{direction}_{name}", values[None]))
    return results

def results_file(cfg, row):
    """CKPT/results_DATA.json, a baseline's runs/baselines/ROW_DATA.json; _PCT before .json for
    --data-pct below 1, so the data-efficiency runs keep the 100% one."""
    share = "" if cfg.data_pct == 1 else f"_{cfg.data_pct:g}"
    if cfg.out:
        return Path(cfg.out)
    if cfg.ckpt:
        return Path(cfg.ckpt) / f"results_{cfg.data}{share}.json"
    return Path("runs", "baselines", f"{row.lower()}_{cfg.data}{share}.json")

def main(argv=None):
    cfg = parse_config(argv, EvalConfig, __doc__)
    if cfg.results and not cfg.compare:
        die(f"{cfg.results[0]} is given without --compare: add --compare, or drop the file.")
    if cfg.compare:  # the paper's published values beside results files already written
        table = comparison(cfg.results)
        out = Path(cfg.out or "comparison.md")
        out.write_text(table + "\n")
        print0(f"{table}\n\nwritten to {out}")
        return
    # --export, or --build-5x200 alone (before stage 1): the files are written, nothing evaluated
    writes_only = cfg.export or (cfg.build_5x200 and not (cfg.ckpt or cfg.vision_model))
    if bool(cfg.ckpt) == bool(cfg.vision_model) and not writes_only:
        die("pass --ckpt, the best/ (or last/) folder of a cleft.py run, or --vision-model for a "
            "baseline row (README: Evaluation), one of the two.")
    if cfg.prompt and not Path(cfg.prompt).is_file():
        die(f"no prompt file at {cfg.prompt}: run prompt_tune.py first, or drop --prompt to use "
            "the hand-written prompts.")
    if cfg.prompts and not Path(cfg.prompts).is_file() and cfg.data != "csv":
        die(f"no --prompts file at {cfg.prompts}: give a JSON file of class -> list of prompts "
            "(prompts separated by ';' are --data csv's).")
    if cfg.prompt and (cfg.vision_model or cfg.prompts):
        die("--prompt is a CLEFT checkpoint's learned context: it takes no --vision-model and no "
            "--prompts (hand-written ones); drop one.")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        die("evaluate.py runs in one process, on one GPU: start it with python, not torchrun.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, autocast = autocast_for(cfg.dtype, device)
    data = load_data(cfg)
    if writes_only:  # written by load_data
        return
    prompts = prompts_of(data, cfg) if data.classes and not cfg.prompt else None  # checked early
    # test images and retrieval pairs of patients stage 1 trained on: one line, or a count
    overlap = check_test(data.splits["test"] + data.pairs, cfg.ckpt, cfg.allow_overlap,
                         "evaluate.py")
    seeds = [int(seed) for seed in cfg.seeds.split(",")] if cfg.seeds else [cfg.seed]
    train = subset(data.splits["train"], cfg.data_pct, seeds[0])  # each seed's is as large
    print0(f"{cfg.data}: {len(train)} train ({cfg.data_pct:.0%}), {len(data.splits['val'])} val, "
           f"{len(data.splits['test'])} test images, {len(data.pairs)} image-caption pairs; "
           f"classes {data.classes}")
    for name, records in [("train", train), ("val", data.splits["val"]),
                          ("test", data.splits["test"])]:
        if not records and data.classes:
            die(f"the {name} split of {cfg.data} is empty: check --data-root.")
    if not data.classes and cfg.task not in ("all", "retrieval"):
        die(f"--data {cfg.data} has reports and no labels: only --task retrieval applies to it.")
    if cfg.ckpt:  # the paper's CLEFT row is LoRA's; another adapter is a row of its own
        model = load_model(cfg.ckpt)
        adapter = load_config(cfg.ckpt).peft
        row = "CLEFT" if adapter == "lora" else f"CLEFT ({adapter})"
        source = cfg.ckpt
    else:  # a baseline row: Random-ViT, ImageNet-ViT or CLIP-ViT
        model, row = load_baseline(cfg.vision_model, cfg.random_init, cfg.seed)
        weights = f", random weights (seed {cfg.seed})" if cfg.random_init else ""
        source = cfg.vision_model + weights
        cfg = replace(cfg, image_size=cfg.image_size or getattr(model.image_tower, "side", 224))
    model = model.to(device).eval().requires_grad_(False)
    tasks = TASKS if cfg.task == "all" else [cfg.task]
    if not data.classes:  # report pairs: retrieval alone
        tasks = ["retrieval"]
    if not hasattr(model, "encode_text"):  # an image tower alone: no zero-shot, no retrieval
        tasks = [task for task in tasks if task in ("linear", "finetune")]
        if not tasks:
            die(f"{row} is an image tower without a text tower: --task linear or finetune applies "
                "to it (a CLIP model has zero-shot and retrieval too).")
    results = {}
    for task in tasks:
        print0(f"{task} ...")
        if task in ("linear", "finetune"):
            run = linear_probe if task == "linear" else fine_tune
            runs = []  # each seed's test probabilities (n, C), on the same test images
            for seed in seeds:
                seed_train = subset(data.splits["train"], cfg.data_pct, seed)
                probabilities, labels = run(model, data, replace(cfg, seed=seed), device,
                                            autocast, seed_train)
                runs.append(probabilities)
            results[task] = scores(runs, labels, data.classes)
        else:
            run = zero_shot if task == "zeroshot" else retrieval
            results[task] = run(model, data, cfg, device, autocast)
        if results[task] is None and cfg.task == "retrieval":
            die(f"{cfg.data} has no paired captions, so retrieval is not defined (a csv needs a "
                "text column).")
    counts = {"train": len(train), "val": len(data.splits["val"]),
              "test": len(data.splits["test"]), "pairs": len(data.pairs)}
    report = {"dataset": cfg.data, "model": {"row": row, "source": source},
              "checkpoint": cfg.ckpt or None, "prompt": cfg.prompt or None,
              "prompts": prompts if "zeroshot" in results else None,  # those zero-shot used
              "test_images_trained_on": overlap,
              "data_pct": cfg.data_pct, "seeds": seeds, "n_images": counts, "results": results,
              "config": asdict(cfg)}
    out = results_file(cfg, row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print0(markdown_table(report) + f"\n\nwritten to {out}")

if __name__ == "__main__":
    main()
