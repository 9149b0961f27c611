"""evaluate.py: the 5x200 builder, data-efficiency subsets, the learned prompt in zero-shot, the
RSNA / EMBED / CSV readers, and a full --task all run on the demo, with intervals and seeds."""

import csv
import dataclasses
import json
from contextlib import nullcontext
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cleft
import evaluate
import mammography
import prompt_tune
import tables
from checkpoints import save_prompt

ROOT = Path(__file__).resolve().parents[1]


def config(*args):
    return cleft.parse_config(list(args), evaluate.EvalConfig)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def chexpert_row(patient, view="Frontal", **labels):
    row = {c: "" for c in cleft.CHEXPERT_COLUMNS}
    row.update(
        {
            "Path": f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/"
            f"view1_{view.lower()}.jpg",
            "Frontal/Lateral": view,
            **{k.replace("_", " "): v for k, v in labels.items()},
        }
    )
    return row


def test_chexpert_path_for_a_new_user(tmp_path, capsys):
    """`--data chexpert` as in stages 1 and 2; --per-class for a small folder; a supplied
    chexpert_5x200.csv with rows that break the rule is used, and the dropped rows are counted."""
    rows, patient = [], 0
    for name in cleft.FIVE_CLASSES:
        for i in range(30):
            patient += 1
            rows.append(chexpert_row(patient, **{name.replace(" ", "_"): "1.0"}))
    write_rows(tmp_path / "train.csv", rows, cleft.CHEXPERT_COLUMNS)
    with pytest.raises(SystemExit, match=r"lower the count per class \(--per-class\)"):
        evaluate.load_data(config("--data", "chexpert", "--data-root", str(tmp_path),
                                  "--build-5x200"))
    data = evaluate.load_data(config("--data", "chexpert", "--data-root", str(tmp_path),
                                     "--build-5x200", "--per-class", "10"))
    assert sorted(label for _, label in data.splits["test"]) == sorted(list(range(5)) * 10)
    supplied = read_rows(tmp_path / "chexpert_5x200.csv")
    supplied[0]["Atelectasis"], supplied[1]["Fracture"] = "-1.0", "1.0"  # break the rule twice
    write_rows(tmp_path / "chexpert_5x200.csv", supplied, cleft.CHEXPERT_COLUMNS)
    capsys.readouterr()
    data = evaluate.load_data(config("--data", "chexpert", "--data-root", str(tmp_path)))
    assert len(data.splits["test"]) == 48
    assert "note: 2 rows of chexpert_5x200.csv break the 5x200 rule" in capsys.readouterr().out


def test_probe_schedule_warms_up_then_decays_and_spares_biases(monkeypatch):
    """Linear probe / fine-tune: stage 1's warm-up (a tenth of the steps) and cosine, AdamW with
    no weight decay on biases."""
    cfg, head, seen, lrs = config("--max-steps", "50"), torch.nn.Linear(4, 2), [], []
    real = evaluate.make_optimizer
    monkeypatch.setattr(evaluate, "make_optimizer", lambda *a, **k: seen.append(real(*a, **k))
                        or seen[-1])

    def batch_loss(step):
        lrs.append(seen[0].param_groups[0]["lr"])
        return head(torch.ones(1, 4)).sum()

    evaluate.fit(head, batch_loss, lambda: 0.0, cfg, "test")
    assert lrs == pytest.approx([cleft.get_lr(step, 5e-4, 5, 50) for step in range(50)])
    assert max(lrs) == pytest.approx(5e-4) and lrs.index(max(lrs)) == 4 and lrs[-1] < 1e-6
    decayed, plain = (group["params"] for group in seen[0].param_groups)
    assert decayed == [head.weight] and plain == [head.bias]


