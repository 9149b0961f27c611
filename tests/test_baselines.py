"""The paper's baseline rows without a CLEFT checkpoint: ImageNet-ViT (a saved DINOv2 tower as CLEFT
uses it), Random-ViT (its architecture, seeded random weights) and CLIP-ViT (a saved CLIP with its
own text tower, so zero-shot too), each run through evaluate.py on the demo data."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, PreTrainedTokenizerFast

import baselines
import cleft
import evaluate
from image_io import load_image
from prompt_tune import zero_shot_logits


@pytest.fixture(scope="module")
def tiny_clip(demo_folder):  # the demo's CLIP, saved with save_pretrained, random with seed 0
    return demo_folder / "tiny-clip"


def run_evaluate(demo_root, out, *flags):
    evaluate.main(["--data-root", str(demo_root), "--max-steps", "4", "--eval-every", "2",
                   "--num-workers", "0", "--out", str(out), *map(str, flags)])
    return json.loads(out.read_text())


def test_clip_row_scores_with_clip_s_own_towers_projections_and_temperature(tiny_clip, demo_root):
    """Our CLIP wrapper gives transformers' CLIPModel features: image features from CLIP's pixel
    normalisation and visual projection, text features from its tokenizer, text tower (pooled at
    the end-of-text token) and text projection, logits scaled by its temperature."""
    model, row = baselines.load_baseline(str(tiny_clip))
    assert row == "CLIP-ViT"
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    model.eval()
    prompts = cleft.class_prompts(cleft.FIVE_CLASSES)
    tokens = PreTrainedTokenizerFast.from_pretrained(tiny_clip)(prompts, padding=True,
                                                                return_tensors="pt")
    assert (tokens["input_ids"] == 256).any(dim=1).all()  # every prompt ends in end-of-text
    with torch.no_grad():
        expected_text = clip.get_text_features(**tokens).pooler_output
        assert torch.allclose(model.encode_text(prompts), F.normalize(expected_text, dim=-1),
                              atol=1e-6)
        image = load_image(str(next(demo_root.rglob("*.jpg"))), 112)[None]  # (1, 1, 112, 112)
        # OpenAI CLIP's pixel mean and std (its image processor's), not ImageNet's
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        pixels = (image.expand(-1, 3, -1, -1) - mean) / std
        expected_image = clip.get_image_features(pixel_values=pixels).pooler_output
        assert torch.allclose(model.encode_image(image), F.normalize(expected_image, dim=-1),
                              atol=1e-6)
        # the zero-shot logits evaluate.py and predict.py use are CLIP's logits_per_image
        logits = zero_shot_logits(model, model.encode_image(image), model.encode_text(prompts))
        expected = clip(**tokens, pixel_values=pixels).logits_per_image
        assert torch.allclose(logits, expected, atol=1e-4)


def test_clip_row_runs_every_task_and_says_what_it_is(tiny_clip, demo_root, tmp_path):
    report = run_evaluate(demo_root, tmp_path / "clip.json", "--vision-model", tiny_clip,
                          "--task", "all")
    assert report["model"] == {"row": "CLIP-ViT", "source": str(tiny_clip)}
    assert report["checkpoint"] is None
    assert set(report["results"]) == {"zeroshot", "linear", "finetune", "retrieval"}
    assert report["config"]["image_size"] == 112  # the tiny CLIP's own input side
    # its zero-shot is CLIP's: the same numbers from CLIP's features, computed here
    model, _ = baselines.load_baseline(str(tiny_clip))
    cfg = evaluate.EvalConfig(vision_model=str(tiny_clip), data_root=str(demo_root),
                              num_workers=0, image_size=112)
    data = evaluate.load_data(cfg)
    direct = evaluate.zero_shot(model.eval(), data, cfg, torch.device("cpu"), torch.no_grad())
    assert report["results"]["zeroshot"] == {key: pytest.approx(value if isinstance(value, float)
                                                               else list(value))
                                             for key, value in direct.items()}
    assert report["prompts"] == {c: [p] for c, p in zip(data.classes, data.prompts)}


def test_random_init_is_random_and_seeded(demo_folder):
    dinov2 = str(demo_folder / "tiny-dinov2")
    weights = lambda model: torch.cat([p.flatten() for p in model.parameters()])
    # seed 3: the demo drew the saved weights with seed 0, as --random-init --seed 0 would
    first, row = baselines.load_baseline(dinov2, random_init=True, seed=3)
    assert row == "Random-ViT"
    again, _ = baselines.load_baseline(dinov2, random_init=True, seed=3)
    other, _ = baselines.load_baseline(dinov2, random_init=True, seed=4)
    pretrained, pretrained_row = baselines.load_baseline(dinov2)
    assert pretrained_row == "ImageNet-ViT"
    assert torch.equal(weights(first), weights(again))  # one seed repeats
    assert not torch.equal(weights(first), weights(other))  # two seeds differ
    assert not torch.equal(weights(first), weights(pretrained))  # not the saved weights
    saved = cleft.load_pretrained(dinov2, "vision")[0].state_dict()
    loaded = pretrained.image_tower.model.state_dict()
    assert loaded.keys() == {k for k in saved if not k.startswith("layernorm.")}
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)  # the saved weights
    # the same architecture, as CLEFT uses it: no final norm, the feature is the mean of tokens
    assert isinstance(first.image_tower.model.layernorm, torch.nn.Identity)
    assert [p.shape for p in first.parameters()] == [p.shape for p in pretrained.parameters()]


def test_the_paper_s_random_vit_needs_no_download():
    """facebook/dinov2-base's architecture is stored: the Random-ViT row builds offline."""
    model, row = baselines.load_baseline("facebook/dinov2-base", random_init=True, seed=0)
    assert row == "Random-ViT"
    assert model.image_tower.width == 768
    # ViT-B/14: 86,580,480 parameters, less its final LayerNorm's 2 x 768
    assert sum(p.numel() for p in model.parameters()) == 86_580_480 - 2 * 768


