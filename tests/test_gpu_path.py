"""The GPU path as the docs describe it, checked on the CPU: fp32 where they say fp32 (no TF32, the
heads outside autocast), no backward through frozen parts, no host syncs in a training step, the
frozen weights converted before the move to the device, and one clear line for a split with no
readable image or for evaluate.py under torchrun."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cleft
import evaluate
import prompt_tune
from benchmark import host_syncs
from conftest import stage1_flags, tiny_config, tiny_model
from dist_worker import global_batch

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BF16 = torch.autocast("cpu", torch.bfloat16)


@pytest.fixture
def tf32_on():
    """TF32 switched on for matmuls and convolutions, and put back as it was afterwards (by hand:
    these settings live behind a module's __getattr__, which monkeypatch cannot undo)."""
    matmul = torch.backends.cuda.matmul
    conv = torch.backends.cudnn.conv
    before = {"matmul": matmul.fp32_precision, "conv": conv.fp32_precision}
    matmul.fp32_precision = "tf32"
    conv.fp32_precision = "tf32"
    yield
    matmul.fp32_precision = before["matmul"]
    conv.fp32_precision = before["conv"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "auto"])
def test_no_tf32_whatever_the_dtype(dtype, tf32_on):
    """TF32 would reach only the fp32 matmuls (logits, loss, heads), which must stay fp32."""
    cleft.autocast_for(dtype, CPU)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"


def test_under_bf16_autocast_the_loss_and_the_heads_are_fp32(demo_folder, demo_root, stage1_ckpt,
                                                           monkeypatch):
    """The contrastive loss, and the linear-probe and fine-tune heads' logits and cross-entropy,
    under bf16 autocast: all fp32."""
    model = tiny_model(demo_folder)
    images, captions = global_batch()
    assert cleft.train_step(model, images, captions, BF16).dtype == torch.float32
    seen, real_cross_entropy = [], F.cross_entropy

    def cross_entropy(logits, targets, *args, **kwargs):
        seen.append(logits.dtype)
        return real_cross_entropy(logits, targets, *args, **kwargs)

    monkeypatch.setattr(evaluate.F, "cross_entropy", cross_entropy)
    cfg = cleft.parse_config(["--ckpt", str(stage1_ckpt), "--data-root", str(demo_root),
                              "--num-workers", "0", "--max-steps", "2", "--eval-every", "1"],
                             evaluate.EvalConfig)
    data = evaluate.load_data(cfg)
    loaded = cleft.load_model(stage1_ckpt).eval().requires_grad_(False)
    for run in (evaluate.linear_probe, evaluate.fine_tune):
        seen.clear()
        probabilities, _ = run(loaded, data, cfg, CPU, BF16, data.splits["train"][:8])
        assert len(seen) >= 4 and set(seen) == {torch.float32}, run.__name__
        assert probabilities.dtype == "float32"


def test_a_frozen_lm_gets_no_backward_and_stage_2_buffers_no_gradient(demo_folder):
    """--freeze-lm: the text tower's output needs no gradient, so no step runs a backward through
    the LM (LoRA's does). Stage 2: the frozen class-token embeddings never collect a gradient."""
    captions = ["a chest x ray", "edema", "a chest x ray of a patient with edema"]
    frozen = tiny_model(demo_folder, freeze_lm=True).train()
    assert not frozen.text_tower(captions).requires_grad
    assert tiny_model(demo_folder).train().text_tower(captions).requires_grad  # LoRA: it does
    model = tiny_model(demo_folder).requires_grad_(False)
    learner = prompt_tune.PromptLearner(model, ["Edema", "Cardiomegaly"], 8)
    learner.class_features(model).sum().backward()
    assert learner.context.grad is not None
    assert not learner.class_embeddings.requires_grad and learner.class_embeddings.grad is None


@pytest.mark.parametrize("flags", [{}, {"accum_steps": 2}, {"peft": "prefix"},
                                   {"freeze_lm": True}, {"multi_positive": True}])
def test_a_training_step_reads_nothing_back_to_the_host(demo_folder, flags):
    """A non-logging stage-1 step (forward, loss, backward, clipping, the temperature's clamp)
    never reads a tensor's value on the host: on a GPU each read would wait for the device."""
    cfg = tiny_config(demo_folder, **flags)
    model = cleft.build_model(cfg).train()
    images, captions = global_batch()
    with host_syncs() as syncs:
        cleft.train_step(model, images, captions, BF16, cfg.accum_steps, cfg.multi_positive)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    assert dict(syncs) == {}
    with host_syncs() as syncs:  # the counter sees the reads it is meant to see
        bool(model.logit_scale > 0)
    assert sum(syncs.values()) == 1


@pytest.mark.parametrize("peft", ["lora", "ia3", "prefix"])
def test_the_causal_mask_gives_the_padding_mask_s_features(demo_folder, peft):
    """The tower passes a causal mask (none under prefix tuning) instead of the padding mask: the
    features at the EOS are bit-identical to those the LM computes from the padding mask."""
    tower = tiny_model(demo_folder, peft=peft).text_tower
    captions = ["a chest x ray", "edema", "a chest x ray of a patient with edema", "xy"]
    with torch.no_grad():
        for p in tower.parameters():
            if p.requires_grad:  # adapters away from their identity start
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        input_ids, _, eos = tower.tokenize(captions)
        padding = (torch.arange(input_ids.shape[1])[None] <= eos[:, None]).long()  # (B, T)
        from_padding = tower.pool_at_eos(eos, input_ids=input_ids, attention_mask=padding)
        assert torch.equal(tower(captions), from_padding)


def test_frozen_weights_go_to_bf16_before_the_move_to_the_device(demo_folder, monkeypatch):
    """With bf16, model_and_optimizer converts the frozen matmul weights first, so their fp32 copy
    never reaches the device."""
    moved, real_to = [], torch.nn.Module.to

    def to(module, *args, **kwargs):
        if isinstance(module, cleft.CLEFT):
            moved.append({p.dtype for n, p in module.named_parameters()
                          if n.endswith("c_attn.base_layer.weight")})
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    cleft.model_and_optimizer(tiny_config(demo_folder), None, CPU, "bf16")
    assert moved == [{torch.bfloat16}]


def test_a_split_with_no_readable_image_is_one_error_line(demo_root, demo_folder, tmp_path):
    """Every validation image missing: one `error:` line naming the split, the count, an example
    and --data-root, with no traceback, also when a loader worker meets it."""
    images = sorted((demo_root / "train").rglob("*.jpg"))[:16]
    rows = [{"image": str(p), "text": f"caption {i % 3}", "split": "train"}
            for i, p in enumerate(images)]
    rows += [{"image": str(tmp_path / f"gone{i}.jpg"), "text": "x", "split": "val"}
             for i in range(3)]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)
    command = [sys.executable, str(ROOT / "cleft.py"),
               *stage1_flags(demo_folder, "--data", "csv", "--data-root", tmp_path / "pairs.csv",
                             "--batch-size", 8, "--max-steps", 2, "--num-workers", 1,
                             "--out-dir", tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: none of the 3 val images can be read, e.g. " in errors[0]
    assert "gone0.jpg" in errors[0] and errors[0].endswith(
        "check the paths (a data set's: --data-root).")


def test_evaluate_under_torchrun_says_it_runs_in_one_process(monkeypatch, stage1_ckpt):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="evaluate.py runs in one process, on one GPU"):
        evaluate.main(["--ckpt", str(stage1_ckpt)])