def test_build_5x200_writes_the_rule_and_excludes_its_patients(tmp_path):
    rows, patient = [], 0
    for name in cleft.FIVE_CLASSES:
        for i in range(230):
            patient += 1
            rows.append(
                chexpert_row(
                    patient, **{name.replace(" ", "_"): "1.0", "No_Finding": "", "Fracture": "0.0"}
                )
            )
    for bad in [
        dict(Edema="1.0", Atelectasis="-1.0"),
        dict(Edema="1.0", Cardiomegaly="1.0"),
        dict(Edema="1.0", Pneumonia="1.0"),
    ]:
        for i in range(50):
            patient += 1
            rows.append(chexpert_row(patient, **bad))
    rows += [chexpert_row(p, view="Lateral", Edema="1.0") for p in range(patient + 1, patient + 50)]
    write_rows(tmp_path / "train.csv", rows, cleft.CHEXPERT_COLUMNS)
    cfg = config("--data", "chexpert5x200", "--data-root", str(tmp_path))
    with pytest.raises(SystemExit, match="pass --build-5x200"):
        evaluate.load_data(cfg)
    cfg.build_5x200 = True
    data = evaluate.load_data(cfg)
    with open(tmp_path / "chexpert_5x200.csv", newline="") as f:
        built = list(csv.DictReader(f))
    assert (
        len(built) == 1000
        and [sum(cleft.five_class_index(r) == c for r in built) for c in range(5)] == [200] * 5
    )
    assert all(r["Frontal/Lateral"] == "Frontal" and "-1.0" not in r.values() for r in built)
    assert len(data.splits["test"]) == 1000
    test_patients = {cleft.patient_of(p) for p, _ in data.splits["test"]}
    assert not test_patients & {
        cleft.patient_of(p) for p, _ in data.splits["train"] + data.splits["val"]
    }
    # linear probe / fine-tune train on rows positive for exactly one of the five (not the stricter
    # 5x200 rule):
    # the 150 unused single-class rows, Edema with uncertain Atelectasis, Edema with Pneumonia; not
    # Edema + Cardiomegaly
    assert len(data.splits["train"]) + len(data.splits["val"]) == 150 + 50 + 50
    assert data.prompts[4] == "this is a chest x ray of a patient with pleural effusion"


def test_data_pct_subsets_are_seeded_and_nested():
    records = [(f"img{i}.jpg", i % 3) for i in range(1000)]
    one, ten, full = (evaluate.subset(records, p, seed=0) for p in (0.01, 0.1, 1.0))
    assert (len(one), len(ten), full) == (10, 100, records)
    assert set(one) <= set(ten) and one == evaluate.subset(records, 0.01, seed=0)
    assert evaluate.subset(records, 0.01, seed=1) != one
    assert len(evaluate.subset(records[:20], 0.01, seed=0)) == 1  # never empty


def approx_record(record):  # each value of a results dict (numbers, intervals) to pytest.approx
    return {key: pytest.approx(value) for key, value in record.items()}


def test_zero_shot_with_a_prompt_file_uses_the_learned_context(demo_root, stage1_ckpt, tmp_path):
    cfg = config("--ckpt", str(stage1_ckpt), "--data-root", str(demo_root), "--num-workers", "0")
    data = evaluate.load_data(cfg)
    model = cleft.load_model(stage1_ckpt).eval()
    device, autocast = torch.device("cpu"), torch.no_grad()
    hand_written = evaluate.zero_shot(model, data, cfg, device, autocast)
    # a context initialised from the whole caption is the hand-written prompt: same result through
    # the file
    learner = prompt_tune.PromptLearner(
        model, data.class_texts, context_length=len(cleft.CAPTION_PREFIX.strip())
    )
    save_prompt(tmp_path / "init.safetensors", learner.context, data.classes, cfg)
    cfg.prompt = str(tmp_path / "init.safetensors")
    assert evaluate.zero_shot(model, data, cfg, device, autocast) == approx_record(hand_written)
    with torch.no_grad():  # a different context gives a different classifier
        learner.context.copy_(torch.randn_like(learner.context))
    save_prompt(tmp_path / "noise.safetensors", learner.context, data.classes, cfg)
    cfg.prompt = str(tmp_path / "noise.safetensors")
    assert evaluate.zero_shot(model, data, cfg, device, autocast) != approx_record(hand_written)