def test_image_tower_rows_run_linear_probe_and_fine_tune(demo_folder, demo_root, tmp_path):
    dinov2 = demo_folder / "tiny-dinov2"
    imagenet = run_evaluate(demo_root, tmp_path / "imagenet.json", "--vision-model", dinov2,
                            "--image-size", 112)
    random = run_evaluate(demo_root, tmp_path / "random.json", "--vision-model", dinov2,
                          "--random-init", "--seed", 3, "--image-size", 112, "--task", "linear")
    assert set(imagenet["results"]) == {"linear", "finetune"}  # no text tower: no zero-shot
    assert imagenet["model"] == {"row": "ImageNet-ViT", "source": str(dinov2)}
    assert random["model"] == {"row": "Random-ViT",
                               "source": f"{dinov2}, random weights (seed 3)"}
    assert imagenet["results"]["linear"] != random["results"]["linear"]
    for report in (imagenet, random):
        assert report["n_images"]["test"] == 50 and report["checkpoint"] is None


@pytest.mark.parametrize("flags, message", [
    ([], "--vision-model for a baseline row"),
    (["--vision-model", "tiny-dinov2", "--task", "zeroshot"], "--task linear or finetune"),
    (["--vision-model", "no/such-model"], "HF_HUB_OFFLINE"),
    (["--vision-model", "tiny-clip", "--random-init"], "--random-init draws"),
    (["--vision-model", "tiny-gpt2"], "is a gpt2 model: --vision-model takes a DINOv2 model"),
])
def test_baseline_mistakes_end_in_one_line(flags, message, demo_folder, demo_root, tiny_clip,
                                           tmp_path, monkeypatch):
    monkeypatch.chdir(demo_folder)
    flags = [str(tiny_clip) if flag == "tiny-clip" else flag for flag in flags]
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--data-root", str(demo_root), "--num-workers", "0",
                       "--out", str(tmp_path / "r.json"), *flags])
    assert message in str(stop.value) and "\n" not in str(stop.value)


def test_each_share_of_the_data_keeps_its_own_results_file():
    """The data-efficiency runs (--data-pct 0.01, 0.1) do not overwrite the 100% one."""
    run = evaluate.EvalConfig(ckpt="runs/x/best", data="rsna")
    baseline = evaluate.EvalConfig(vision_model="facebook/dinov2-base", data="rsna", data_pct=0.1)
    assert str(evaluate.results_file(run, "CLEFT")) == "runs/x/best/results_rsna.json"
    assert str(evaluate.results_file(dataclasses.replace(run, data_pct=0.01), "CLEFT")) == (
        "runs/x/best/results_rsna_0.01.json")
    assert str(evaluate.results_file(baseline, "ImageNet-ViT")) == (
        "runs/baselines/imagenet-vit_rsna_0.1.json")
