"""End to end: `python cleft.py` on the demo layout writes best/, last/ and metrics.jsonl; --resume
continues exactly; torchrun with two CPU processes trains; mistakes end in one clear message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cleft
from test_distributed import torchrun

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "8", "--num-workers", "0", "--log-every", "2"]


def run_cleft(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "cleft.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_demo_run_writes_checkpoints_and_metrics(demo_root, tmp_path):
    out = tmp_path / "run"
    result = run_cleft(
        "--data-root", demo_root, "--out-dir", out, "--max-steps", 6, "--eval-every", 3, *FAST
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 6/6 | loss" in result.stdout and "zero_shot_acc" in result.stdout
    records = metrics(out)
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 3, 6]
    assert all(0 <= r["zero_shot_acc"] <= 100 for r in evaluations)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert all({"lr", "logit_scale", "images_per_s"} <= r.keys() for r in records if "loss" in r)
    for name in ("best", "last"):
        files = {p.name for p in (out / name).iterdir()}
        assert files == {"config.json", "model.safetensors", "adapter", "state.pt"}
    assert json.loads((out / "last" / "config.json").read_text())["max_steps"] == 6
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["best_val_loss"] == min(r["val_loss"] for r in evaluations)

    # the adapter is in peft's own format, and equal to the LoRA weights in model.safetensors
    from peft import PeftModel

    base, _ = cleft.load_pretrained("tiny", "text")
    adapted = PeftModel.from_pretrained(base, out / "last" / "adapter")
    ours = load_file(out / "last" / "model.safetensors")
    lora = {n: p for n, p in adapted.named_parameters() if "lora_" in n}
    assert len(lora) == 4
    for name, p in lora.items():
        assert torch.equal(p.detach(), ours["text_tower.model." + name])
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # it trained

    # load_model rebuilds the trained model from the checkpoint
    model = cleft.load_model(out / "last")
    assert torch.equal(model.image_projection.weight.detach(), ours["image_projection.weight"])


def test_torchrun_two_processes_on_cpu(demo_root, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun(
        ROOT / "cleft.py",
        "--data-root",
        demo_root,
        "--out-dir",
        out,
        "--max-steps",
        4,
        "--eval-every",
        2,
        "--multi-positive",
        *FAST
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "world size 2" in result.stdout and result.stdout.count("step 4/4 | loss") == 1
    )  # rank 0 prints
    assert result.stdout.count("step 4 | val_loss") == 1
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [0, 2, 4]
    assert torch.load(out / "last" / "state.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "chexpert"], "needs --data-root"),
        (
            ["--data", "chexpert", "--data-root", "/nonexistent"],
            "/nonexistent/train.csv does not exist: check --data-root",
        ),
        (
            ["--data-root", "DEMO", "--batch-size", "100000"],
            "fewer than one global batch (100000): lower --batch-size",
        ),
        (
            [
                "--data-root",
                "DEMO",
                "--batch-size",
                "8",
                "--resume",
                "--out-dir",
                "/nonexistent/run",
            ],
            "no checkpoint in /nonexistent/run/last",
        ),
        (
            [
                "--data-root",
                "DEMO",
                "--batch-size",
                "8",
                "--text-model",
                "no-such-org/no-such-model",
            ],
            "HF_HUB_OFFLINE",
        ),
    ],
)
def test_mistakes_end_in_one_clear_message(demo_root, tmp_path, args, message):
    """In process, for speed: a SystemExit carrying a message is what prints one line and no
    traceback."""
    with pytest.raises(SystemExit) as error:
        cleft.main(
            [
                "--out-dir",
                str(tmp_path / "run"),
                *[str(demo_root) if a == "DEMO" else a for a in args],
            ]
        )
    assert str(error.value).startswith("error: ") and message in str(error.value)


@pytest.mark.parametrize(
    "flags",
    [
        ["--peft", "ia3"],
        ["--peft", "prefix"],
        ["--freeze-lm"],
        ["--full-ft-lm"],
        ["--train-embed", "--dtype", "bf16"],
    ],
)
def test_every_variant_trains_saves_and_reloads(demo_root, tmp_path, flags):
    out = tmp_path / "run"
    cleft.main(
        [
            "--data-root",
            str(demo_root),
            "--out-dir",
            str(out),
            "--max-steps",
            "2",
            "--eval-every",
            "2",
            *FAST,
            *flags,
        ]
    )
    saved = load_file(out / "last" / "model.safetensors")
    model = cleft.load_model(out / "last")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == saved.keys()
    assert all(torch.equal(p.detach(), saved[n]) for n, p in trained.items())
    assert (out / "last" / "adapter").exists() == (
        model.text_tower.model.__class__.__name__.startswith("Peft")
    )
    lm_trained = [n for n in trained if n.startswith("text_tower.")]
    assert bool(lm_trained) == ("--freeze-lm" not in flags)