def test_the_zero_shot_accuracy_logged_in_training_is_evaluate_s(stage1_ckpt, demo_root):
    """Stage 1's validation logs the zero-shot accuracy that evaluate.py reports for the same
    checkpoint on the same images. The classes are given 10, 5, 3, 2 and 1 images, so even a model
    that predicts one class for every image scores a different accuracy for each class it picks."""
    stage1 = dataclasses.replace(cleft.load_config(stage1_ckpt), num_workers=0)
    splits = cleft.load_splits(stage1)
    five_by_ten = splits["test"]  # the demo's 5x200 set, 10 images per class
    splits["test"] = [record for label, count in enumerate((10, 5, 3, 2, 1))
                      for record in [r for r in five_by_ten if r[1] == label][:count]]
    device = torch.device("cpu")
    _, val_loader, test_loader = cleft.make_loaders(splits, stage1, device, world_size=1)
    model = cleft.load_model(stage1_ckpt)
    logged = cleft.validate(model, val_loader, test_loader, nullcontext(), stage1.batch_size)
    cfg = config("--ckpt", str(stage1_ckpt), "--data-root", str(demo_root), "--num-workers", "0")
    data = evaluate.load_data(cfg)
    assert data.splits["test"] == five_by_ten  # both read the same (image, class) test set
    data.splits["test"] = splits["test"]
    evaluated = evaluate.zero_shot(model.eval(), data, cfg, device, nullcontext())
    assert len(splits["test"]) == 21
    assert logged["zero_shot_acc"] == pytest.approx(evaluated["acc"], abs=1e-4)  # an fp32 mean


def test_rsna_split_matches_scikit_learn():
    # golden value: train_test_split(range(23), test_size=0.3, random_state=0), then the rest halved
    # the same
    # way, as GLoRIA/MGCA do (computed once with scikit-learn 1.x; it is not a dependency of this
    # project)
    split = evaluate.rsna_split([f"p{i:02d}" for i in range(23)])
    index = lambda ids: [int(p[1:]) for p in ids]
    assert index(split["train"]) == [22, 16, 8, 6, 17, 4, 2, 5, 18, 9, 7, 19, 3, 0, 15, 12]
    assert index(split["val"]) == [13, 21, 10, 14] and index(split["test"]) == [11, 1, 20]


def test_rsna_reader(tmp_path):
    (tmp_path / "stage_2_train_images").mkdir()
    rows = []
    for i in range(40):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(
            tmp_path / "stage_2_train_images" / f"id{i}.png"
        )
        rows.append(
            {"patientId": f"id{i}", "x": "", "y": "", "width": "", "height": "", "Target": "0"}
        )
        if i % 4 == 0:  # positive patients have one row per box, the first box may be listed as 0
            rows.append(
                {
                    "patientId": f"id{i}",
                    "x": "1",
                    "y": "1",
                    "width": "2",
                    "height": "2",
                    "Target": "1",
                }
            )
    write_rows(
        tmp_path / "stage_2_train_labels.csv",
        rows,
        ["patientId", "x", "y", "width", "height", "Target"],
    )
    data = evaluate.load_data(
        config("--data", "rsna", "--data-root", str(tmp_path), "--rsna-split", "gloria"))
    assert data.prompts == [cleft.CAPTION_PREFIX + "no finding", cleft.CAPTION_PREFIX + "pneumonia"]
    everything = data.splits["train"] + data.splits["val"] + data.splits["test"]
    assert (len(data.splits["train"]), len(data.splits["val"]), len(data.splits["test"])) == (
        28,
        6,
        6,
    )
    assert sorted(everything) == sorted(
        (str(tmp_path / "stage_2_train_images" / f"id{i}.png"), int(i % 4 == 0)) for i in range(40)
    )


def rsna_release(root, patients=26684, positive=6012):
    """stage_2_train_labels.csv with the release's counts (a positive patient has several box rows)
    and an empty image file per patient (the split does not read them)."""
    (root / "stage_2_train_images").mkdir()
    rows = []
    for i in range(patients):
        (root / "stage_2_train_images" / f"p{i:05d}.png").touch()
        for box in range(2 if i < positive else 1):
            rows.append({"patientId": f"p{i:05d}", "x": box, "y": 1, "width": 2, "height": 2,
                         "Target": int(i < positive)})
    write_rows(root / "stage_2_train_labels.csv", rows,
               ["patientId", "x", "y", "width", "height", "Target"])


