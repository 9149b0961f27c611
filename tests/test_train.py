"""End to end: `python cleft.py` on the demo layout writes best/, last/ and metrics.jsonl; --resume
continues exactly; torchrun with two CPU processes trains; mistakes end in one clear message."""

import csv
import json
import os
import re
from contextlib import nullcontext
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from image_io import load_image

import cleft
from conftest import stage1_flags
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


def test_demo_run_writes_checkpoints_and_metrics(demo_folder, tmp_path):
    out = tmp_path / "run"
    result = run_cleft(*stage1_flags(demo_folder, "--out-dir", out, "--max-steps", 6,
                                     "--eval-every", 3, *FAST))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 6/6 | loss" in result.stdout and "zero_shot_acc" in result.stdout
    # its output goes to pipes, as a batch job's to a log: plain lines, no bar frames
    assert "\r" not in result.stdout + result.stderr
    assert re.search(r"^train: 6/6, [0-9.]+/s, 0:00:00 left$", result.stderr, re.MULTILINE)
    records = metrics(out)
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 3, 6]
    assert all(0 <= r["zero_shot_acc"] <= 100 for r in evaluations)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert all({"lr", "logit_scale", "images_per_s"} <= r.keys() for r in records if "loss" in r)
    for name in ("best", "last"):
        files = {p.name for p in (out / name).iterdir()}
        assert files == {"config.json", "model.safetensors", "adapter", "state.pt",
                         "split.safetensors", "manifest.json"}
    assert json.loads((out / "last" / "config.json").read_text())["max_steps"] == 6
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["best_val_loss"] == min(r["val_loss"] for r in evaluations)

    # the adapter is in peft's own format, and equal to the LoRA weights in model.safetensors
    from peft import PeftModel

    base, _ = cleft.load_pretrained(str(demo_folder / "tiny-gpt2"), "text")
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


def test_torchrun_two_processes_with_a_validation_split_smaller_than_the_batch(
    demo_folder, tmp_path
):
    """17 validation images against a global batch of 32 (16 a rank): scored as one batch of 17,
    with finite losses and best/ saved, and at step 0 (the same weights, no dropout) the same value
    as one process gives. The models load from their folders on both ranks, with none of the
    library's loading bars."""
    flags = stage1_flags(demo_folder, "--max-steps", 4, "--eval-every", 2, "--batch-size", 32,
                         "--num-workers", 0, "--log-every", 2, "--multi-positive")
    one, two = tmp_path / "one", tmp_path / "two"
    cleft.main([*flags, "--out-dir", str(one), "--max-steps", "0"])
    result = torchrun(ROOT / "cleft.py", *flags, "--out-dir", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loading weights" not in result.stderr and "Writing model shards" not in result.stderr
    assert "data: 334 train, 17 val, 50 test" in result.stdout
    assert "world size 2" in result.stdout and result.stdout.count("step 4/4 | loss") == 1
    assert result.stdout.count("step 4 | val_loss") == 1  # rank 0 prints
    evaluations = [r for r in metrics(two) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    assert all(0 < r["val_loss"] < 10 for r in evaluations)
    assert evaluations[0]["val_loss"] == pytest.approx(metrics(one)[0]["val_loss"], rel=1e-5)
    assert (two / "best" / "model.safetensors").exists()
    assert torch.load(two / "last" / "state.pt", weights_only=True)["step"] == 4


def test_a_user_error_under_torchrun_is_printed_once(demo_folder, tmp_path):
    """Both ranks meet the mistake; rank 0 alone prints it, and every rank exits with code 1
    (torchrun then adds its own failure summary, with the exit codes)."""
    result = torchrun(ROOT / "cleft.py", *stage1_flags(demo_folder, "--out-dir", tmp_path,
                                                       "--batch-size", 7, "--num-workers", 0))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith(
        "error: --batch-size 7 is the global batch and must divide by the 2 processes")
    assert 'cleft.py", line' not in result.stderr  # no traceback from our code
    # torchrun's summary: each rank exits with 1, unless torchrun stopped the slower one first
    codes = re.findall(r"exitcode  : (-?\d+)", result.stderr)
    assert len(codes) == 2 and "1" in codes and set(codes) <= {"1", "-15"}


def test_csv_pairs_with_three_validation_images_train(demo_folder, demo_root, tmp_path):
    """--data csv with a split column: 16 training pairs and 3 validation pairs, batch 8."""
    splits = cleft.load_splits(cleft.parse_config(["--data-root", str(demo_root)]))
    rows = [("train", *pair) for pair in splits["train"][:16]]
    rows += [("val", *pair) for pair in splits["val"][:3]]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("split", "image", "text"), *rows])  # captions hold commas
    out = tmp_path / "run"
    cleft.main(stage1_flags(demo_folder, "--data", "csv", "--data-root", tmp_path / "pairs.csv",
                            "--out-dir", out, "--max-steps", 2, "--eval-every", 2, *FAST))
    evaluations = [r for r in metrics(out) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2]
    assert all(0 < r["val_loss"] < 10 for r in evaluations)  # 3 pairs: log(3) ~ 1.1 at chance
    assert (out / "best" / "model.safetensors").exists()


