"""
The offline demo. `python demo.py` writes a synthetic dataset in CheXpert's exact layout and tiny
random models of the paper's architectures (GPT-2 with a byte-level tokenizer, DINOv2, BERT for
the Med-CLIP preset, and CLIP for a baseline row) as ordinary save_pretrained folders, then runs
stage 1, stage 2 and the evaluation on them: the same code, and the same loading, as real data and
models. No network, no download; a few minutes on a CPU.

    python demo.py    # writes data/demo/ and data/tiny-*/ once; trains into runs/demo/

Each stage's command is printed before it runs; the README shows the stage-1 one under torchrun.
Nothing here is the method: this file imports cleft.py, never the other way round.
"""

import csv
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

import cleft
import evaluate
import prompt_tune
from cleft import CHEXPERT_COLUMNS, FINDINGS, FIVE_CLASSES

# -----------------------------------------------------------------------------
# A synthetic CheXpert: chest-X-ray-like pictures in which each finding is a visible pattern


def render_xray(findings, rng, height=160, width=128):
    """A synthetic frontal chest X-ray (uint8, height x width) showing each of `findings`."""
    v, u = np.mgrid[-1:1:height * 1j, -1:1:width * 1j]  # v down, u across, both in [-1, 1]
    inside = lambda cu, cv, ru, rv: ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 < 1
    blob = lambda cu, cv, r: np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * r * r))

    def smooth_noise(cells):
        noise = Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32))
        return np.asarray(noise.resize((width, height), Image.Resampling.BICUBIC))

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
    if "Pleural Effusion" in findings:  # fluid at the base of one or both lungs, a meniscus
        for k in ([side] if rng.random() < 0.6 else [0, 1]):
            level = dv + 0.57 * s - rng.uniform(0.2, 0.4) - 0.3 * (u - lung_centres[k]) ** 2
            image[lungs[k] & (v > level)] = rng.uniform(0.5, 0.62)
    if "Consolidation" in findings:  # a dense patch with mottled texture
        cu, cv = lung_centres[side] + rng.uniform(-0.1, 0.1), dv + rng.uniform(-0.3, 0.3)
        r = rng.uniform(0.08, 0.14)
        image += (rng.uniform(0.25, 0.4) * blob(cu, cv, r) * (0.8 + 0.4 * smooth_noise(20))
                  * lungs[side])
    if "Atelectasis" in findings:  # a thin plate-like band in a lower lung
        cu, cv, angle = lung_centres[side], dv + rng.uniform(0.1, 0.35), rng.uniform(-0.4, 0.4)
        along = (u - cu) * np.cos(angle) + (v - cv) * np.sin(angle)
        across = -(u - cu) * np.sin(angle) + (v - cv) * np.cos(angle)
        band = (np.abs(across) < 0.03) & (np.abs(along) < 0.22)
        image += rng.uniform(0.2, 0.35) * band * lungs[side]
    if "Edema" in findings:  # bilateral perihilar haze and short horizontal (Kerley B) lines
        image += rng.uniform(0.1, 0.18) * blob(du, dv, 0.45) * either_lung
        for _ in range(6):
            cv = dv + rng.uniform(0.1, 0.5)
            cu = du + rng.choice([-1, 1]) * rng.uniform(0.55, 0.65) * s
            image += 0.15 * ((np.abs(v - cv) < 0.012) & (np.abs(u - cu) < 0.08)) * either_lung
    if "Pneumothorax" in findings:  # air without vessels at the apex of one lung
        apex = lungs[side] & (v < dv - 0.35) & (np.abs(u - lung_centres[side]) > 0.05)
        image[apex] = 0.06
    if "Support Devices" in findings:  # a tube running down the middle
        image += 0.5 * ((np.abs(u - du - 0.03 - 0.05 * v) < 0.012) & (v < dv + 0.25))
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 0.035, image.shape)  # exposure, noise
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_demo_dataset(root, patients=1200, per_class=50, seed=0):
    """Write a synthetic CheXpert-layout dataset (train.csv, valid.csv, chexpert_5x200.csv and
    JPEGs) into `root`; an existing one is kept. Built in a temporary folder and renamed, so it is
    never half there."""
    root = Path(root)
    if (root / "train.csv").exists():
        return
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    print(f"writing the synthetic demo dataset to {root} (once)", flush=True)
    splits = {"train": [], "valid": []}
    for p in range(1, patients + 1):
        split = "valid" if p > patients - 20 else "train"
        sex, age = rng.choice(["Male", "Female"]), int(rng.integers(18, 90))
        for study in range(1, int(rng.integers(1, 3)) + 1):
            k = rng.choice(4, p=[0.3, 0.45, 0.2, 0.05])  # how many of the five findings it shows
            shown = list(rng.choice(FIVE_CLASSES, size=k, replace=False))
            shown += [extra for extra, prob in [("Support Devices", 0.15), ("Pneumothorax", 0.05)]
                      if rng.random() < prob]
            labels = {name: rng.choice(["", "0.0"]) for name in FINDINGS}  # blank or negative
            for name in shown:
                labels[name] = "-1.0" if rng.random() < 0.1 else "1.0"  # sometimes uncertain
            if ("Consolidation" in shown or "Edema" in shown) and rng.random() < 0.3:
                labels["Lung Opacity"] = "1.0"
            labels["No Finding"] = "" if shown else "1.0"
            for view in ["frontal"] + (["lateral"] if rng.random() < 0.3 else []):
                number = 1 if view == "frontal" else 2
                relative = f"{split}/patient{p:05d}/study{study}/view{number}_{view}.jpg"
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                pixels = render_xray(shown, rng)
                pixels = pixels if view == "frontal" else np.rot90(pixels)
                Image.fromarray(pixels).save(tmp / relative, quality=90)
                ap_pa = rng.choice(["AP", "PA"]) if view == "frontal" else ""
                splits[split].append({"Path": f"CheXpert-v1.0-small/{relative}", "Sex": sex,
                                      "Age": age, "Frontal/Lateral": view.capitalize(),
                                      "AP/PA": ap_pa, **labels})
    five_by_n = evaluate.build_5x200(splits["train"], per_class=per_class, seed=seed)
    tables = {"train.csv": splits["train"], "valid.csv": splits["valid"],
              "chexpert_5x200.csv": five_by_n}
    for name, rows in tables.items():
        with open(tmp / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CHEXPERT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)