def test_rsna_balanced_subset_has_the_papers_sizes(tmp_path):
    rsna_release(tmp_path)
    data = evaluate.load_data(config("--data", "rsna", "--data-root", str(tmp_path)))
    parts = {name: data.splits[name] for name in ("train", "val", "test")}
    assert len(parts["train"]) + len(parts["val"]) == 8486 and len(parts["test"]) == 3538
    for records in parts.values():  # 1:1 in each part
        assert 2 * sum(label for _, label in records) == len(records)
    patients = [Path(path).stem for records in parts.values() for path, _ in records]
    assert len(patients) == len(set(patients))  # no patient in two parts
    again = evaluate.load_data(config("--data", "rsna", "--data-root", str(tmp_path)))
    assert again.splits == data.splits  # seeded


def test_rsna_uses_the_public_split_files_when_present(tmp_path):
    rsna_release(tmp_path, patients=100, positive=20)
    train = [{"patientId": f"p{i:05d}", "Target": int(i < 20)} for i in range(10, 40)]
    test = [{"patientId": f"p{i:05d}", "Target": int(i < 20)} for i in range(10)]
    test += [{"patientId": f"p{i:05d}", "Target": 0} for i in range(40, 50)]
    write_rows(tmp_path / "stage_2_train_balance.csv", train, ["patientId", "Target"])
    write_rows(tmp_path / "stage_2_test_balance.csv", test, ["patientId", "Target"])
    data = evaluate.load_data(config("--data", "rsna", "--data-root", str(tmp_path)))
    stems = lambda name: sorted(Path(path).stem for path, _ in data.splits[name])
    assert stems("test") == sorted(r["patientId"] for r in test)
    assert sorted(stems("train") + stems("val")) == sorted(r["patientId"] for r in train)
    assert len(stems("val")) == 3  # a tenth of each class: 1 of 10 positives, 2 of 20 negatives


def embed_tables(root, patients):
    """EMBED_OpenData_clinical.csv and _metadata.csv in the public column layout: one exam per
    patient, side B (both) for odd patients, two 2D images and a C-view per patient."""
    clinical, metadata = [], []
    for p in range(patients):
        clinical.append({"empi_anon": f"e{p}", "acc_anon": f"a{p}", "side": "B" if p % 2 else "L",
                         "asses": "NBSMAPK"[p % 7], "tissueden": str(1 + p % 5) + ".0"})
        for side in "LR":
            metadata.append({"empi_anon": f"e{p}", "acc_anon": f"a{p}",
                             "ImageLateralityFinal": side, "FinalImageType": "2D",
                             "anon_dicom_path": f"/images/{p}{side}.dcm",
                             "png_path": f"png/{p}{side}.png"})
        metadata.append({**metadata[-1], "FinalImageType": "cview"})
    write_rows(root / "EMBED_OpenData_clinical.csv", clinical, list(clinical[0]))
    write_rows(root / "EMBED_OpenData_metadata.csv", metadata, list(metadata[0]))


def test_embed_reader(tmp_path):
    embed_tables(tmp_path, 30)
    parts = mammography.embed_records(tmp_path)
    records = [r for part in parts.values() for r in part]
    assert len(records) == 45  # 15 patients with both sides (B) + 15 with the left only; no C-view
    assert {"image": str(tmp_path / "png/3L.png"), "patient": "e3", "birads": "M",
            "density": "4"} in records
    assert sum("density" in r for r in records) == 45 - 9  # density 5 (male) left out
    assert mammography.BIRADS["B"] == "birads score 2: benign finding"  # the public code's wording
    assert mammography.DENSITY["1"] == "breast tissue density 1: almost entirely fat"


