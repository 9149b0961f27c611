"""Use a trained CLEFT on your own images: zero-shot probabilities of each class (evaluate.py's
rule, at the evaluation view) as a table and a CSV, and on request exact maps of where each score
comes from. Inputs: image files (JPEG, PNG, DICOM), folders, or CSVs with an `image` column.

    python predict.py --ckpt runs/demo/best data/demo/valid --out preds.csv --heatmap maps
    python predict.py --ckpt RUN/best --prompt RUN/best/prompt.safetensors my_xrays/
    python predict.py --ckpt RUN/best --classes "Edema,Pneumothorax" --multi-label scans.csv
    python predict.py --ckpt RUN/best --prompts prompts.json my_xrays/   # prompt ensembles
"""

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import load_prompt
from checks import read_prompts
from cleft import (CAPTION_PREFIX, FIVE_CLASSES, arg, autocast_for, die, eval_batches, load_config,
                   load_model, make_loader, parse_config, print0, read_csv)
from progress import progress_bar
from image_io import XrayDataset, overlay_map, report_unreadable
from prompt_tune import PromptLearner, zero_shot_logits

@dataclass
class PredictConfig:
    images: list = arg((), "image files, folders of images, or CSVs with an image column")
    ckpt: str = arg("", "stage-1 checkpoint folder, e.g. runs/cleft/best (required)")
    prompt: str = arg("", "stage-2 context file: its learned prompt and its classes")
    classes: str = arg(",".join(FIVE_CLASSES), "comma-separated class names")
    prompts: str = arg("", "JSON file of class -> list of prompts (an ensemble; its classes, not "
                       "--classes)")
    multi_label: bool = arg(False, "each class against 'no <class>' on its own, not one of all")
    out: str = arg("", "CSV to write: image, prediction, one probability column per class")
    heatmap: str = arg("", "folder for each image's exact score maps (.npz) and overlay (.png)")

# --- Zero-shot: the rule evaluate.py scores, and the exact share of each image token
@torch.no_grad()
def class_features(model, texts, context=None):
    """(C, D) unit vectors: whole hand-written prompts, or with a stage-2 context (L, H) that
    context followed by each class text, as prompt_tune.py learned it."""
    if context is None:
        return model.encode_text(texts)
    device = model.logit_scale.device
    return PromptLearner(model, texts, context=context.to(device)).class_features(model)

@torch.no_grad()
def ensemble_features(model, prompts):
    """(C, D) unit vectors from each class's list of hand-written prompts: the normalised mean of
    their features, unit vectors themselves (CLIP's prompt ensembling). One prompt per class gives
    its feature as it is, from the one call class_features makes."""
    texts = [text for class_prompts in prompts for text in class_prompts]
    features = model.encode_text(texts)  # (P, D), unit length
    if len(texts) == len(prompts):
        return features
    per_class = features.split([len(class_prompts) for class_prompts in prompts])
    return torch.stack([F.normalize(f.mean(dim=0), dim=-1) for f in per_class])  # (C, D)

def zero_shot_probabilities(model, image_features, class_features):  # (B, C), fp32
    """evaluate.py's zero-shot rule: the softmax over the classes of scale * cos(image, class)."""
    return zero_shot_logits(model, image_features, class_features).softmax(dim=1)

@torch.no_grad()
def score_maps(model, images, class_features):
    """Each image token's exact term of cos(image, class c): the feature is W mean_t(h_t), so
    cos_c = sum_t (W h_t . u_c) / (T ||W mean_t(h_t)||). Returns patches (B, C, h, w), other
    (B, C): the class token's (and registers') terms, and cosine (B, C)."""
    tower = model.image_tower
    tokens = tower.tokens(images)  # (B, T, width)
    projected = model.image_projection(tokens).float()  # (B, T, D): W h_t
    norm = projected.mean(dim=1).norm(dim=-1)  # (B,): ||W mean_t(h_t)||
    terms = projected @ class_features.float().T / (tokens.shape[1] * norm[:, None, None])
    first_patch = 1 + getattr(tower.model.config, "num_register_tokens", 0)
    side = int((tokens.shape[1] - first_patch) ** 0.5)  # a square view: side x side patches
    patches = terms[:, first_patch:].transpose(1, 2).unflatten(2, (side, side))  # (B, C, h, w)
    return patches, terms[:, :first_patch].sum(dim=1), terms.sum(dim=1)

