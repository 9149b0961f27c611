"""predict.py: the same zero-shot rule as evaluate.py, exact score maps, unreadable files left out,
a prompt file's classes, and multi-label probabilities."""

import csv
import shutil
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import cleft
import evaluate
import predict
from checkpoints import save_prompt
from image_io import load_image
from prompt_tune import PromptConfig, PromptLearner


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def test_set(demo_root, stage1_ckpt):
    """evaluate.py's 5x200 data on the small demo, and a CSV of its test images."""
    cfg = cleft.parse_config(["--ckpt", str(stage1_ckpt), "--data-root", str(demo_root),
                              "--num-workers", "0"], evaluate.EvalConfig)
    return cfg, evaluate.load_data(cfg)


def write_image_csv(path, images):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("image",), *[(image,) for image in images]])
    return path


@pytest.mark.parametrize("learned", [False, True])
def test_argmax_gives_evaluate_zero_shot_accuracy(test_set, stage1_ckpt, tmp_path, learned):
    """The argmax of predict.py's probabilities on the 5x200 images scores exactly evaluate.py's
    zero-shot accuracy, with the hand-written prompts and with a learned context."""
    cfg, data = test_set
    model = cleft.load_model(stage1_ckpt).eval()
    flags = []
    if learned:
        torch.manual_seed(0)  # a context unlike the caption, so the two prompts differ
        learner = PromptLearner(model, data.class_texts, context_length=12)
        save_prompt(tmp_path / "p.safetensors", learner.context, data.classes, PromptConfig())
        cfg.prompt = str(tmp_path / "p.safetensors")
        flags = ["--prompt", cfg.prompt]
    expected = evaluate.zero_shot(model, data, cfg, torch.device("cpu"), nullcontext())["acc"]
    images = write_image_csv(tmp_path / "test.csv", [path for path, _ in data.splits["test"]])
    predict.main(["--ckpt", str(stage1_ckpt), str(images), "--out", str(tmp_path / "p.csv"),
                  *flags])
    rows = read_rows(tmp_path / "p.csv")
    labels = [data.classes[label] for _, label in data.splits["test"]]
    assert [row["image"] for row in rows] == [path for path, _ in data.splits["test"]]
    accuracy = 100 * float(np.mean([row["prediction"] == y for row, y in zip(rows, labels)]))
    assert accuracy == expected
    for row in rows:  # the probabilities of each image sum to 1, written with all their digits
        assert sum(float(row[c]) for c in data.classes) == pytest.approx(1, abs=1e-6)


