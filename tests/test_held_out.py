"""Held-out sets stay held out (held_out.py): stage 1 records its patients in each checkpoint,
stage 2 validates on exactly the ones stage 1 held out, and a test set whose patients stage 1
trained on stops stage 2 in one line unless --allow-overlap."""

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoints
import cleft
import demo
import evaluate
import held_out
import prompt_tune
from conftest import stage1_flags
from held_out import patient_of

STAGE_1 = ["--max-steps", 2, "--eval-every", 2, "--batch-size", 8, "--num-workers", 0]
STAGE_2 = ["--max-steps", 2, "--eval-every", 2, "--warmup-steps", 1, "--num-workers", 0]


def stage_2_config(*flags):
    return cleft.parse_config(list(map(str, flags)), prompt_tune.PromptConfig)


def patients(pairs):
    return {patient_of(image) for image, _ in pairs}


def test_patient_of_chexpert_mimic_and_plain_paths(tmp_path, monkeypatch):
    assert patient_of("CheXpert-v1.0-small/train/patient00042/study1/view1_frontal.jpg") == (
        "patient00042")
    assert patient_of("/data/chexpert-plus/PNG/train/patient00042/study2/view1.png") == (
        "patient00042")
    assert patient_of("/data/mimic-cxr-jpg/files/p10/p10000032/s50414267/02aa804e.jpg") == (
        "p10000032")
    monkeypatch.chdir(tmp_path)
    image = str(tmp_path / "pairs" / "images" / "a.png")
    # stage 1 joins a CSV's folder and its row; evaluate.py joins a data root and the row
    assert patient_of(str(Path("pairs/pairs.csv").parent / "images/a.png")) == image
    assert patient_of(str(tmp_path / "pairs" / "images" / "a.png")) == image
    assert patient_of("pairs/x/../images/./a.png") == image
    assert patient_of("p10/p1000/a.png") == str(tmp_path / "p10/p1000/a.png")  # not 8 digits