def test_validation_scores_fixed_batches_per_pair(demo_folder):
    """The validation loss is the mean over pairs of Eq. 1 within batches of the global batch
    size, the last one smaller; one pair alone (whose loss is always 0) joins the batch before:
    17 pairs in batches of 8 are 8 + 9."""
    cfg = cleft.parse_config(stage1_flags(demo_folder, "--batch-size", 8, "--num-workers", 0))
    splits = cleft.load_splits(cfg)
    _, val_loader, test_loader = cleft.make_loaders(splits, cfg, torch.device("cpu"), 1)
    torch.manual_seed(0)
    model = cleft.build_model(cfg).eval()
    with torch.no_grad():
        images = torch.stack([load_image(path, cfg.image_size) for path, _ in splits["val"]])
        image_features = model.encode_image(images)
        text_features = model.encode_text([caption for _, caption in splits["val"]])
        scale = model.logit_scale.exp()
        total = 0.0
        for start, end in [(0, 8), (8, 17)]:
            i, t = image_features[start:end], text_features[start:end]
            logits, targets = scale * i @ t.T, torch.arange(len(i))
            total += (torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                      + torch.nn.functional.cross_entropy(logits.T, targets, reduction="sum")) / 2
    record = cleft.validate(model, val_loader, test_loader, nullcontext(), 8)
    assert len(splits["val"]) == 17
    assert record["val_loss"] == pytest.approx(total.item() / 17, rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "chexpert"], "no data: pass --data-root"),
        (["--data-root", "/nonexistent"],
         "/nonexistent/train.csv does not exist: check --data-root"),
        (["DEMO", "--batch-size", "100000"],
         "training needs 100000 (one global batch), validation 2 (the loss of one pair is always "
         "0): lower --batch-size"),
        (["DEMO", "--data", "csv", "--data-root", "HEADER_ONLY"],
         "HEADER_ONLY is a folder: --data-root takes the CSV file itself."),
        (["DEMO", "--data-root", "HEADER_ONLY/pairs.csv"],
         "HEADER_ONLY/pairs.csv is a file, not a dataset folder: for a CSV of your own pass "
         "--data csv."),
        (["DEMO", "--batch-size", "8", "--resume", "--out-dir", "/nonexistent/run"],
         "no checkpoint in /nonexistent/run/last"),
        (["DEMO", "--batch-size", "8", "--text-model", "no-such-org/no-such-model"],
         "HF_HUB_OFFLINE"),
        (["DEMO", "--data-root", "HEADER_ONLY"], "has a header and no rows"),
        (["DEMO", "--data", "csv", "--data-root", "HEADER_ONLY/pairs.csv"],
         "has a header and no rows"),
    ],
)
def test_mistakes_end_in_one_clear_message(demo_folder, tmp_path, args, message):
    """In process, for speed: a SystemExit carrying a message is what prints one line and no
    traceback. DEMO stands for the demo's flags (later ones win); HEADER_ONLY for a folder whose
    train.csv and pairs.csv have a header and no rows."""
    (tmp_path / "train.csv").write_text(",".join(cleft.CHEXPERT_COLUMNS) + "\n")
    (tmp_path / "pairs.csv").write_text("image,text\n")
    demo_flags = stage1_flags(demo_folder, "--out-dir", tmp_path / "run")
    flags = []
    for arg in args:
        flags += demo_flags if arg == "DEMO" else [arg.replace("HEADER_ONLY", str(tmp_path))]
    with pytest.raises(SystemExit) as error:
        cleft.main(flags)
    message = message.replace("HEADER_ONLY", str(tmp_path))
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
def test_every_variant_trains_saves_and_reloads(demo_folder, tmp_path, flags):
    out = tmp_path / "run"
    cleft.main(stage1_flags(demo_folder, "--out-dir", out, "--max-steps", 2, "--eval-every", 2,
                            *FAST, *flags))
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