def test_embed_split_balanced_test_sets_and_export(tmp_path):
    embed_tables(tmp_path, 10000)
    parts = mammography.embed_records(tmp_path)
    patients = {name: {r["patient"] for r in part} for name, part in parts.items()}
    assert [round(len(patients[n]) / 10000, 2) for n in ("train", "val", "rest")] == [0.7, 0.1, 0.2]
    assert not (patients["train"] & patients["val"] or patients["rest"] & (patients["train"]
                                                                           | patients["val"]))
    export = tmp_path / "out" / "birads.csv"
    for task, classes, per_class in [("birads", 7, 200), ("density", 4, 500)]:
        data = evaluate.load_data(config("--data", f"embed-{task}", "--data-root", str(tmp_path),
                                         "--export", str(export)))
        test = data.splits["test"]
        assert sorted(label for _, label in test) == sorted(list(range(classes)) * per_class)
        test_patients = {"e" + Path(path).stem[:-1] for path, _ in test}
        assert test_patients <= patients["rest"]  # drawn from the held-back 20% only
        assert data.splits == evaluate.load_data(config(
            "--data", f"embed-{task}", "--data-root", str(tmp_path))).splits  # seeded
        rows = read_rows(export)
        assert {r["split"] for r in rows} == {"train", "val"} and len(rows) == sum(
            len(parts[n]) for n in ("train", "val"))
        assert not {"e" + Path(r["image"]).stem[:-1] for r in rows} & patients["rest"]
        assert all((export.parent / r["image"]).resolve() == (tmp_path / "png" / Path(r["image"])
                                                              .name).resolve() for r in rows[:5])
    # patients 3, 38, 73, ... (p % 35 == 3): BI-RADS M and density 4
    row = next(r for r in rows if int(Path(r["image"]).stem[:-1]) % 35 == 3)
    assert row["text"] == ("this is a breast 2d full-field digital mammogram of a patient with "
                           "birads score 5: highly suggestive of malignancy, breast tissue "
                           "density 4: extremely dense")
    assert row["label"] == "breast tissue density 4: extremely dense"
    assert any(r["label"] == "" for r in rows)  # an image without a density (5) has no label


def test_csv_reader(tmp_path):
    rows = [
        {
            "image": f"{i}.png",
            "label": "cat" if i % 2 else "dog",
            "split": ["train", "val", "test"][i % 3],
            "text": f"report {i}",
        }
        for i in range(30)
    ]
    write_rows(tmp_path / "data.csv", rows, ["image", "label", "split", "text"])
    cfg = config(
        "--data",
        "csv",
        "--data-root",
        str(tmp_path / "data.csv"),
        "--classes",
        "dog,cat",
        "--prompts",
        "a photo of a dog; a photo of a cat",
    )
    data = evaluate.load_data(cfg)
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [10, 10, 10]
    assert data.splits["test"][0] == (str(tmp_path / "2.png"), 0) and data.prompts == [
        "a photo of a dog",
        "a photo of a cat",
    ]
    assert data.pairs[0] == (str(tmp_path / "2.png"), "report 2")
    cfg.prompts = "only one"
    with pytest.raises(SystemExit, match="one prompt per class"):
        evaluate.load_data(cfg)


def test_every_task_on_the_demo_fills_the_table(demo_root, stage1_ckpt, tmp_path):
    prompt = tmp_path / "prompt.safetensors"
    learner = prompt_tune.PromptLearner(
        cleft.load_model(stage1_ckpt), [c.lower() for c in cleft.FIVE_CLASSES], 39
    )
    save_prompt(prompt, learner.context, cleft.FIVE_CLASSES, prompt_tune.PromptConfig())
    out = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "--ckpt",
            str(stage1_ckpt),
            "--prompt",
            str(prompt),
            "--data-root",
            str(demo_root),
            "--task",
            "all",
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--num-workers",
            "0",
            "--data-pct",
            "0.5",
            "--seeds",
            "0,1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"zeroshot", "linear", "finetune", "retrieval"}
    assert results["zeroshot"].keys() == {"acc", "acc_ci95", "auc", "auc_ci95"}
    for task in ("linear", "finetune"):  # two seeds: their mean, sd, values and the interval
        assert results[task].keys() == {f"{m}{s}" for m in ("acc", "auc")
                                        for s in ("", "_ci95", "_sd", "_per_seed")}
        assert np.mean(results[task]["acc_per_seed"]) == pytest.approx(results[task]["acc"])
    recalls = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert results["retrieval"].keys() == {f"{r}{s}" for r in recalls for s in ("", "_ci95")}
    for task_results in results.values():  # every interval holds its value
        for key, (low, high) in ((k, v) for k, v in task_results.items() if k.endswith("_ci95")):
            value = task_results[key[:-len("_ci95")]]
            assert 0 <= low <= value <= high <= 100, (key, value, low, high)
    assert report["n_images"]["test"] == 50 and report["data_pct"] == 0.5
    assert report["seeds"] == [0, 1]
    table_row = [line for line in result.stdout.splitlines() if line.startswith("| CLEFT")][0]
    cells = table_row.strip("|").split("|")[1:]  # every column of Table 1 is filled
    assert len(cells) == 6
    zs_acc = results["zeroshot"]["acc"]
    low, high = results["zeroshot"]["acc_ci95"]
    assert low < zs_acc < high  # 50 test images: an interval of some width
    assert cells[0].strip() == f"{zs_acc:.2f} ({low:.2f}-{high:.2f})"
    lp_acc = results["linear"]
    assert cells[2].strip().startswith(f"{lp_acc['acc']:.2f} ± {lp_acc['acc_sd']:.2f} (")
    assert "95% bootstrap intervals" in result.stdout