def test_the_record_round_trips_and_is_sealed(stage1_ckpt, tmp_path, capsys):
    stage1 = cleft.load_splits(cleft.load_config(stage1_ckpt))
    record = held_out.read_record(stage1_ckpt)
    for name in ("train", "val"):
        expected = held_out.patient_hashes([image for image, _ in stage1[name]]).unique()
        assert record[name].dtype == torch.int64 and torch.equal(record[name], expected)
    assert not torch.isin(record["val"], record["train"]).any()
    assert "split.safetensors" in json.loads((stage1_ckpt / "manifest.json").read_text())
    with safe_open(str(stage1_ckpt / "split.safetensors"), framework="pt") as f:
        assert f.metadata()["val_fraction"] == "0.05"
    damaged = tmp_path / "damaged"
    shutil.copytree(stage1_ckpt, damaged)
    data = bytearray((damaged / "split.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last hash
    (damaged / "split.safetensors").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="split.safetensors .*is damaged"):
        held_out.read_record(damaged)


def test_a_resumed_run_keeps_the_patients_it_trained_on_before(tmp_path):
    """--resume with other data: the record still names the patients the earlier steps saw, and
    none of them counts as held out."""
    pairs = lambda *numbers: [(f"train/patient{n:05d}/study1/view1.jpg", "") for n in numbers]
    last = tmp_path / "last"
    last.mkdir()
    (last / "model.safetensors").write_bytes(b"")  # what makes a folder a checkpoint
    save_file({"train": held_out.patient_hashes([p for p, _ in pairs(1, 2)]),
               "val": held_out.patient_hashes([])}, last / "split.safetensors")
    cfg = SimpleNamespace(out_dir=str(tmp_path), data="chexpert", data_root="", val_fraction=0.05,
                          val_size=0)
    record = held_out.patient_record({"train": pairs(3), "val": pairs(2, 4)}, cfg)["tensors"]
    hashes = lambda *numbers: held_out.patient_hashes([p for p, _ in pairs(*numbers)]).sort()[0]
    assert torch.equal(record["train"], hashes(1, 2, 3))
    assert torch.equal(record["val"], hashes(4))


def test_stage_2_validates_on_stage_1s_validation_patients(demo_root, stage1_ckpt, capsys):
    """A --val-fraction of its own changes nothing: val is every labelled image of a patient
    stage 1 held out, train all the others."""
    stage1 = cleft.load_splits(cleft.load_config(stage1_ckpt))
    cfg = stage_2_config("--ckpt", stage1_ckpt, "--data-root", demo_root, "--val-fraction", 0.3)
    splits = prompt_tune.labelled_splits(cfg, cleft.FIVE_CLASSES)
    assert "note:" not in capsys.readouterr().out
    drawn_here = prompt_tune.labelled_splits(replace(cfg, ckpt=""), cleft.FIVE_CLASSES)
    labelled = drawn_here["train"] + drawn_here["val"]  # the same images, split another way
    assert sorted(splits["train"] + splits["val"]) == sorted(labelled)
    assert splits["val"] and patients(splits["val"]) <= patients(stage1["val"])
    assert sorted(splits["val"]) == sorted(p for p in labelled if patient_of(p[0]) in
                                           patients(stage1["val"]))
    assert splits["test"] == drawn_here["test"]


def test_patients_stage_1_never_saw_train_in_stage_2(stage1_ckpt):
    """Only stage 1's held-out patients validate: a patient new to stage 1 (more data since) trains,
    whichever part it came in."""
    stage1 = cleft.load_splits(cleft.load_config(stage1_ckpt))
    new = [("train/patient99998/study1/view1_frontal.jpg", 0),
           ("train/patient99999/study1/view1_frontal.jpg", 1)]
    given = {"train": [(image, 0) for image, _ in stage1["train"][:5]] + new[:1],
             "val": [(image, 0) for image, _ in stage1["val"][:5]] + new[1:], "test": []}
    split = held_out.stage_1_split(given, stage1_ckpt)
    assert split["val"] == given["val"][:5]
    assert split["train"] == given["train"] + new[1:]


def test_a_checkpoint_without_the_record_keeps_the_split_drawn_here(demo_root, stage1_ckpt,
                                                                    tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(stage1_ckpt, old)
    (old / "split.safetensors").unlink()
    checkpoints.seal(old)  # as an older cleft.py saved it: a manifest without the file
    cfg = stage_2_config("--ckpt", old, "--data-root", demo_root, "--val-fraction", 0.3)
    splits = prompt_tune.labelled_splits(cfg, cleft.FIVE_CLASSES)
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "no record of the patients stage 1 held out" in out
    assert splits == prompt_tune.labelled_splits(replace(cfg, ckpt=""), cleft.FIVE_CLASSES)
    assert capsys.readouterr().out == ""  # no checkpoint (a baseline): no note
    assert held_out.check_test(splits["test"], old, False, "prompt_tune.py") is None
    # another data set than stage 1's: none of its patients is in the record
    (tmp_path / "labels.csv").write_text("image,label\na.png,cat\nb.png,dog\nc.png,dog\n")
    cfg = stage_2_config("--ckpt", stage1_ckpt, "--data", "csv", "--data-root",
                         tmp_path / "labels.csv")
    splits = prompt_tune.labelled_splits(cfg, ["cat", "dog"])
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "none of these 3 images' patients" in out
    assert splits == prompt_tune.labelled_splits(replace(cfg, ckpt=""), ["cat", "dog"])


def test_the_clean_order_passes_stage_2(demo_folder, stage1_ckpt, tmp_path, capsys):
    """chexpert_5x200.csv there before stage 1: its patients were left out, stage 2 runs."""
    prompt_tune.main([*demo.stage2_args(demo_folder, stage1_ckpt), *map(str, STAGE_2),
                      "--out", str(tmp_path / "prompt.safetensors")])
    captured = capsys.readouterr()
    assert "5x200 zero-shot acc" in captured.out and "record" not in captured.out
    assert "trained on" not in captured.err
    test = prompt_tune.labelled_splits(stage_2_config("--data-root", demo_folder / "demo"),
                                       cleft.FIVE_CLASSES)["test"]
    assert held_out.check_test(test, stage1_ckpt, False, "prompt_tune.py") == 0


def without_test_set(demo_root, tmp_path):  # the demo's images, without chexpert_5x200.csv
    data = tmp_path / "data"
    data.mkdir()
    for entry in demo_root.iterdir():
        if entry.name != "chexpert_5x200.csv":
            (data / entry.name).symlink_to(entry)
    return data


def evaluate_zero_shot(ckpt, data, out, *flags):
    evaluate.main(["--ckpt", str(ckpt), "--data-root", str(data), "--task", "zeroshot",
                   "--num-workers", "0", "--out", str(out), *flags])
    return json.loads(out.read_text())


def test_the_readme_s_order_builds_the_test_set_first(demo_folder, demo_root, tmp_path):
    """evaluate.py --build-5x200 alone writes the test set and evaluates nothing; stage 1 then
    leaves its patients out, and the evaluation counts no test image trained on."""
    data = without_test_set(demo_root, tmp_path)
    evaluate.main(["--data-root", str(data), "--build-5x200", "--per-class", "10"])
    assert (data / "chexpert_5x200.csv").is_file() and not list(tmp_path.rglob("results*"))
    cleft.main(stage1_flags(demo_folder, "--data-root", data, "--out-dir", tmp_path / "run",
                            *STAGE_1))
    report = evaluate_zero_shot(tmp_path / "run" / "best", data, tmp_path / "results.json")
    assert report["test_images_trained_on"] == 0 and report["n_images"]["test"] == 50


def test_a_test_set_built_after_stage_1_stops_stage_2(demo_folder, demo_root, tmp_path, capsys):
    """Stage 1 on the data without chexpert_5x200.csv, the file put back (evaluate.py
    --build-5x200 after stage 1): stage 2 and the evaluation stop in one line; --allow-overlap
    goes on, and the results count the images."""
    data = without_test_set(demo_root, tmp_path)
    cleft.main(stage1_flags(demo_folder, "--data-root", data, "--out-dir", tmp_path / "run",
                            *STAGE_1))
    shutil.copy(demo_root / "chexpert_5x200.csv", data)
    args = ["--ckpt", str(tmp_path / "run" / "best"), "--data-root", str(data),
            "--out", str(tmp_path / "prompt.safetensors"), *map(str, STAGE_2)]
    with pytest.raises(SystemExit) as stop:
        prompt_tune.main(args)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert " of 50 test images are of patients stage 1 trained on (patient" in message
    assert "chexpert_5x200.csv before" in message and "--allow-overlap" in message
    assert not (tmp_path / "prompt.safetensors").exists()
    capsys.readouterr()
    prompt_tune.main([*args, "--allow-overlap"])
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "not held out" in captured.err
    assert "5x200 zero-shot acc" in captured.out and (tmp_path / "prompt.safetensors").exists()
    overlap = int(message.split()[1])
    test = prompt_tune.labelled_splits(stage_2_config("--data-root", data),
                                       cleft.FIVE_CLASSES)["test"]
    assert overlap > 0
    assert held_out.check_test(test, tmp_path / "run" / "best", True, "evaluate.py") == overlap
    results = tmp_path / "results.json"
    with pytest.raises(SystemExit) as stop:
        evaluate_zero_shot(tmp_path / "run" / "best", data, results)
    stopped = str(stop.value.code)  # its test images and retrieval pairs: the same overlap
    assert stopped.startswith(f"error: {overlap} of ") and "\n" not in stopped
    assert "--allow-overlap to evaluate.py" in stopped and not results.exists()
    report = evaluate_zero_shot(tmp_path / "run" / "best", data, results, "--allow-overlap")
    assert report["test_images_trained_on"] == overlap