def write_pairs(path, pairs, splits=None):
    """A pairs CSV (image, text[, split]) of (image, caption) pairs."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text"] + (["split"] if splits else []))
        writer.writerows([*pair, *([split] if splits else [])]
                         for pair, split in zip(pairs, splits or pairs))


def test_a_validation_split_of_one_pair_is_never_scored(demo_root, tmp_path):
    """Twelve pairs and no split column: two are held out (5% would be one pair, whose loss is
    always 0, so best/ would keep the step-0 weights). A split column with one val pair ends in
    one line."""
    pairs = cleft.load_splits(cleft.parse_config(["--data-root", str(demo_root)]))["train"][:12]
    write_pairs(tmp_path / "pairs.csv", pairs)
    cfg = cleft.parse_config(["--data", "csv", "--data-root", str(tmp_path / "pairs.csv"),
                              "--batch-size", "8", "--num-workers", "0"])
    splits = cleft.load_splits(cfg)
    assert len(splits["val"]) == 2 and len(splits["train"]) == 10
    write_pairs(tmp_path / "pairs.csv", pairs, ["train"] * 11 + ["val"])
    with pytest.raises(SystemExit, match=r"11 train and 1 val images .* validation 2 \(the loss"):
        cleft.make_loaders(cleft.load_splits(cfg), cfg, torch.device("cpu"), 1)


@pytest.mark.parametrize("warmup_steps, warned", [(4000, True), (10, True), (9, False)])
def test_a_warm_up_as_long_as_the_run_is_warned_about(tmp_path, capsys, warmup_steps, warned):
    """One warning line naming both numbers and the flag to change; the run goes on (here to a
    missing data folder)."""
    with pytest.raises(SystemExit, match="does not exist"):
        cleft.main(["--data-root", str(tmp_path), "--max-steps", "10",
                    "--warmup-steps", str(warmup_steps)])
    warning = (f"warning: --warmup-steps {warmup_steps} is at or above --max-steps 10: the "
               "learning rate climbs for the whole run (to --lr at the last step at most, with "
               "no decay); lower --warmup-steps.\n")
    assert (warning in capsys.readouterr().err) == warned


def test_a_log_gets_a_plain_line_every_interval(monkeypatch, capsys):
    """Off a terminal, a bar's place is taken by lines: how far, how fast, how long is left."""
    import progress

    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "INTERVAL", 0)  # a line at every update
    clock = iter([100.0, 102.0, 104.0, 110.0])  # the start, then each image's end
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    for _ in progress.progress_bar(range(3), "images"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["images: 1/3, 0.50/s, 0:00:04 left", "images: 2/3, 0.50/s, 0:00:02 left",
                     "images: 3/3, 0.30/s, 0:00:00 left"]  # the last line once, at the end
