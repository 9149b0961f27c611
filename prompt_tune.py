"""CLEFT stage 2 (paper section 2.2): with both encoders frozen, the hand-written caption "this is
a chest x ray of a patient with" becomes L learnable token embeddings shared by all classes, trained
with the zero-shot cross-entropy on image features computed once. Saved to CKPT/prompt.safetensors.

    python prompt_tune.py --ckpt runs/cleft/best --data-root /data/chexpert   # the 5x200 classes
    torchrun --nproc_per_node=2 prompt_tune.py --ckpt runs/cleft/best --data-root /data/chexpert
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import exit_code, save_prompt, start_metrics
from cleft import (CAPTION_PREFIX, FINDINGS, FIVE_CLASSES, EncoderTextTower, arg, autocast_for,
                   changed_fields, check_schedule, chexpert_rows, die, embed, eval_batches,
                   five_class_index, get_lr, load_config, load_model, log, make_loader,
                   parse_config, print0, read_csv, setup_distributed, split_by_patient)
from held_out import check_test, stage_1_split
from progress import progress_bar
from image_io import XrayDataset
from metrics import paired_gain

# --- Config
@dataclass
class PromptConfig:
    ckpt: str = arg("", "stage-1 checkpoint folder, e.g. runs/cleft/best (required)")
    data: str = arg("chexpert", "dataset", ["chexpert", "csv"])
    data_root: str = arg("", "CheXpert folder, or a CSV of image,label[,split] (--data csv)")
    classes: str = arg("", "comma-separated class names (default: the 5x200 classes; csv: its own)")
    init: str = arg("", "the caption the context starts from (default: the chest X-ray caption)")
    context_length: int = arg(30, "learnable context tokens L (paper: 30)")
    batch_size: int = arg(36, "images per step (paper: 36)")
    lr: float = arg(1e-3, "SGD learning rate, momentum 0.9 (paper: 1e-3)")
    warmup_steps: int = arg(1000, "linear warm-up steps (paper: 1000)")
    max_steps: int = arg(4000, "optimizer steps (paper: 4000)")
    eval_every: int = arg(500, "held-out zero-shot accuracy every N steps (and at the end)")
    log_every: int = arg(50, "one log line every N steps")
    dtype: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", ["auto", "bf16", "fp32"])
    seed: int = arg(42, "seed for the random context tokens and the batches")
    num_workers: int = arg(-1, "loader processes per rank, for the image features (-1: auto)")
    val_fraction: float = arg(0.05, "share of patients held out if CKPT has no record of stage 1's")
    allow_overlap: bool = arg(False, "go on if test images are of patients stage 1 trained on")
    out: str = arg("", "output file (default: CKPT/prompt.safetensors); a .jsonl log beside it")

FEATURE_BATCH = 32  # images a rank embeds at once

# --- Data: images positive for exactly one of the classes
def labelled(rows, classes):  # (image, class index) of the rows 1.0 for exactly one of `classes`
    positives = [[i for i, name in enumerate(classes) if r[name] in ("1", "1.0")] for r in rows]
    return [(r["image"], found[0]) for r, found in zip(rows, positives) if len(found) == 1]

def labelled_splits(cfg, classes):
    """{'train', 'val', 'test'}: (image, class index). val: the patients stage 1 held out, as its
    checkpoint records them (held_out.py); without a record, --val-fraction of the patients."""
    if cfg.data == "csv":  # rows with a blank label are left out; a split column is kept
        rows = read_csv(cfg.data_root, ["image", "label"])  # one row at least
        has_split = "split" in rows[0]  # else --val-fraction of the images held out
        rows = [r for r in rows if r["label"]]
        if unknown := sorted({r["label"] for r in rows} - set(classes)):
            die(f"{cfg.data_root} has labels {unknown[:5]} that --classes lacks: list every class.")
        if not has_split:
            _, held_out = split_by_patient(rows, cfg.val_fraction, key=lambda r: r["image"])
            for row in held_out:
                row["split"] = "val"
        pairs = lambda name: [(str(Path(cfg.data_root).parent / r["image"]),
                               classes.index(r["label"])) for r in rows
                              if r.get("split", "train") == name]
        return stage_1_split({"train": pairs("train"), "val": pairs("val"), "test": []}, cfg.ckpt)
    if missing := [name for name in classes if name not in FINDINGS]:
        die(f"--classes {missing} are not CheXpert label columns: use names in train.csv's header.")
    splits = chexpert_rows(cfg.data_root, cfg.val_fraction)
    test = [(r["image"], classes.index(FIVE_CLASSES[five_class_index(r)])) for r in splits["test"]
            if set(classes) == set(FIVE_CLASSES)]  # the 5x200 test set, its classes in any order
    return stage_1_split({"train": labelled(splits["train"], classes),
                          "val": labelled(splits["val"], classes), "test": test}, cfg.ckpt)

# --- The prompt learner (paper section 2.2, in the style of CoOp)
class PromptLearner(nn.Module):
    """The prompt of class c is [context (L) | tokens of the class name | EOS], fed to the frozen
    text tower as inputs_embeds and pooled at that EOS like stage 1. Only the context learns."""

    def __init__(self, model, classes, context_length=30, init=CAPTION_PREFIX.strip(),
                 context=None):
        super().__init__()
        tower = model.text_tower
        if isinstance(tower, EncoderTextTower):
            die("prompt context learning needs a causal text tower read at its EOS (CLEFT's); this "
                "checkpoint's is an encoder read at [CLS]: use the hand-written prompts instead.")
        embedding = tower.model.get_input_embeddings()
        device = embedding.weight.device
        tokenize = lambda text: tower.tokenizer(text, add_special_tokens=False)["input_ids"]
        if context is None:  # from the hand-written caption; a longer one keeps its last L tokens
            ids = tokenize(init)
            if len(ids) > context_length:  # --context-length len(ids) keeps it all
                print0(f"note: the context keeps the last {context_length} of {len(ids)} tokens")
            ids = ids[-context_length:]
            with torch.no_grad():  # uniform, with the spread of the real embeddings
                bound = embedding.weight.std().item() * 3 ** 0.5
                context = torch.empty(context_length, embedding.weight.shape[1], device=device)
                context.uniform_(-bound, bound)
                # the caption in the last slots, right before the class name, as when written out
                context[context_length - len(ids):] = embedding(torch.tensor(ids).to(device))
        self.context = nn.Parameter(context.float().to(device))  # (L, H)
        eos_id = tower.tokenizer.eos_token_id
        # " edema": tokenized as it follows "with" in the caption
        class_ids = [tokenize(" " + name.lower()) + [eos_id] for name in classes]
        longest = max(map(len, class_ids))
        L = len(self.context)
        padded = [ids + [eos_id] * (longest - len(ids)) for ids in class_ids]
        with torch.no_grad():
            class_embeddings = embedding(torch.tensor(padded, device=device))
        self.register_buffer("class_embeddings", class_embeddings, persistent=False)  # (C, T, H)
        mask = [[1] * (L + len(ids)) + [0] * (longest - len(ids)) for ids in class_ids]  # (C, L+T)
        eos = [L + len(ids) - 1 for ids in class_ids]  # (C,)
        for name, value in [("attention_mask", mask), ("eos_positions", eos)]:
            self.register_buffer(name, torch.tensor(value, device=device), persistent=False)

    def inputs_embeds(self):  # (C, L + T, H)
        context = self.context.unsqueeze(0).expand(len(self.class_embeddings), -1, -1)  # (C, L, H)
        return torch.cat([context, self.class_embeddings], dim=1)  # (C, L + T, H)

    def class_features(self, model):  # (C, D) unit vectors, fp32
        inputs = dict(inputs_embeds=self.inputs_embeds(), attention_mask=self.attention_mask)
        pooled = model.text_tower.pool_at_eos(self.eos_positions, **inputs)  # (C, width)
        return F.normalize(model.text_projection(pooled).float(), dim=-1)

def zero_shot_logits(model, image_features, class_features):  # stage 1's logits, (B, C), fp32
    return model.logit_scale.float().exp() * image_features.float() @ class_features.float().T

# --- Main
def main(argv=None):
    cfg = parse_config(argv, PromptConfig, __doc__)
    if not (cfg.ckpt and cfg.data_root):
        die("--ckpt and --data-root are required: the best/ (or last/) folder of a cleft.py run, "
            "and the data it was trained on (see README).")
    rank, world_size, device = setup_distributed()
    dtype, autocast = autocast_for(cfg.dtype, device)
    classes = [name.strip() for name in cfg.classes.split(",")] if cfg.classes else FIVE_CLASSES
    if cfg.data == "csv" and not cfg.classes:  # the CSV's own labels
        classes = sorted({r["label"] for r in read_csv(cfg.data_root, ["label"])} - {""})
    out = Path(cfg.out or Path(cfg.ckpt) / "prompt.safetensors")
    print0(f"config, where it differs from the defaults: {json.dumps(changed_fields(cfg))}\n"
           f"world size {world_size} on {device}, {dtype}")
    check_schedule(cfg.warmup_steps, cfg.max_steps)
    splits = labelled_splits(cfg, classes)
    check_test(splits["test"], cfg.ckpt, cfg.allow_overlap, "prompt_tune.py")  # a leak: one line
    if not (splits["train"] and splits["val"]):
        die(f"no train or no val image is positive for exactly one of {classes}: check "
            "--data-root and --classes.")
    print0("data: " + ", ".join(f"{len(v)} {k}" for k, v in splits.items()) + f"; {classes}")
    if (n_val := len(splits["val"])) < 100:  # the standard error of a 50% accuracy: 50 / sqrt(n)
        print0(f"note: {n_val} held-out images: accuracy +-{50 / n_val**0.5:.0f} points")

    # both encoders frozen: every rank embeds its share of the images once, then all hold all
    model = load_model(cfg.ckpt).to(device).eval().requires_grad_(False)
    stage1 = load_config(cfg.ckpt)  # its input size, square and --image-cache
    features = {}  # split -> (image features (n, D), labels (n,))
    for name, records in splits.items():
        if records:
            dataset = XrayDataset.as_trained(records, stage1)
            batches = eval_batches(len(records), FEATURE_BATCH * world_size)
            loader = make_loader(dataset, batches, cfg.num_workers, device)
            features[name] = embed(model, loader, len(records), autocast, progress=True)

    torch.manual_seed(cfg.seed)  # the random context tokens: the same on every rank
    init = cfg.init or CAPTION_PREFIX.strip()
    learner = PromptLearner(model, classes, cfg.context_length, init)
    optimizer = torch.optim.SGD([learner.context], lr=cfg.lr, momentum=0.9)
    with torch.no_grad(), autocast:
        handwritten = model.encode_text([f"{init} {name.lower()}" for name in classes])  # (C, D)

    def zero_shot(split, class_features):  # (n,) right or not, and the class-balanced loss
        image_features, labels = features[split]
        logits = zero_shot_logits(model, image_features, class_features)
        weight = 1 / torch.bincount(labels, minlength=len(classes)).clamp(min=1).float()
        loss = F.cross_entropy(logits, labels, weight=weight).item()
        return (logits.argmax(dim=1) == labels).cpu().numpy(), loss

    log_file = start_metrics(out.with_suffix(".jsonl")) if rank == 0 else None  # beside `out`
    progress = progress_bar(total=cfg.max_steps, desc="prompt")  # rank 0's
    batches = torch.Generator().manual_seed(cfg.seed)  # the same batches on every rank
    train_features, train_labels = features["train"]
    # class-balanced batches (the paper: the classes are learned "evenly"): 1 / class size each
    weights = (1 / torch.bincount(train_labels)[train_labels].float()).cpu()
    best_loss, best_step, best_context = float("inf"), 0, None  # the held-out loss decides
    losses = []  # since the last log line, on the device: read at log steps only
    for step in range(cfg.max_steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            with torch.no_grad(), autocast:
                learned = learner.class_features(model)
            right_hand, _ = zero_shot("val", handwritten)
            right_learned, val_loss = zero_shot("val", learned)
            record = {"step": step, "val_acc_hand_written": 100 * right_hand.mean(),
                      "val_acc_learned": 100 * right_learned.mean(), "val_loss": val_loss}
            log(log_file, record, "step {step} | held-out zero-shot acc: hand-written "
                "{val_acc_hand_written:.1f} | learned {val_acc_learned:.1f} | held-out loss "
                "{val_loss:.4f}".format(**record))
            if best_context is None or val_loss < best_loss:  # smoother than accuracy
                best_loss = val_loss
                best_step = step
                best_context = learner.context.detach().clone()
        if step == cfg.max_steps:
            break

        # every rank takes the same batch and gradient; the average keeps the contexts identical
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
        optimizer.param_groups[0]["lr"] = lr  # one group: the context
        index = torch.multinomial(weights, cfg.batch_size, True, generator=batches).to(device)
        with autocast:
            class_features = learner.class_features(model)  # (C, D)
        logits = zero_shot_logits(model, train_features[index], class_features)  # (B, C)
        loss = F.cross_entropy(logits, train_labels[index])
        loss.backward()
        if world_size > 1:
            dist.all_reduce(learner.context.grad, op=dist.ReduceOp.AVG)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        progress.update(1)
        if (step + 1) % cfg.log_every == 0:
            mean_loss = sum(losses).item() / len(losses)
            log(log_file, {"step": step + 1, "loss": mean_loss, "lr": lr},
                f"step {step + 1}/{cfg.max_steps} | loss {mean_loss:.4f} | lr {lr:.2e}")
            losses = []
    progress.close()
    with torch.no_grad():
        learner.context.copy_(best_context)
    if "test" in features:  # reported once, for the chosen context: never used to choose it
        with torch.no_grad(), autocast:
            chosen = learner.class_features(model)
        right_hand, _ = zero_shot("test", handwritten)
        right_learned, _ = zero_shot("test", chosen)
        record = {"test_acc_hand_written": 100 * right_hand.mean(),
                  "test_acc_learned": 100 * right_learned.mean(),
                  **paired_gain("test_acc_gain", right_learned, right_hand)}
        log(log_file, record, "5x200 zero-shot acc: hand-written {test_acc_hand_written:.1f} | "
            "learned {test_acc_learned:.1f} | gain {test_acc_gain:+.1f} (paired 95% CI "
            "{test_acc_gain_ci95[0]:+.1f} to {test_acc_gain_ci95[1]:+.1f})".format(**record))
    if rank == 0:
        save_prompt(out, learner.context, classes, cfg)
    print0(f"done: best held-out loss {best_loss:.4f} at step {best_step}; context saved to {out}")

if __name__ == "__main__":
    sys.exit(exit_code(main))
