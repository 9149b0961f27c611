"""
Benchmark CLEFT on this machine (CPU, or CUDA when present) and print one table per part:
  1. input pipeline: our loader (JPEG draft decoding) against "open, full decode, resize", on
     CheXpert-like grayscale JPEGs at full resolution (~2500 x 3000) and at the small release's
     size (~320 x 390);
  2. stage-1 step: ms/step, images/s, peak memory and MFU for the tiny and a mid-size config (and
     the paper's shapes with random weights on a GPU), with and without gradient checkpointing, and
     against the public code's text handling (every caption padded to 64 tokens, duplicates encoded
     again);
  3. stage-2 step with cached image features against recomputing them;
  4. evaluation: zero-shot images/s on 1,000 images, and the time of the bootstrap intervals;
  5. the paper's shapes on a GPU (random weights);
  6. reports: reading a full-size synthetic MIMIC-CXR (227,835 report files at the release's
     folder depth, its two tables) into the splits, seconds and resident memory, in a fresh
     process; and training steps on report captions against a pairs CSV of the same images;
  7. checkpoint integrity: a save of the paper's trained size with and without its manifest
     (sizes and SHA-256 of every file), and the check at load.
Run as a script (pytest does not collect it):  python tests/benchmark.py [--steps 5]
"""

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cleft  # noqa: E402
import demo  # noqa: E402
import dry_run  # noqa: E402
import evaluate  # noqa: E402
import prompt_tune  # noqa: E402
from image_io import XrayDataset, load_image  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def timed(fn, repeats, warmup=1):
    """Seconds per call of fn: the median of `repeats` calls after warm-up calls (a shared machine's
    hiccups move a mean, not a median)."""

    def once():
        start = time.perf_counter()
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return float(np.median([once() for _ in range(repeats)]))


# the Tensor methods by which the host reads a tensor's value: on a GPU each one waits for it
HOST_READS = ["__bool__", "item", "tolist", "nonzero", "__int__", "__float__", "__index__"]


