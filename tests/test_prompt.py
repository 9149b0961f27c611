"""Stage 2: the assembled prompt, its initialisation, that only the context learns, cached image
features, and prompt_tune.py end to end (one process and two)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cleft
import demo
import prompt_tune
from image_io import XrayDataset, load_image
from checkpoints import load_prompt
from conftest import tiny_model
from test_distributed import torchrun

ROOT = Path(__file__).resolve().parents[1]
CAPTION = cleft.CAPTION_PREFIX.strip()  # 39 characters: 39 tokens for the byte-level tiny tokenizer


def embed(model, text):
    """The text tower's input embeddings of `text`'s tokens, (T, H)."""
    tower = model.text_tower
    return tower.model.get_input_embeddings()(
        torch.tensor(tower.tokenizer(text, add_special_tokens=False)["input_ids"])
    )


def test_assembled_sequence(demo_folder):
    model = tiny_model(demo_folder)
    learner = prompt_tune.PromptLearner(model, ["Edema", "Pleural Effusion"], context_length=5)
    embeds = learner.inputs_embeds()
    lengths = [len(" edema") + 1, len(" pleural effusion") + 1]  # class tokens + EOS
    assert embeds.shape == (2, 5 + max(lengths), 64)
    for c, (name, n) in enumerate(zip([" edema", " pleural effusion"], lengths)):
        assert torch.equal(embeds[c, :5], learner.context)  # context first, shared by the classes
        torch.testing.assert_close(
            embeds[c, 5 : 5 + n - 1], embed(model, name)
        )  # then the class name's tokens
        eos = learner.eos_positions[c].item()
        assert eos == 5 + n - 1
        torch.testing.assert_close(
            embeds[c, eos], embed(model, "<|endoftext|>")[0]
        )  # then the EOS, pooled there
        assert learner.attention_mask[c].tolist() == [1] * (eos + 1) + [0] * (
            embeds.shape[1] - eos - 1
        )


def test_initialisation_copies_the_caption_into_the_last_slots(demo_folder):
    model = tiny_model(demo_folder)
    caption = embed(model, CAPTION)  # (39, H)
    torch.manual_seed(0)
    longer = prompt_tune.PromptLearner(model, ["Edema"], context_length=50).context.detach()
    torch.testing.assert_close(longer[11:], caption)  # the caption fills the last 39 of 50 slots
    bound = model.text_tower.model.get_input_embeddings().weight.std().item() * 3**0.5
    assert (
        longer[:11].abs().max() <= bound and longer[:11].std() > bound / 4
    )  # the first 11: uniform noise
    shorter = prompt_tune.PromptLearner(model, ["Edema"], context_length=10).context.detach()
    torch.testing.assert_close(
        shorter, caption[-10:]
    )  # a caption longer than L keeps its last L tokens


@pytest.mark.parametrize("peft", ["lora", "ia3", "prefix", "none"])
def test_learned_prompt_starts_as_the_hand_written_one(demo_folder, peft):
    model = tiny_model(demo_folder, peft=peft)
    with torch.no_grad():  # adapters away from their identity start, so they matter
        for p in model.text_tower.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        learner = prompt_tune.PromptLearner(model, cleft.FIVE_CLASSES, context_length=len(CAPTION))
        torch.testing.assert_close(
            learner.class_features(model),
            model.encode_text(cleft.class_prompts(cleft.FIVE_CLASSES)),
            rtol=1e-4,
            atol=1e-5,
        )


def test_only_the_context_learns(demo_folder):
    model = tiny_model(demo_folder).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = prompt_tune.PromptLearner(model, cleft.FIVE_CLASSES, context_length=8)
    start = learner.context.detach().clone()
    assert [n for n, p in learner.named_parameters()] == ["context"]
    optimizer = torch.optim.SGD([learner.context], lr=0.5, momentum=0.9)
    features = F.normalize(torch.randn(36, 512), dim=-1)
    labels = torch.randint(5, (36,))
    for _ in range(3):
        loss = F.cross_entropy(
            prompt_tune.zero_shot_logits(model, features, learner.class_features(model)), labels
        )
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        assert learner.context.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(learner.context.detach(), start)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the encoders are bit-identical


def test_cached_features_give_the_loss_of_recomputed_ones(demo_folder, demo_root):
    model = tiny_model(demo_folder)
    splits = prompt_tune.labelled_splits(
        cleft.parse_config(["--data-root", str(demo_root)], prompt_tune.PromptConfig),
        cleft.FIVE_CLASSES,
    )
    records = splits["train"][:20]
    loader = cleft.make_loader(
        XrayDataset(records, 112),
        cleft.eval_batches(len(records), 8),
        0,
        torch.device("cpu"),
    )
    cached, labels = cleft.embed(model, loader, len(records), torch.no_grad())
    images = torch.stack([load_image(path, 112) for path, _ in records])
    with torch.no_grad():
        fresh = model.encode_image(images)
    learner = prompt_tune.PromptLearner(model, cleft.FIVE_CLASSES)
    index = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    losses = [
        F.cross_entropy(
            prompt_tune.zero_shot_logits(model, f[index], learner.class_features(model)),
            labels[index],
        )
        for f in (cached, fresh)
    ]
    assert labels.tolist() == [c for _, c in records]
    torch.testing.assert_close(losses[0], losses[1])


def run_prompt_tune(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "prompt_tune.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


FAST = ["--max-steps", "40", "--eval-every", "20", "--log-every", "10", "--num-workers", "0"]


def test_demo_run_improves_the_loss_and_writes_the_prompt(demo_folder, stage1_ckpt, tmp_path):
    out = tmp_path / "prompt.safetensors"
    result = run_prompt_tune(*demo.stage2_args(demo_folder, stage1_ckpt), "--out", out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 0 | held-out zero-shot acc: hand-written" in result.stdout
    assert (
        "5x200 zero-shot acc: hand-written" in result.stdout and f"saved to {out}" in result.stdout
    )
    held_out = int(re.search(r"data: \d+ train, (\d+) val", result.stdout).group(1))
    assert 0 < held_out < 100  # too few to trust: the log says how far
    assert f"note: {held_out} held-out images: accuracy +-{50 / held_out**0.5:.0f} points" in (
        result.stdout)
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert [r["step"] for r in records if "val_acc_learned" in r] == [0, 20, 40]
    test = records[-1]  # the 5x200 report: the gain over the same images, with a paired interval
    assert test["test_acc_gain"] == pytest.approx(
        test["test_acc_learned"] - test["test_acc_hand_written"])
    low, high = test["test_acc_gain_ci95"]
    assert low <= test["test_acc_gain"] <= high
    assert (f"gain {test['test_acc_gain']:+.1f} (paired 95% CI {low:+.1f} to {high:+.1f})"
            in result.stdout)
    context, classes = load_prompt(out)
    assert context.shape == (39, 64) and classes == cleft.FIVE_CLASSES
    default = run_prompt_tune(*demo.stage2_args(demo_folder, stage1_ckpt), "--max-steps", "2",
                              "--num-workers", "0", "--val-fraction", "0.2")
    assert (
        default.returncode == 0 and (stage1_ckpt / "prompt.safetensors").exists()
    )  # default: inside the checkpoint
    same = int(re.search(r"data: \d+ train, (\d+) val", default.stdout).group(1))
    assert same == held_out  # --val-fraction 0.2 changes nothing: the checkpoint's record decides


def test_two_processes_learn_the_same_context(demo_folder, stage1_ckpt, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    flags = demo.stage2_args(demo_folder, stage1_ckpt)
    assert run_prompt_tune(*flags, "--out", one, *FAST).returncode == 0
    result = torchrun(ROOT / "prompt_tune.py", *flags, "--out", two, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 40 | held-out") == 1  # rank 0 prints
    torch.testing.assert_close(
        load_prompt(two)[0], load_prompt(one)[0], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--ckpt and --data-root are required"),
        (["--ckpt", "CKPT", "--data", "csv", "--data-root", "HEADER_ONLY"],
         "has a header and no rows"),
        (["--ckpt", "/nonexistent"], "no checkpoint in /nonexistent"),
        (
            ["--ckpt", "CKPT", "--classes", "Edema,Kidney Stone"],
            "['Kidney Stone'] are not CheXpert label columns",
        ),
    ],
)
def test_mistakes_end_in_one_clear_message(demo_root, stage1_ckpt, tmp_path, args, message):
    (tmp_path / "labels.csv").write_text("image,label\n")
    stand_in = {"CKPT": str(stage1_ckpt), "HEADER_ONLY": str(tmp_path / "labels.csv")}
    result = run_prompt_tune("--data-root", demo_root, *[stand_in.get(a, a) for a in args])
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_prompt_file_is_a_clear_error(tmp_path):
    import evaluate

    with pytest.raises(SystemExit, match="no prompt file at .*: run prompt_tune.py first"):
        evaluate.main(["--ckpt", str(tmp_path), "--prompt", str(tmp_path / "nothing.safetensors")])


def test_stage_2_through_main_changes_only_the_context(demo_folder, stage1_ckpt, tmp_path,
                                                       monkeypatch):
    """prompt_tune.main itself: the encoders get no gradient and end bit-identical, and the
    optimizer is given the context alone."""
    models, optimized = [], []
    real_load_model, real_sgd = prompt_tune.load_model, torch.optim.SGD

    def load_model(directory):
        models.append(real_load_model(directory))
        return models[-1]

    def sgd(params, **kwargs):
        optimized.extend(params := list(params))
        return real_sgd(params, **kwargs)

    monkeypatch.setattr(prompt_tune, "load_model", load_model)
    monkeypatch.setattr(torch.optim, "SGD", sgd)
    out = tmp_path / "prompt.safetensors"
    prompt_tune.main([*demo.stage2_args(demo_folder, stage1_ckpt), "--out", str(out),
                      "--max-steps", "5", "--eval-every", "5", "--num-workers", "0"])
    (model,) = models
    before, after = real_load_model(stage1_ckpt).state_dict(), model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert [p.shape for p in optimized] == [torch.Size([39, 64])]  # the context, (L, H)


def test_stage_2_saves_the_context_of_the_lowest_held_out_loss(demo_folder, stage1_ckpt,
                                                             tmp_path, monkeypatch):
    """A learning rate that diverges makes later contexts worse: the file holds the context of
    the step with the lowest held-out loss, not the last one, and the 5x200 report scores it."""
    scored, records = [], []  # the contexts the held-out evaluations and the report score
    real_class_features, real_log = prompt_tune.PromptLearner.class_features, prompt_tune.log

    def class_features(self, model):
        if not torch.is_grad_enabled():  # an evaluation, not a training step
            scored.append(self.context.detach().clone())
        return real_class_features(self, model)

    def log(path, record, line):
        records.append(record)
        real_log(path, record, line)

    monkeypatch.setattr(prompt_tune.PromptLearner, "class_features", class_features)
    monkeypatch.setattr(prompt_tune, "log", log)
    out = tmp_path / "prompt.safetensors"
    prompt_tune.main([*demo.stage2_args(demo_folder, stage1_ckpt), "--out", str(out), "--lr", "30",
                      "--warmup-steps", "0", "--max-steps", "8", "--eval-every", "1",
                      "--num-workers", "0"])
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]  # steps 0 to 8
    best = min(range(len(val_losses)), key=val_losses.__getitem__)
    assert len(val_losses) == 9 and val_losses[-1] > val_losses[best]  # the end is worse
    assert len(scored) == 10  # nine evaluations, then the report
    context, _ = load_prompt(out)
    assert torch.equal(context, scored[best]) and not torch.equal(context, scored[8])
    assert torch.equal(scored[9], scored[best])


def test_stage_2_batches_are_class_balanced(demo_folder, stage1_ckpt, tmp_path, monkeypatch):
    """Each training image is drawn with weight 1 / (its class's size): every class weighs 1."""
    drawn, real_multinomial = [], torch.multinomial

    def multinomial(weights, *args, **kwargs):
        drawn.append(weights.clone())
        return real_multinomial(weights, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    prompt_tune.main([*demo.stage2_args(demo_folder, stage1_ckpt), "--max-steps", "3",
                      "--eval-every", "3", "--num-workers", "0",
                      "--out", str(tmp_path / "p.safetensors")])
    weights = drawn[0]
    assert len(drawn) == 3 and weights.max() > 1.5 * weights.min()  # the demo's classes differ
    assert weights.sum().item() == pytest.approx(5.0)  # five classes, each of total weight 1


def test_csv_labels_split_column_and_caption(demo_folder, tmp_path, capsys):
    rows = ["image,label,split", "a.png,cat,train", "b.png,,train", "c.png,dog,val",
            "d.png,dog,test", "e.png,dog,train"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = cleft.parse_config(["--data", "csv", "--data-root", str(tmp_path / "labels.csv")],
                             prompt_tune.PromptConfig)
    splits = prompt_tune.labelled_splits(cfg, ["cat", "dog"])
    stems = {name: [(Path(path).stem, label) for path, label in splits[name]] for name in splits}
    assert stems == {"train": [("a", 0), ("e", 1)], "val": [("c", 1)], "test": []}
    model = tiny_model(demo_folder)  # a caption longer than L: the note says it is cut
    learner = prompt_tune.PromptLearner(model, ["cat"], 10, init="a breast mammogram with")
    assert "the context keeps the last 10 of 23 tokens" in capsys.readouterr().out
    caption = embed(model, "a breast mammogram with")  # (23, H): one token per byte
    torch.testing.assert_close(learner.context.detach(), caption[-10:])


def test_the_five_classes_in_another_order_keep_the_test_report(demo_root):
    """The 5x200 test images are labelled by name, whatever the order --classes gives."""
    cfg = cleft.parse_config(["--data-root", str(demo_root)], prompt_tune.PromptConfig)
    reordered = cleft.FIVE_CLASSES[::-1]
    splits = prompt_tune.labelled_splits(cfg, reordered)
    rows = cleft.chexpert_rows(demo_root)["test"]
    assert len(splits["test"]) == len(rows) == 50
    assert [reordered[label] for _, label in splits["test"]] == [
        cleft.FIVE_CLASSES[cleft.five_class_index(row)] for row in rows]