# --- Inputs and outputs
def image_paths(inputs):
    """Files as given, the images in folders (recursively, sorted), a CSV's image column."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*")
                            if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".dcm"))
        elif item.suffix.lower() == ".csv":
            rows = read_csv(item, ["image"], flag="predict.py")
            paths += [item.parent / row["image"] for row in rows]
        else:
            paths.append(item)
    return [str(p) for p in paths]

# --- Main
def main(argv=None):
    cfg = parse_config(argv, PredictConfig, __doc__)
    if not (cfg.ckpt and cfg.images):
        die("pass --ckpt, a cleft.py checkpoint folder, and one or more images, folders or CSVs.")
    if cfg.prompt and not Path(cfg.prompt).is_file():
        die(f"no prompt file at {cfg.prompt}: run prompt_tune.py first, or drop --prompt.")
    if cfg.prompts and (cfg.prompt or cfg.multi_label):  # a learned context; 'no <class>' pairs
        die("--prompts replaces the hand-written prompts; --prompt and --multi-label bring their "
            "own: pass one of them.")
    if missing := [item for item in cfg.images if not Path(item).exists()]:
        die(f"{missing[0]} does not exist: pass existing image files, folders or CSVs.")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # every rank would repeat all of it
        die("predict.py runs in one process, on one GPU: start it with python, not torchrun.")
    classes = [c.strip() for c in cfg.classes.split(",")]
    context = None
    if cfg.prompt:  # its learned context, and the classes it was learned for
        context, classes = load_prompt(cfg.prompt)
    prefix = "" if cfg.prompt else CAPTION_PREFIX  # a learned context replaces the caption
    prompts = {c: [prefix + c.lower()] for c in classes}  # a prompt per class
    if cfg.prompts:  # the file's classes, each with its list of prompts
        prompts = read_prompts(cfg.prompts)
        classes = list(prompts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, autocast = autocast_for("auto", device)  # bf16 on a GPU
    model = load_model(cfg.ckpt).to(device).eval().requires_grad_(False)
    with autocast:  # (C, D) each
        if context is None:  # hand-written: one prompt per class, or an ensemble
            positive = ensemble_features(model, list(prompts.values()))
        else:
            positive = class_features(model, [c.lower() for c in classes], context)
        negatives = [prefix + "no " + c.lower() for c in classes]  # --multi-label's
        negative = class_features(model, negatives, context) if cfg.multi_label else None

    paths = image_paths(cfg.images)
    if not paths:
        die(f"no images in {cfg.images}: pass .jpg, .png or .dcm files, folders, or CSVs.")
    stage1 = load_config(cfg.ckpt)  # its input size, square and --image-cache
    dataset = XrayDataset.as_trained([(p, i) for i, p in enumerate(paths)], stage1)
    loader = make_loader(dataset, eval_batches(len(paths), 32), -1, device)
    rows_by_index = {}  # image index -> image, prediction, the probability of each class
    unreadable = []  # 'path (error)' of the files that cannot be read
    for images, indices, skipped in progress_bar(loader, "images"):
        unreadable += skipped  # an unreadable file's item holds the next image: it is left out
        images = images.to(device)
        with autocast:
            image_features = model.encode_image(images)  # (B, D)
            maps = score_maps(model, images, positive) if cfg.heatmap else None
        if cfg.multi_label:  # per class, a two-way softmax of [class, no class]
            logits = torch.stack([zero_shot_logits(model, image_features, features)
                                  for features in (positive, negative)])  # (2, B, C)
            probabilities = logits.softmax(dim=0)[0].cpu()  # (B, C)
        else:
            probabilities = zero_shot_probabilities(model, image_features, positive).cpu()
        for k, index in enumerate(indices.tolist()):
            if index in rows_by_index:  # the loader's padding, or a stand-in for an unreadable file
                continue
            values = probabilities[k].tolist()
            if cfg.multi_label:  # every class above one half
                prediction = ";".join(c for c, p in zip(classes, values) if p > 0.5)
            else:
                prediction = classes[int(np.argmax(values))]
            rows_by_index[index] = {"image": paths[index], "prediction": prediction,
                                    **dict(zip(classes, values))}  # all digits: no ties
            if maps:  # FILE.npz: patches (C, h, w), other (C,), cosine (C,); FILE.png: a view
                file = Path(cfg.heatmap) / f"{index:05d}_{Path(paths[index]).stem}"
                file.parent.mkdir(parents=True, exist_ok=True)
                patches, other, cosine = (part[k].cpu().numpy() for part in maps)
                np.savez(file.with_suffix(".npz"), patches=patches, other=other, cosine=cosine,
                         classes=np.array(classes))
                shown = int(probabilities[k].argmax())  # the predicted class's map
                overlay_map(images[k, 0].float().cpu().numpy(), patches[shown]).save(
                    file.with_suffix(".png"))
    report_unreadable(unreadable)
    rows = [rows_by_index[index] for index in sorted(rows_by_index)]
    print0(" | ".join(["image", "prediction", *classes]))
    for row in rows:  # on screen, 4 decimals
        print0(" | ".join(f"{v:.4f}" if isinstance(v, float) else v for v in row.values()))
    if cfg.out:
        with open(cfg.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "prediction", *classes])
            writer.writeheader()
            writer.writerows(rows)
    print0(f"{len(rows)} of {len(paths)} images predicted; the CSV: {cfg.out or 'not asked for'}")

if __name__ == "__main__":
    main()