@contextmanager
def host_syncs():
    """A Counter of (method, caller 'file:line') for every read of a tensor's value by the host
    while active. A CPU has no host/device split, so everything is counted there except the
    optimizer's step counters, which are host tensors (fused AdamW keeps them on a GPU, unread)."""
    counts, originals = Counter(), {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        def read(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if "/torch/optim/" not in caller.filename:
                counts[name, f"{Path(caller.filename).name}:{caller.lineno}"] += 1
            return originals[name](tensor, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def table(title, header, rows):
    print(f"\n### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ---------------------------------------------------------------------------- 1. input pipeline


def xray_jpeg(path, height, width, seed):
    """A CheXpert-like grayscale JPEG: the demo's synthetic X-ray, upscaled, with fine noise."""
    small = demo.render_xray(["Edema"], np.random.default_rng(seed))
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, np.float32) + np.random.default_rng(seed).normal(
        0, 6, (height, width)
    )
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def baseline_load(path, size):
    """What a loader without draft decoding does: decode every pixel, then resize and normalise."""
    with Image.open(path) as image:
        image = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    gray = torch.from_numpy(np.asarray(image, np.float32) / 255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet's, as DINOv2
    return (gray.expand(3, size, size) - mean) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def loader_rate(dataset, batch, batches, workers):
    """Images/s of the training loader as cleft.py builds it (worker processes, seeded training
    views)."""
    batches_ = cleft.TrainBatches(len(dataset), batch, 0)
    loader = iter(cleft.make_loader(dataset, batches_, workers, DEVICE, persistent=True))
    for _ in range(2 * workers):  # the workers start, and the batches they prefetched are used up
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batch * batches / (time.perf_counter() - start)


def input_pipeline(folder, n, workers, batch=36, batches=6):
    rows, loader_rows = [], []
    for name, (height, width) in [("full resolution", (3000, 2500)), ("small release", (390, 320))]:
        paths = [folder / f"{name[:4]}{i}.jpg" for i in range(n)]
        for i, path in enumerate(paths):
            xray_jpeg(path, height, width, i)
        cache = folder / f"cache-{name[:4]}"
        eval_view = lambda **kw: [load_image(p, 224, **kw) for p in paths]
        training_view = lambda **kw: [
            load_image(p, 224, np.random.default_rng(i), **kw) for i, p in enumerate(paths)
        ]
        base = n / timed(lambda: [baseline_load(p, 224) for p in paths], 3)
        first = n / timed(eval_view, 3)
        eval_view(cache=cache)  # the first epoch fills the cache
        cached = n / timed(lambda: eval_view(cache=cache), 5)
        cached_training = n / timed(lambda: training_view(cache=cache), 5)
        rows.append(
            [
                f"{name} ({width} x {height})",
                f"{base:.1f}",
                f"{first:.1f}",
                f"{cached:.1f}",
                f"{cached_training:.1f}",
                f"{first / base:.1f}x",
                f"{cached / base:.1f}x",
            ]
        )
        records = [(str(p), "") for p in paths] * -(-batch // n)
        for label, folder_ in (("decode every time", ""), ("cached", cache)):
            dataset = XrayDataset(records, 224, cache=folder_)
            loader_rows.append(
                [f"{name}, {label}", f"{loader_rate(dataset, batch, batches, workers):.0f}"]
            )
    table(
        "1. Input pipeline, one process (images/s)",
        [
            "JPEG",
            "open, full decode, resize",
            "ours, first read",
            "ours, cached",
            "ours, cached, training view",
            "ratio, first read",
            "ratio, cached",
        ],
        rows,
    )
    table(
        f"1b. Training loader, {workers} worker processes, batch {batch}, training views",
        ["JPEG", "images/s"],
        loader_rows,
    )


# ---------------------------------------------------------------------------- 2. stage-1 step

CAPTION_NAMES = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion",
                 "no finding"]


def batch_captions(batch):
    """Label captions as CheXpert's give them: six findings in turn, every 7th with a second."""
    second = lambda i: ", support devices" if i % 7 == 0 else ""
    return [cleft.CAPTION_PREFIX + CAPTION_NAMES[i % 6] + second(i) for i in range(batch)]


# (model type, config) of each benchmark size's towers, random and offline: 'tiny' is the demo's
# pair; 'mid' a larger GPT-2 and DINOv2 with the same byte-level tokenizer
SIZES = {
    "tiny": {"text": demo.TINY["tiny-gpt2"], "vision": demo.TINY["tiny-dinov2"]},
    "mid": {
        "text": ("gpt2", dict(vocab_size=257, n_positions=512, n_embd=512, n_layer=8, n_head=8,
                              bos_token_id=256, eos_token_id=256)),
        "vision": ("dinov2", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                                  image_size=224, patch_size=14)),
    },
}


DEMO_CONFIG = cleft.parse_config(demo.stage1_args("data"))  # the demo's sizes (captions: 256)


def random_model(model_type, config):
    return AutoModel.from_config(AutoConfig.for_model(model_type, **config))


# nominal dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets
NOMINAL_BF16 = {"H100 SXM": 989, "H100 PCIe": 756, "H100 NVL": 835, "H200": 989, "A100": 312,
                "L40S": 362, "A6000": 155, "A5000": 111, "A10G": 70, "L4": 121}


def nominal_flops():
    """The data-sheet bf16 peak of this GPU (matched by name), or None for an unknown card."""
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else ""
    for card, tflops in sorted(NOMINAL_BF16.items(), key=lambda item: -len(item[0])):
        if all(word in name for word in card.split()):
            return tflops * 1e12
    return 989e12 if "H100" in name else None  # an H100 of another form: the SXM figure


def matmul_flops():
    """Peak FLOP/s to measure MFU against, measured: on a GPU the best rate of a large bf16 matmul,
    else this CPU's best fp32 matmul rate (a peak: the fastest of many runs, so a busy moment does
    not lower it)."""
    n, dtype = (8192, torch.bfloat16) if DEVICE.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    return 2 * n**3 / min(timed(lambda: a @ b, 1, warmup=1) for _ in range(20 if n > 1024 else 50))


def model_flops(model, images, captions, max_length):
    """Model FLOPs of one stage-1 step (no recompute): 6 x params x tokens for the trained image
    tower, 4 x params x tokens for the frozen LM (forward, and backward to its activations only).
    Attention scores are left out (a few % at these lengths)."""
    vit = sum(p.numel() for p in model.image_tower.parameters())
    lm = sum(
        p.numel()
        for n, p in model.text_tower.named_parameters()
        if "wte" not in n and "wpe" not in n
    )
    patches = (images.shape[-1] // model.image_tower.model.config.patch_size) ** 2 + 1
    unique = list(dict.fromkeys(captions))
    tokens = sum(
        min(
            len(model.text_tower.tokenizer(c, add_special_tokens=False)["input_ids"]) + 1,
            max_length,
        )
        for c in unique
    )
    return 6 * vit * patches * len(captions) + 4 * lm * tokens


def naive_text(tower, captions, length=64):
    """The public code's text handling: every caption (duplicates too) padded to 64 tokens."""
    eos_id = tower.tokenizer.eos_token_id
    ids = [
        tower.tokenizer(c, add_special_tokens=False)["input_ids"][: length - 1] + [eos_id]
        for c in captions
    ]
    input_ids = torch.tensor([x + [eos_id] * (length - len(x)) for x in ids], device=DEVICE)
    mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids], device=DEVICE)
    return tower.pool_at_eos(
        torch.tensor([len(x) - 1 for x in ids], device=DEVICE),
        input_ids=input_ids,
        attention_mask=mask,
    )


def peak_memory_mb(fn):
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() / 2**20
    fn()
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # the process's high-water mark so far


def caption_tokenizer(vocab_size=600):
    """A BPE tokenizer trained offline on CheXpert captions (one to three findings): a caption is
    10 to 25 tokens, as with BioMedLM's BPE, where the byte-level tiny tokenizer makes 60 to 75."""
    from itertools import combinations

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    findings = [name.lower() for name in cleft.FINDINGS]
    corpus = [cleft.CAPTION_PREFIX + ", ".join(chosen) for k in (1, 2, 3)
              for chosen in combinations(findings, k)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=alphabet)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def text_handling(steps, batch):
    """The text tower alone (forward and backward, LoRA, no checkpointing): ours (each distinct
    caption once, padded to the longest) against the public code's (all padded to 64), with the
    byte-level tokens and with realistic BPE lengths."""
    captions = batch_captions(batch)
    bpe, rows = caption_tokenizer(), []
    for label in ("tiny", "mid"):
        model_type, config = SIZES[label]["text"]
        lm = random_model(model_type, {**config, "vocab_size": 1024})  # room for the BPE's ids
        tower = cleft.TextTower(lm, demo.tiny_tokenizer(), cleft.adapter_config("lora"),
                                checkpointing=False)
        tower = tower.to(DEVICE).train()
        for tokens, tokenizer in (("byte-level", tower.tokenizer), ("BPE", bpe)):
            tower.tokenizer = tokenizer
            length = sum(len(tokenizer(c)["input_ids"]) + 1 for c in captions) / batch
            ours = timed(lambda: tower(captions).sum().backward(), 4 * steps)
            public = timed(lambda: naive_text(tower, captions).sum().backward(), 4 * steps)
            rows.append([label, tokens, f"{length:.0f}", f"{1000 * ours:.1f}",
                         f"{1000 * public:.1f}", f"{public / ours:.2f}x"])
    table(f"2b. Text tower, batch {batch}: text handling (ms per forward and backward)",
          ["LM", "tokens", "tokens a caption", "ours", "public code", "ratio"], rows)


def build(label, cfg, bf16=False):
    """A CLEFT of one benchmark size with random weights, through cleft.build_model, on the device;
    with bf16 its frozen matmul weights converted. 'paper': BioMedLM + DINOv2 ViT-B/14 shapes
    (dry_run.py's stored architectures), built on the GPU (random initialisation of 2.7B weights
    on the CPU takes minutes), with the BPE caption tokenizer (BioMedLM-like caption lengths)."""
    if label == "paper":
        cfg = replace(cfg, text_model="stanford-crfm/BioMedLM", vision_model="facebook/dinov2-base")
        load = lambda name, kind: (AutoModel.from_config(dry_run.architecture(name)),
                                   caption_tokenizer() if kind == "text" else None)
    else:
        load = lambda name, kind: (random_model(*SIZES[label][kind]),
                                   demo.tiny_tokenizer() if kind == "text" else None)
    with torch.device(DEVICE if label == "paper" else "cpu"):
        model = cleft.build_model(cfg, load=load)
    return (cleft.frozen_to_bf16(model) if bf16 else model).to(DEVICE)


def stage1(steps, batch):
    configs = [("tiny", 112), ("mid", 224)]  # the paper's shapes: part 5, on a GPU
    peak = matmul_flops()
    _, autocast = cleft.autocast_for("auto", DEVICE)
    captions = batch_captions(batch)
    rows = []
    variants = [(checkpointing, text_handling, False) for checkpointing in (True, False)
                for text_handling in ("ours", "public code")] + [(True, "ours", True)]
    for label, size in configs:
        for checkpointing, text_handling, freeze_lm in variants:  # freeze_lm: no adapter at all
            cfg = replace(DEMO_CONFIG, image_size=size, grad_checkpointing=checkpointing,
                          freeze_lm=freeze_lm, peft="none" if freeze_lm else "lora")
            model = build(label, cfg).train()
            if text_handling == "public code":
                model.text_tower.forward = lambda c, tower=model.text_tower: naive_text(
                    tower, c
                )
            optimizer = cleft.make_optimizer(
                model, cfg.lr, cfg.weight_decay, DEVICE.type == "cuda"
            )
            images = torch.rand(
                batch, 1, size, size, device=DEVICE
            )  # as the loader hands them over

            def step():
                cleft.train_step(model, images, captions, autocast)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds = timed(
                step, steps * (4 if label == "tiny" else 1)
            )  # tiny steps are short: more of them
            memory = peak_memory_mb(step)
            with host_syncs() as syncs:
                step()
            mfu = model_flops(model, images, captions, cfg.max_length) / seconds / peak
            rows.append(
                [
                    label,
                    "frozen LM" if freeze_lm else "LoRA",
                    "on" if checkpointing else "off",
                    text_handling,
                    f"{1000 * seconds:.0f}",
                    f"{batch / seconds:.1f}",
                    f"{memory:.0f}",
                    f"{100 * mfu:.1f}%",
                    str(sum(syncs.values())),
                ]
            )
            del model, optimizer, step  # one model at a time
            gc.collect()
    memory = "peak GPU MiB" if DEVICE.type == "cuda" else "process peak RSS MiB"
    table(
        f"2. Stage-1 step, batch {batch} (peak for MFU: {peak / 1e9:.0f} GFLOP/s)",
        ["config", "text tower", "checkpointing", "text handling", "ms/step", "images/s", memory,
         "MFU", "host syncs"],
        rows,
    )


# ------------------------------------------------------------------- 5. the paper's shapes, GPU

# (global batch, frozen LM weights in bf16, LM recomputed in backward (with checkpointing, not
# prefix), --peft, checkpointing of both towers, memory cap in GiB or None): the default first,
# then one change at a time
PAPER_ROWS = [(36, True, True, "lora", True, None), (36, False, True, "lora", True, None),
              (36, True, False, "lora", True, None), (72, True, True, "lora", True, None),
              (72, True, False, "lora", True, None), (36, True, True, "lora", True, 22),
              (72, True, True, "lora", True, 22), (36, True, True, "prefix", True, 22),
              (36, True, True, "lora", False, 22)]


def paper_shapes(steps, label="paper"):
    """Stage-1 steps of BioMedLM + DINOv2 ViT-B/14 shapes (random weights, BPE captions of
    BioMedLM-like length) under bf16 autocast: one model at a time, out-of-memory caught per row,
    max allocated and reserved memory, MFU against the measured and the nominal bf16 peak. Rows
    with a cap run under torch.cuda.set_per_process_memory_fraction, to tell a 24 GB card's user
    what fits. On a CPU, `label` 'tiny' runs the same code on the tiny shapes (a check of the
    code, not a measurement)."""
    cuda = DEVICE.type == "cuda"
    measured, nominal = matmul_flops(), nominal_flops()
    _, autocast = cleft.autocast_for("bf16", DEVICE)  # on a CPU too: the same code path
    total = torch.cuda.get_device_properties(DEVICE).total_memory if cuda else 0
    rows = []
    for batch, bf16, lm_recompute, peft, checkpointing, cap in PAPER_ROWS:
        if cuda:  # the cap of this row (1.0: the whole card), and nothing left from the last one
            fraction = min(1.0, cap * 2**30 / total) if cap else 1.0
            torch.cuda.set_per_process_memory_fraction(fraction)
            torch.cuda.empty_cache()
        captions = batch_captions(batch)
        lm_recompute = lm_recompute and checkpointing and peft != "prefix"  # peft: not both
        setting = [str(batch), "bf16" if bf16 else "fp32", "on" if lm_recompute else "off", peft,
                   "on" if checkpointing else "off", f"{cap} GiB" if cap and cuda else "-"]
        model = optimizer = None
        try:
            cfg = replace(cleft.parse_config([]), peft=peft, grad_checkpointing=checkpointing,
                          image_size=224 if cuda else 112)
            model = build(label, cfg, bf16).train()
            if checkpointing and peft != "prefix" and not lm_recompute:
                model.text_tower.model.get_base_model().activation_checkpointing_disable()
            optimizer = cleft.make_optimizer(model, cfg.lr, cfg.weight_decay, fused=cuda)
            images = torch.rand(batch, 1, cfg.image_size, cfg.image_size, device=DEVICE)

            def step():
                cleft.train_step(model, images, captions, autocast)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if cuda:  # the peak of the training steps, not of the build or the conversion
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(step, steps)
            with host_syncs() as syncs:
                step()
            flops = model_flops(model, images, captions, cfg.max_length) / seconds
            if cuda:
                memory = [f"{torch.cuda.max_memory_allocated() / 2**30:.1f}",
                          f"{torch.cuda.max_memory_reserved() / 2**30:.1f}"]
            else:
                memory = [f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}", "-"]
            mfu = [f"{100 * flops / peak:.1f}%" if peak else "-" for peak in (measured, nominal)]
            speed = [f"{1000 * seconds:.0f}", f"{batch / seconds:.1f}"]
            rows.append(setting + speed + memory + mfu + [str(sum(syncs.values()))])
        except torch.OutOfMemoryError:
            rows.append(setting + ["out of memory"] + ["-"] * 6)
        finally:
            del model, optimizer
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    peaks = f"measured matmul peak {measured / 1e12:.2f} TFLOP/s, nominal bf16 peak " + (
        f"{nominal / 1e12:.0f} TFLOP/s" if nominal else "unknown for this device")
    table(f"5. Stage-1 step, {label} shapes ({peaks})",
          ["batch", "frozen LM weights", "LM recompute", "peft", "checkpointing", "cap",
           "ms/step", "images/s", "max allocated GiB" if cuda else "peak RSS GiB",
           "max reserved GiB", "MFU (measured peak)", "MFU (nominal peak)", "host syncs"], rows)


# ------------------------------------------------------------------ 3. stage-2 step, 4. evaluation


def stage2_and_eval(folder, steps):
    torch.manual_seed(0)
    model = build("tiny", replace(DEMO_CONFIG, lora_dropout=0.0))
    model = model.eval().requires_grad_(False)
    learner = prompt_tune.PromptLearner(model, cleft.FIVE_CLASSES, 30)
    optimizer = torch.optim.SGD([learner.context], lr=1e-3, momentum=0.9)
    paths = [folder / f"eval{i}.jpg" for i in range(1000)]
    for i, path in enumerate(paths):
        Image.fromarray(demo.render_xray(["Edema"], np.random.default_rng(i))).save(
            path, quality=90
        )
    records = [(str(p), i % 5) for i, p in enumerate(paths)]
    workers = min(4, os.cpu_count() or 1)
    loader = cleft.make_loader(
        XrayDataset(records, 112),
        cleft.eval_batches(len(records), 64),
        workers,
        DEVICE,
    )
    seconds = timed(
        lambda: cleft.embed(model, loader, len(records), nullcontext()), 1, warmup=0
    )
    features, labels = cleft.embed(model, loader, 36, nullcontext())
    images = torch.stack([load_image(p, 112) for p, _ in records[:36]]).to(DEVICE)
    labels = torch.tensor([c for _, c in records[:36]], device=DEVICE)
    cached_features = features[:36]

    def step(recompute):
        image_features = model.encode_image(images) if recompute else cached_features
        loss = F.cross_entropy(
            prompt_tune.zero_shot_logits(model, image_features, learner.class_features(model)),
            labels,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    cached, fresh = timed(lambda: step(False), steps), timed(lambda: step(True), steps)
    table(
        "3. Stage-2 step, batch 36, tiny model (ms/step)",
        ["cached image features", "recomputed", "ratio"],
        [[f"{1000 * cached:.1f}", f"{1000 * fresh:.1f}", f"{fresh / cached:.2f}x"]],
    )
    table(
        "4. Evaluation, tiny model",
        ["task", "images", "images/s"],
        [["zero-shot image features", "1000", f"{1000 / seconds:.0f}"]],
    )
    rows = []  # the intervals of a table cell: accuracy and macro AUC, 1,000 resamples
    for n, classes in [(1000, 5), (10000, 5), (10000, 2)]:
        rng = np.random.default_rng(0)
        probabilities = rng.dirichlet(np.ones(classes), n).astype(np.float32)
        labels = rng.integers(0, classes, n)
        interval = timed(lambda: evaluate.scores([probabilities], labels), 3, warmup=0)
        rows.append([str(n), str(classes), f"{1000 * interval:.0f}"])
    table("4b. Bootstrap intervals of accuracy and AUC (ms)", ["test images", "classes", "ms"],
          rows)


# ---------------------------------------------------------------------------- 6. reports


def write_full_mimic(root, studies=227_835, subjects=65_379, seed=0):
    """MIMIC-CXR's size: `studies` report files of realistic length under files/pXX/pSUBJECT/,
    and split and metadata tables (.csv.gz) with 1 to 3 images per study, 1.75 on average (about
    399,000 rows; the release has 377,110), some lateral, 1% of the studies in validate and 1.4% in
    test. Images are not written: reading the splits never opens them."""
    import random

    import report_layouts as layouts

    rng = random.Random(seed)
    images = []
    for i in range(studies):
        subject = str(10_000_000 + (i * subjects) // studies * (9_999_999 // subjects))
        study = str(50_000_000 + i)
        split = "test" if i % 70 == 0 else "validate" if i % 100 == 1 else "train"
        views = rng.choice([["PA"], ["PA", "LATERAL"], ["AP"], ["PA", "LATERAL", "LATERAL"]])
        images += [(f"{study}-{k}", study, subject, split, view) for k, view in enumerate(views)]
        file = layouts.report_file(root, subject, study)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(layouts.mimic_report(rng, findings_sentences=rng.randint(2, 8)))
    layouts.write_mimic_tables(root, images)
    return len(images)


def read_in_fresh_process(root):
    """(seconds, peak resident MB) of cleft.load_splits on a MIMIC-CXR folder, in a new process."""
    import subprocess

    project = str(Path(cleft.__file__).parent)
    code = (f"import resource, sys, time; sys.path.insert(0, {project!r})\n"
            "import cleft\nstart = time.perf_counter()\n"
            f"splits = cleft.load_splits(cleft.parse_config(['--data', 'mimic-cxr', "
            f"'--data-root', {str(root)!r}]))\n"
            "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss / 1024, len(splits['train']), len(splits['val']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    lines = result.stdout.strip().splitlines()
    seconds, megabytes, train, val = lines[-1].split()
    return float(seconds), float(megabytes), int(train), int(val), lines[0]


def baseline_rss():  # peak resident MB of a process that imports cleft.py and reads nothing
    import subprocess

    code = (f"import resource, sys; sys.path.insert(0, {str(Path(cleft.__file__).parent)!r})\n"
            "import cleft\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


def report_steps(folder, steps, rounds=2):
    """images/s of stage-1 steps (tiny models, CPU) on a pairs CSV of the small MIMIC-CXR layout's
    images and whole texts, on that layout itself (the same captions), and on it with drawn
    sentences (shorter captions); each run `rounds` times, interleaved."""
    import csv
    import json

    import report_layouts as layouts

    demo.save_tiny_models(folder)
    root = folder / "mimic-small"
    layouts.write_mimic(root, extra_studies=60)
    splits = cleft.load_splits(cleft.parse_config(["--data", "mimic-cxr", "--data-root",
                                                   str(root)]))
    with open(folder / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text", "split"])
        for split in ("train", "val"):
            writer.writerows((path, text, split) for path, text in splits[split])
    mimic = ["--data", "mimic-cxr", "--data-root", str(root)]
    runs = {"--data csv (the same images and texts)": ["--data", "csv", "--data-root",
                                                       str(folder / "pairs.csv")],
            "--data mimic-cxr (findings-impression)": mimic,
            "--data mimic-cxr --caption sentence": [*mimic, "--caption", "sentence"]}
    rates = {label: [] for label in runs}
    for round_ in range(rounds):
        for label, flags in runs.items():
            out = folder / f"run{round_}-{list(runs).index(label)}"
            cleft.main([*demo.stage1_args(folder, out), *flags, "--batch-size", "16",
                        "--max-steps", str(steps + 5), "--eval-every", "1000", "--log-every",
                        "5", "--num-workers", "1", "--warmup-steps", "5"])
            lines = (out / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            rates[label] += [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    return {label: float(np.median(values)) for label, values in rates.items()}


def reports_part(folder, steps):
    root = folder / "mimic-full"
    start = time.perf_counter()
    n_images = write_full_mimic(root)
    written = time.perf_counter() - start
    runs = [read_in_fresh_process(root) for _ in range(3)]
    seconds = float(np.median([run[0] for run in runs]))
    megabytes = float(np.median([run[1] for run in runs]))
    _, _, train, val, line = runs[0]
    print(f"\n(written in {written:.0f} s; the reader's line: {line})")
    table("6a. Reading MIMIC-CXR's reports and tables into the splits (fresh process, warm page "
          "cache, median of 3)", ["report files", "image rows", "train / val images", "seconds",
                                  "peak RSS MB", "of which the imports"],
          [[f"{227_835:,}", f"{n_images:,}", f"{train:,} / {val:,}", f"{seconds:.1f}",
            f"{megabytes:.0f}", f"{baseline_rss():.0f}"]])
    rates = report_steps(folder, steps)
    table("6b. Stage-1 steps on report captions (tiny models, batch 16, CPU, median images/s "
          "of the log windows of two interleaved runs each)",
          ["data", "images/s"], [[label, f"{rate:.0f}"] for label, rate in rates.items()])


# ---------------------------------------------------------------------------- 7. checkpoints


def save_with_and_without_manifest(folder, repeats=3):
    """Seconds of checkpoints.save_checkpoint for DINOv2 ViT-B/14 fully trained with the tiny
    GPT-2 and LoRA (87M trained parameters and their AdamW moments, as the paper's 90.9M), with
    the manifest and with it switched off, interleaved; and of checking the manifest at load."""
    import checkpoints

    cfg = replace(DEMO_CONFIG, vision_model="facebook/dinov2-base")
    load = lambda name, kind: ((AutoModel.from_config(dry_run.architecture(name)), None)
                               if kind == "vision" else
                               (random_model(*SIZES["tiny"]["text"]), demo.tiny_tokenizer()))
    model = cleft.build_model(cfg, load=load)
    optimizer = cleft.make_optimizer(model, 1e-4, 0.1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # the moments exist, as in any saved run
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    real_seal = checkpoints.seal
    times = {"without": [], "with manifest": []}
    checks = []
    for _ in range(repeats):
        for label in times:
            checkpoints.seal = real_seal if label == "with manifest" else (lambda folder: None)
            start = time.perf_counter()
            checkpoints.save_checkpoint(folder / "ckpt", model, optimizer, cfg, 1, 1.0)
            times[label].append(time.perf_counter() - start)
        checkpoints.CHECKED.clear()  # the last save has a manifest: checked as a loader would
        start = time.perf_counter()
        assert (folder / "ckpt" / checkpoints.MANIFEST).exists()
        assert checkpoints.damage(folder / "ckpt") is None
        checks.append(time.perf_counter() - start)
    checkpoints.seal = real_seal
    size = sum(p.stat().st_size for p in (folder / "ckpt").rglob("*") if p.is_file())
    return trained, size, {k: float(np.median(v)) for k, v in times.items()}, np.median(checks)


def checkpoints_part(folder):
    trained, size, times, check = save_with_and_without_manifest(folder)
    overhead = times["with manifest"] / times["without"] - 1
    table("7. A checkpoint's manifest (sizes and SHA-256 of its files; median of 3, interleaved)",
          ["trained parameters", "checkpoint MB", "save s", "save without manifest s",
           "overhead", "check at load s"],
          [[f"{trained:,}", f"{size / 2**20:.0f}", f"{times['with manifest']:.2f}",
            f"{times['without']:.2f}", f"{100 * overhead:+.0f}%", f"{check:.2f}"]])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per stage-1 / stage-2 configuration"
    )
    parser.add_argument(
        "--batch", type=int, default=36 if torch.cuda.is_available() else 16, help="stage-1 batch"
    )
    parser.add_argument("--images", type=int, default=8, help="JPEGs per size in part 1")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="loader processes in part 1b"
    )
    parser.add_argument("--parts", default="1234567", help="which parts to run (5: GPU only)")
    parser.add_argument("--shapes", default="paper", choices=["paper", "tiny", "mid"],
                        help="part 5's model shapes ('tiny' checks the code on a CPU)")
    args = parser.parse_args()
    print(
        "device: "
        + (
            torch.cuda.get_device_name()
            if DEVICE.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads"
        )
        + "; "
        f"torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as folder:
        if "1" in args.parts:
            input_pipeline(Path(folder), args.images, args.workers)
        if "2" in args.parts:
            stage1(args.steps, args.batch)
            text_handling(args.steps, args.batch)
        if "3" in args.parts or "4" in args.parts:
            stage2_and_eval(Path(folder), args.steps)
        if "5" in args.parts and (DEVICE.type == "cuda" or args.shapes != "paper"):
            paper_shapes(args.steps, args.shapes)
        if "6" in args.parts:
            reports_part(Path(folder), max(args.steps, 20))
        if "7" in args.parts:
            checkpoints_part(Path(folder))


if __name__ == "__main__":
    main()
