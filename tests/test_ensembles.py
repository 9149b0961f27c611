"""Prompt ensembles (--prompts FILE in evaluate.py and predict.py): a class's text feature is the
normalised mean of its prompts' unit features; one prompt per class gives today's numbers."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

import cleft
import evaluate
import predict


def test_the_mean_is_taken_over_unit_vectors(stage1_ckpt):
    model = cleft.load_model(stage1_ckpt).eval()
    prompts = [["a chest x ray with edema", "pulmonary edema, interstitial"],
               ["cardiomegaly"], ["no finding", "clear lungs", "normal chest"]]
    with torch.no_grad():
        features = predict.ensemble_features(model, prompts)
        for class_prompts, feature in zip(prompts, features):
            raw = model.text_projection(model.text_tower(class_prompts)).float()  # (P, D)
            unit_mean = F.normalize(F.normalize(raw, dim=-1).mean(dim=0), dim=-1)
            raw_mean = F.normalize(raw.mean(dim=0), dim=-1)
            assert torch.allclose(feature, unit_mean, atol=1e-6)
            if len(class_prompts) > 1:  # the norms differ, so the other mean is another vector
                assert not torch.allclose(feature, raw_mean, atol=1e-4)
    assert features.shape == (3, model.text_projection.out_features)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3))


def evaluate_zero_shot(stage1_ckpt, demo_root, tmp_path, *flags):
    out = tmp_path / "results.json"
    evaluate.main(["--ckpt", str(stage1_ckpt), "--data-root", str(demo_root), "--task",
                   "zeroshot", "--num-workers", "0", "--out", str(out), *map(str, flags)])
    return json.loads(out.read_text())


def test_one_prompt_per_class_gives_today_s_numbers_exactly(stage1_ckpt, demo_root, tmp_path):
    today = evaluate_zero_shot(stage1_ckpt, demo_root, tmp_path)
    file = tmp_path / "prompts.json"
    file.write_text(json.dumps(today["prompts"]))  # the hand-written prompts, recorded
    assert today["prompts"] == {c: [p] for c, p in zip(cleft.FIVE_CLASSES,
                                                       cleft.class_prompts(cleft.FIVE_CLASSES))}
    from_file = evaluate_zero_shot(stage1_ckpt, demo_root, tmp_path, "--prompts", file)
    assert from_file["results"] == today["results"]  # equal, not approximately
    # several prompts per class: other numbers, and the results say which prompts they came from
    ensemble = {c: [p, p.replace("a patient with", "findings of")] for c, p in
                zip(cleft.FIVE_CLASSES, cleft.class_prompts(cleft.FIVE_CLASSES))}
    file.write_text(json.dumps(ensemble))
    several = evaluate_zero_shot(stage1_ckpt, demo_root, tmp_path, "--prompts", file)
    assert several["prompts"] == ensemble
    assert several["results"]["zeroshot"] != today["results"]["zeroshot"]


@pytest.mark.parametrize("content, message", [
    ({"Edema": ["x"]}, "give each class its prompts"),
    ({"Edema": []}, "is not a JSON object of class -> list of prompts"),
    ("not json", "cannot read --prompts"),
    (None, "no --prompts file at"),  # ';'-separated prompts are --data csv's
])
def test_a_wrong_prompts_file_is_one_line(content, message, stage1_ckpt, demo_root, tmp_path):
    file = tmp_path / "prompts.json"
    if content is not None:
        file.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit) as stop:
        evaluate_zero_shot(stage1_ckpt, demo_root, tmp_path, "--prompts", file)
    assert message in str(stop.value) and "\n" not in str(stop.value)


def test_predict_takes_the_file_s_classes_and_their_ensembles(stage1_ckpt, demo_root, tmp_path):
    prompts = {"Edema": ["this is a chest x ray of a patient with edema", "pulmonary edema"],
               "Cardiomegaly": "this is a chest x ray of a patient with cardiomegaly"}
    file = tmp_path / "prompts.json"
    file.write_text(json.dumps(prompts))
    images = sorted((demo_root / "valid").rglob("*.jpg"))[:3]
    out = tmp_path / "preds.csv"
    predict.main(["--ckpt", str(stage1_ckpt), "--prompts", str(file), "--out", str(out),
                  *map(str, images)])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "prediction", "Edema", "Cardiomegaly"]
    model = cleft.load_model(stage1_ckpt).eval()
    with torch.no_grad():
        classes = predict.ensemble_features(model, [prompts["Edema"], [prompts["Cardiomegaly"]]])
        dataset = evaluate.XrayDataset.as_trained([(str(images[0]), 0)],
                                                  cleft.load_config(stage1_ckpt))
        image = model.encode_image(dataset[(0, None)][0][None])
        expected = predict.zero_shot_probabilities(model, image, classes)[0]
    assert float(rows[0]["Edema"]) == pytest.approx(expected[0].item(), abs=1e-6)
    with pytest.raises(SystemExit) as stop:  # 'no <class>' pairs are hand-written
        predict.main(["--ckpt", str(stage1_ckpt), "--prompts", str(file), "--multi-label",
                      *map(str, images)])
    assert "--multi-label" in str(stop.value)