# -----------------------------------------------------------------------------
# Tiny models: the paper's architectures, small and random, saved as save_pretrained folders

TINY = {  # folder name -> (transformers model type, config)
    "tiny-gpt2": ("gpt2", dict(vocab_size=257, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                               bos_token_id=256, eos_token_id=256)),
    "tiny-dinov2": ("dinov2", dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                                   mlp_ratio=2, image_size=112, patch_size=14)),
    "tiny-bert": ("bert", dict(vocab_size=260, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128, pad_token_id=259)),
    # the CLIP-ViT baseline row: two towers, pooled at the end-of-text token (id 256), and the
    # temperature 1/100 of a trained CLIP
    "tiny-clip": ("clip", dict(projection_dim=32, logit_scale_init_value=4.6052, text_config=dict(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, bos_token_id=256, eos_token_id=256,
        pad_token_id=256), vision_config=dict(hidden_size=96, intermediate_size=192,
                                              num_hidden_layers=3, num_attention_heads=4,
                                              image_size=112, patch_size=14))),
}


def tiny_tokenizer(model_type="gpt2"):
    """A byte-level tokenizer (256 bytes + EOS) that encodes any text and needs no download.
    bert adds BERT's [CLS] caption [SEP] framing and a [PAD] token; clip ends every text with the
    EOS, as CLIP's tokenizer does, and pads with it."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if model_type == "clip":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 256)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
    if model_type != "bert":
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    tokenizer.add_special_tokens(["[CLS]", "[SEP]", "[PAD]"])  # ids 257, 258, 259
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 257), ("[SEP]", 258)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]")


def save_tiny_models(folder):
    """FOLDER/tiny-gpt2, tiny-dinov2 and tiny-bert (with their tokenizers), random with seed 0,
    written once; each is built in a temporary folder and renamed, so it is never half there."""
    for name, (model_type, kwargs) in TINY.items():
        target = Path(folder) / name
        if target.exists():
            continue
        tmp = target.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.random.fork_rng():  # the caller's random state is left as it was
            torch.manual_seed(0)
            model = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs))
        model.save_pretrained(tmp)
        if model_type != "dinov2":
            tiny_tokenizer(model_type).save_pretrained(tmp)
        os.replace(tmp, target)


def prepare(folder, patients=1200, per_class=50):
    """FOLDER/demo (the synthetic CheXpert) and the tiny models beside it, each written once."""
    make_demo_dataset(Path(folder) / "demo", patients, per_class)
    save_tiny_models(folder)


# -----------------------------------------------------------------------------
# The three stages on the demo: the scripts' own flags, sized for a CPU

def stage1_args(folder, out_dir="runs/demo"):
    """cleft.py on the demo data and the tiny models. The byte-level tokenizer spends a token per
    character, so captions get 256; the tiny models take a larger step than BioMedLM."""
    return ["--data-root", f"{folder}/demo", "--text-model", f"{folder}/tiny-gpt2",
            "--vision-model", f"{folder}/tiny-dinov2", "--image-size", "112",
            "--max-length", "256", "--batch-size", "32", "--lr", "5e-4", "--warmup-steps", "30",
            "--max-steps", "300", "--eval-every", "100", "--log-every", "20",
            "--num-workers", "2", "--out-dir", f"{out_dir}"]


def stage2_args(folder, ckpt):
    """prompt_tune.py: L = 39, the tokens of the hand-written caption, so the context starts from
    exactly that prompt."""
    return ["--ckpt", f"{ckpt}", "--data-root", f"{folder}/demo", "--context-length", "39",
            "--lr", "0.3", "--warmup-steps", "30", "--max-steps", "300", "--eval-every", "50",
            "--log-every", "50", "--num-workers", "2"]


def evaluate_args(folder, ckpt):
    return ["--ckpt", f"{ckpt}", "--prompt", f"{ckpt}/prompt.safetensors", "--data-root",
            f"{folder}/demo", "--task", "all", "--max-steps", "300", "--eval-every", "50",
            "--num-workers", "2"]


def main(folder="data", out_dir="runs/demo"):
    prepare(folder)
    ckpt = f"{out_dir}/best"
    stages = [(cleft, stage1_args(folder, out_dir)), (prompt_tune, stage2_args(folder, ckpt)),
              (evaluate, evaluate_args(folder, ckpt))]
    for module, args in stages:
        print(f"\n$ python {Path(module.__file__).name} {shlex.join(args)}", flush=True)
        if exit_code := module.main(args):  # stage 1 stopped by Ctrl-C: the demo stops there
            raise SystemExit(exit_code)


if __name__ == "__main__":
    main()