def test_maps_sum_to_the_cosine(test_set, stage1_ckpt):
    cfg, data = test_set
    model = cleft.load_model(stage1_ckpt).eval()
    images = torch.stack([load_image(path, 112) for path, _ in data.splits["test"][:6]])
    class_features = predict.class_features(model, cleft.class_prompts(data.classes))  # (C, D)
    patches, other, cosine = predict.score_maps(model, images, class_features)
    with torch.no_grad():
        expected = model.encode_image(images) @ class_features.T  # (6, C)
    assert patches.shape == (6, 5, 8, 8)  # 112 px in patches of 14
    torch.testing.assert_close(patches.sum(dim=(2, 3)) + other, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(cosine, expected, rtol=0, atol=1e-5)
    assert (patches > 0).any() and (patches < 0).any()  # terms of both signs: a signed map


def test_unreadable_file_is_reported_and_the_rest_predicted(test_set, stage1_ckpt, tmp_path,
                                                            capsys):
    cfg, data = test_set
    folder = tmp_path / "mine"
    folder.mkdir()
    for k, (path, _) in enumerate(data.splits["test"][:3]):
        shutil.copy(path, folder / f"x{k}.jpg")
    (folder / "x1.jpg").write_bytes((folder / "x1.jpg").read_bytes()[:200])  # truncated
    predict.main(["--ckpt", str(stage1_ckpt), str(folder), "--out", str(tmp_path / "p.csv"),
                  "--heatmap", str(tmp_path / "maps")])
    err = capsys.readouterr().err
    assert err.count(f"warning: skipping unreadable image {folder / 'x1.jpg'} (") == 1
    assert [row["image"] for row in read_rows(tmp_path / "p.csv")] == [
        str(folder / "x0.jpg"), str(folder / "x2.jpg")]
    saved = np.load(tmp_path / "maps" / "00002_x2.npz")
    assert saved["patches"].shape == (5, 8, 8) and list(saved["classes"]) == data.classes
    np.testing.assert_allclose(saved["patches"].sum(axis=(1, 2)) + saved["other"],
                               saved["cosine"], atol=1e-5)
    assert (tmp_path / "maps" / "00000_x0.png").exists()
    assert not (tmp_path / "maps" / "00001_x1.npz").exists()


def test_a_prompt_file_brings_its_classes(test_set, stage1_ckpt, tmp_path):
    cfg, data = test_set
    model = cleft.load_model(stage1_ckpt).eval()
    learner = PromptLearner(model, ["edema", "cardiomegaly"], context_length=8)
    save_prompt(tmp_path / "p.safetensors", learner.context, ["Edema", "Cardiomegaly"],
                PromptConfig())
    images = write_image_csv(tmp_path / "in.csv", [p for p, _ in data.splits["test"][:4]])
    predict.main(["--ckpt", str(stage1_ckpt), "--prompt", str(tmp_path / "p.safetensors"),
                  str(images), "--out", str(tmp_path / "p.csv"), "--classes", "Ignored,Names"])
    rows = read_rows(tmp_path / "p.csv")
    assert list(rows[0]) == ["image", "prediction", "Edema", "Cardiomegaly"]
    assert {row["prediction"] for row in rows} <= {"Edema", "Cardiomegaly"}


def test_multi_label_scores_each_class_on_its_own(test_set, stage1_ckpt, tmp_path):
    """Each class's probability is that of '... with <class>' against '... with no <class>':
    sigmoid(scale * (cos(image, with) - cos(image, without))), computed here from the model."""
    cfg, data = test_set
    paths = [p for p, _ in data.splits["test"][:8]]
    images = write_image_csv(tmp_path / "in.csv", paths)
    predict.main(["--ckpt", str(stage1_ckpt), str(images), "--multi-label",
                  "--out", str(tmp_path / "p.csv")])
    rows = read_rows(tmp_path / "p.csv")
    probabilities = np.array([[float(row[c]) for c in data.classes] for row in rows])  # (8, 5)
    model = cleft.load_model(stage1_ckpt).eval()
    with torch.no_grad():
        views = model.encode_image(torch.stack([load_image(p, 112) for p in paths]))  # (8, D)
        present = model.encode_text(cleft.class_prompts(data.classes))  # (5, D)
        absent = model.encode_text(cleft.class_prompts(["no " + c for c in data.classes]))
        expected = torch.sigmoid(model.logit_scale.exp() * (views @ present.T - views @ absent.T))
    assert np.abs(expected.numpy() - 0.5).max() > 0.01  # the opposite side would differ
    np.testing.assert_allclose(probabilities, expected.numpy(), atol=2e-4)  # the CSV's 4 places
    assert not np.allclose(probabilities.sum(axis=1), 1, atol=1e-2)  # not one class of all
    for row, p in zip(rows, probabilities):  # the prediction lists the classes above one half
        assert row["prediction"] == ";".join(c for c, v in zip(data.classes, p) if v > 0.5)


def test_no_images_is_one_clear_error(stage1_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="no images in"):
        predict.main(["--ckpt", str(stage1_ckpt), str(tmp_path)])


def test_a_missing_input_is_named_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit) as error:
        predict.main(["--ckpt", str(tmp_path / "no-run"), str(tmp_path / "scans")])
    assert str(error.value) == (f"error: {tmp_path / 'scans'} does not exist: pass existing image "
                                "files, folders or CSVs.")