def test_fine_tuning_trains_the_tower_in_training_mode(demo_root, stage1_ckpt, monkeypatch):
    """The checkpoint is loaded in eval mode; the fine-tuned copy of its image tower and the head
    are in training mode at every step (validation switches to eval and back), and the loaded
    model itself is left as it was."""
    cfg = config("--ckpt", str(stage1_ckpt), "--data-root", str(demo_root), "--num-workers", "0",
                 "--max-steps", "4", "--eval-every", "2")
    data = evaluate.load_data(cfg)
    model = cleft.load_model(stage1_ckpt).eval().requires_grad_(False)
    modes, real_fit = [], evaluate.fit

    def fit(module, batch_loss, val_loss, cfg, desc):
        def checked_batch_loss(step):
            modes.append(all(m.training for m in module.modules()))
            return batch_loss(step)

        return real_fit(module, checked_batch_loss, val_loss, cfg, desc)

    monkeypatch.setattr(evaluate, "fit", fit)
    evaluate.fine_tune(model, data, cfg, torch.device("cpu"), nullcontext(),
                       data.splits["train"][:16])
    assert modes == [True] * 4
    assert not any(m.training for m in model.modules())


def test_an_auc_with_a_class_absent_from_the_test_set_is_n_a(recwarn):
    """Two classes, the test set holds images of the first alone: the AUC is undefined, so the
    JSON holds null with the reason, the table 'n/a' and the reason once; no NumPy warning."""
    probabilities = np.random.default_rng(0).dirichlet([1, 1], size=20).astype(np.float32)
    result = evaluate.scores([probabilities], np.zeros(20, dtype=int), ["normal", "pneumonia"])
    assert result["acc"] == pytest.approx(100 * (probabilities.argmax(1) == 0).mean())
    assert result["auc"] is None and result["auc_undefined"] == "no test image of ['pneumonia']"
    report = {"dataset": "csv", "checkpoint": "run/best", "prompt": None, "data_pct": 1.0,
              "seeds": [0], "results": {"zeroshot": result, "linear": result}}
    table = tables.markdown_table(report).splitlines()
    assert table[3].split(" | ")[2:5] == ["n/a", tables.cell(result, "acc"), "n/a"]
    assert table[4:] == ["n/a: AUC is undefined, no test image of ['pneumonia']"]
    # every class present, but some resamples of 4 images hold one class alone: still no warning
    three = np.random.default_rng(0).dirichlet([1, 1, 1], size=4).astype(np.float32)
    assert evaluate.scores([three], np.array([0, 1, 2, 0]), ["a", "b", "c"])["auc"] is not None
    assert not recwarn.list


def test_each_seed_trains_on_its_own_subset(demo_root, stage1_ckpt, tmp_path, monkeypatch):
    """--seeds 0,1 at 50%: each seed's linear probe trains on subset(train, 0.5, seed), and the two
    subsets differ (the spread over seeds includes the choice of images)."""
    trained_on, real_linear_probe = [], evaluate.linear_probe

    def linear_probe(model, data, cfg, device, autocast, train):
        trained_on.append(train)
        return real_linear_probe(model, data, cfg, device, autocast, train)

    monkeypatch.setattr(evaluate, "linear_probe", linear_probe)
    evaluate.main(["--ckpt", str(stage1_ckpt), "--data-root", str(demo_root), "--task", "linear",
                   "--max-steps", "2", "--eval-every", "2", "--num-workers", "0", "--data-pct",
                   "0.5", "--seeds", "0,1", "--out", str(tmp_path / "results.json")])
    train = evaluate.load_data(config("--data-root", str(demo_root))).splits["train"]
    assert trained_on == [evaluate.subset(train, 0.5, 0), evaluate.subset(train, 0.5, 1)]
    assert trained_on[0] != trained_on[1]
