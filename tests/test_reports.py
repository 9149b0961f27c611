"""Radiology reports as captions: the section rules, the three published layouts (MIMIC-CXR-JPG
with its reports, CheXpert Plus, Open-I) read into splits, --caption, several sources in one run,
--val-size, --square crop, the caption-length line, their errors, training and retrieval on them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cleft
import evaluate
import image_io
import report_data
import report_layouts as layouts
from conftest import stage1_flags


@pytest.fixture(scope="session")
def mimic(tmp_path_factory):
    """(root, {case: frontal image path}) of a small MIMIC-CXR-JPG with gzipped tables."""
    root = tmp_path_factory.mktemp("mimic")
    return root, layouts.write_mimic(root)


def config(*flags):
    return cleft.parse_config([str(flag) for flag in flags])


def captions(splits, name="train"):
    return dict(splits[name])


def test_sections_as_the_official_rules_read_them():
    """FINDINGS and IMPRESSION, their variants, the last non-empty section of each name, else the
    last paragraph; wraps, ___, addenda and their separator line never reach the text."""
    sections = report_data.report_sections
    assert sections(layouts.WRAPPED) == (layouts.WRAPPED_FINDINGS, layouts.WRAPPED_IMPRESSION)
    assert sections(layouts.ADDENDUM) == ("", layouts.ADDENDUM_CAPTION)  # CONCLUSION: impression
    assert sections(layouts.LAST_PARAGRAPH) == (layouts.LAST_PARAGRAPH_CAPTION, "")
    assert sections(layouts.EMPTY) == ("", "")
    assert sections(" FINDINGS AND IMPRESSION:  Clear lungs.\n") == ("", "Clear lungs.")
    view_header = " CHEST, PA AND LATERAL:\n Clear lungs.\n IMPRESSION:\n"
    assert sections(view_header) == ("Clear lungs.", "")
    # an empty FINDINGS after a full one does not replace it
    assert sections(" FINDINGS: Clear lungs.\n FINDINGS:\n \n") == ("Clear lungs.", "")
    no_headers = "No headers at all.\n\nSecond paragraph here.\n \nThird one."
    assert sections(no_headers) == ("Second paragraph here. Third one.", "")  # after the first
    assert sections("One paragraph, no header.") == ("One paragraph, no header.", "")
    # the first of the main names a header holds, before the view
    assert sections(" HISTORY OF CHEST PAIN: Cough.\n REVIEW:  Clear lungs today.\n") == (
        "Clear lungs today.", "")
    assert report_data.clean(layouts.CAPITALS) == layouts.CAPITALS_CAPTION
    assert report_data.clean(layouts.OPENI_FINDINGS) == layouts.OPENI_CAPTION
    assert report_data.sentences("Size 1.5 cm. No change! Stable? yes") == [
        "Size 1.5 cm.", "No change!", "Stable?", "yes"]


@pytest.mark.parametrize("gz", [True, False], ids=["csv.gz", "csv"])
def test_mimic_cxr_captions_splits_and_start_up_line(tmp_path, capsys, gz):
    """Frontal images of the official train and validate splits with their study's text; lateral
    views, the test split, an empty report and a missing report file are left out and counted."""
    paths = layouts.write_mimic(tmp_path, gz=gz)
    splits = cleft.load_splits(config("--data", "mimic-cxr", "--data-root", tmp_path))
    train, val = captions(splits), captions(splits, "val")
    assert train[paths["wrapped"]] == layouts.WRAPPED_FINDINGS + " " + layouts.WRAPPED_IMPRESSION
    assert train[paths["addendum"]] == layouts.ADDENDUM_CAPTION
    assert train[paths["last_paragraph"]] == layouts.LAST_PARAGRAPH_CAPTION
    assert paths["empty"] not in train and paths["missing"] not in train
    assert val[paths["validate"]] == train[paths["wrapped"]]
    everything = list(train) + list(val)
    assert not any("lateral" in path for path in everything)
    assert not any(f"s5000000{i}" in path for path in everything for i in (7, 8, 9))  # test split
    assert (len(train), len(val), splits["test"]) == (14, 3, [])  # 4 + 10 extra; 1 + 2 extra
    subject = lambda path: path.split("/")[-3]  # files/p10/p10000011/s.../x.jpg
    assert not {subject(p) for p in train} & {subject(p) for p in val}
    assert train[paths["wrapped2"]] is train[paths["wrapped"]]  # the text once per study
    line = capsys.readouterr().out
    assert ("mimic-cxr: kept 16 studies (14 train and 3 validation images); studies dropped: 1 "
            "with fewer than 3 words of report text, 1 with no report file (e.g. ") in line
    assert "p10000014/s50000005.txt); images not used: 21 (lateral or other views), 3 (test " \
           "split)" in line


def test_reports_can_live_under_their_own_root(tmp_path):
    paths = layouts.write_mimic(tmp_path / "jpg", reports_root=tmp_path / "reports")
    splits = cleft.load_splits(config("--data", "mimic-cxr", "--data-root", tmp_path / "jpg",
                                      "--reports-root", tmp_path / "reports"))
    assert captions(splits)[paths["addendum"]] == layouts.ADDENDUM_CAPTION


def test_caption_modes(mimic):
    """impression / findings: that section (the whole text without it); sentence / section: a
    tuple a step draws from; validation always the whole text."""
    root, paths = mimic
    by_mode = {mode: cleft.load_splits(config("--data", "mimic-cxr", "--data-root", root,
                                              "--caption", mode)) for mode in report_data.CAPTIONS}
    wrapped = {mode: captions(splits)[paths["wrapped"]] for mode, splits in by_mode.items()}
    assert wrapped["impression"] == layouts.WRAPPED_IMPRESSION
    assert wrapped["findings"] == layouts.WRAPPED_FINDINGS
    assert wrapped["section"] == (layouts.WRAPPED_FINDINGS, layouts.WRAPPED_IMPRESSION)
    assert wrapped["sentence"] == (
        "There is no focal consolidation, pleural effusion or pneumothorax.",
        "Bilateral nodular opacities that most likely represent nipple shadows, as seen on.",
        "The cardiomediastinal silhouette is normal.", "No acute cardiopulmonary process.")
    # no findings section: the impression stands for the findings too; one section: a string
    addendum = {mode: captions(splits)[paths["addendum"]] for mode, splits in by_mode.items()}
    assert set(addendum.values()) == {layouts.ADDENDUM_CAPTION}
    for splits in by_mode.values():
        assert captions(splits, "val")[paths["validate"]] == (
            layouts.WRAPPED_FINDINGS + " " + layouts.WRAPPED_IMPRESSION)


def test_a_drawn_caption_depends_on_seed_epoch_and_image_alone(tmp_path):
    """The caption drawn for an item is a function of (seed, epoch, image index): two datasets (two
    ranks, or a resumed run) draw the same; epochs draw anew; evaluation reads the whole text."""
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(tmp_path / "x.png")
    sentences = tuple(f"sentence number {i}." for i in range(6))
    records = [(str(tmp_path / "x.png"), sentences)] * 3
    draw = lambda dataset, seed: dataset[(1, seed)][1]
    first, second = (image_io.XrayDataset(records, 32) for _ in range(2))
    drawn = [draw(first, (42, epoch, 1)) for epoch in range(30)]
    assert drawn == [draw(second, (42, epoch, 1)) for epoch in range(30)]
    assert set(drawn) == set(sentences)  # every sentence, over the epochs
    assert draw(first, (42, 0, 1)) != draw(first, (43, 0, 1)) or \
        draw(first, (42, 1, 1)) != draw(first, (43, 1, 1))  # another --seed, other draws
    assert first[(1, None)][1] == " ".join(sentences)
    # the view is drawn from its own stream: the same with a string caption or a tuple
    single = image_io.XrayDataset([(str(tmp_path / "x.png"), "one caption")] * 3, 32)
    assert torch.equal(first[(1, (42, 0, 1))][0], single[(1, (42, 0, 1))][0])


@pytest.mark.parametrize("png", [False, True], ids=["chexpert-jpegs", "release-pngs"])
def test_chexpert_plus(tmp_path, capsys, png):
    """path_to_image under the root (CheXpert's JPEGs, or the release's PNGs under PNG/PNG), frontal
    only, train / valid as given, capitals with numbered points in sentence case; CheXpert-5x200's
    patient out of training, its image the test split."""
    paths = layouts.write_chexpert_plus(tmp_path, png=png)
    splits = cleft.load_splits(config("--data", "chexpert-plus", "--data-root", tmp_path))
    train, val = captions(splits), captions(splits, "val")
    assert train[paths["capitals"]] == layouts.CAPITALS_CAPTION
    assert train[paths["both"]] == "Heart size is normal. Lungs are clear. No acute process."
    assert val[paths["valid"]] == "Small left effusion. Mild cardiomegaly is seen."
    assert paths["empty"] not in train and paths["test_patient"] not in train
    assert not any("patient00009" in path for path in list(train) + list(val))
    assert splits["test"] == [(paths["5x200"], cleft.FIVE_CLASSES.index("Edema"))]
    assert (len(train), len(val)) == (10, 3)
    assert all(Path(path).is_file() for path in list(train) + list(val))
    assert "images not used: 15 (lateral views), 1 (CheXpert-5x200 patients)" in \
        capsys.readouterr().out


def test_openi(tmp_path):
    """XXXX removed, frontal images only, whole uids held out, an empty report dropped."""
    paths = layouts.write_openi(tmp_path)
    splits = cleft.load_splits(config("--data", "openi", "--data-root", tmp_path,
                                      "--val-fraction", 0.2))
    train, val = captions(splits), captions(splits, "val")
    both = {**train, **val}
    assert both[paths[1]] == layouts.OPENI_CAPTION + " No active disease."
    assert paths[2] not in both and len(both) == 15 and len(val) >= 2  # 3 of 16 uids held out
    assert not any("-2001" in path for path in both)  # the lateral projections
    uid = lambda path: path.split("/")[-1].split("_")[0]
    assert not {uid(p) for p in train} & {uid(p) for p in val}


def test_several_sources_in_one_run(mimic, tmp_path, capsys):
    """Each source by its own rules, joined; --val-size samples the held-out pairs or says it is
    capped."""
    root, _ = mimic
    layouts.write_openi(tmp_path)
    flags = ["--data", "mimic-cxr,openi", "--data-root", f"{root},{tmp_path}"]
    alone = [cleft.load_splits(config("--data", name, "--data-root", folder))
             for name, folder in [("mimic-cxr", root), ("openi", tmp_path)]]
    joined = cleft.load_splits(config(*flags))
    for name in ("train", "val"):
        assert joined[name] == alone[0][name] + alone[1][name]
    sampled = cleft.load_splits(config(*flags, "--val-size", 2))["val"]
    assert len(sampled) == 2 and set(sampled) <= set(joined["val"])
    assert sampled == cleft.load_splits(config(*flags, "--val-size", 2, "--seed", 7))["val"]
    capsys.readouterr()
    capped = cleft.load_splits(config(*flags, "--val-size", 50))["val"]
    assert capped == joined["val"]
    assert f"validation: all {len(capped)} held-out pairs, fewer than --val-size 50" in \
        capsys.readouterr().out


def error_of(*flags):
    with pytest.raises(SystemExit) as stop:
        cleft.load_splits(config(*flags))
    return str(stop.value)


@pytest.mark.parametrize("remove, named", [
    ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv.gz does not exist"),
    ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz does not exist"),
    ("files/p10/p10000011", "no report file under")])
def test_a_missing_mimic_file_is_one_error_line(tmp_path, remove, named):
    layouts.write_mimic(tmp_path, extra_studies=0)
    if remove.startswith("files"):  # every report: the reports release is not there
        for report in tmp_path.rglob("s*.txt"):
            report.unlink()
    else:
        (tmp_path / remove).unlink()
    error = error_of("--data", "mimic-cxr", "--data-root", tmp_path)
    assert error.startswith("error: ") and named in error and "\n" not in error
    assert ("--reports-root" if remove.startswith("files") else "--data-root") in error


def test_other_mistakes_are_one_error_line(tmp_path, mimic):
    assert "df_chexpert_plus_240401.csv does not exist" in error_of(
        "--data", "chexpert-plus", "--data-root", tmp_path)
    assert "indiana_reports.csv does not exist" in error_of(
        "--data", "openi", "--data-root", tmp_path)
    assert "give one folder per source" in error_of(
        "--data", "mimic-cxr,openi", "--data-root", mimic[0])
    assert "unknown --data ['mimic']" in error_of("--data", "mimic", "--data-root", mimic[0])
    layouts.write_openi(tmp_path)
    (tmp_path / "indiana_projections.csv").write_text("uid,file\n1,x.png\n")
    assert "lacks the column(s) ['filename', 'projection']" in error_of(
        "--data", "openi", "--data-root", tmp_path)


def test_square_crop_keeps_the_centre(tmp_path):
    """--square crop: the centre square of a wide image fills the view, no black border; pad (the
    default) keeps the whole image within black borders."""
    pixels = np.full((100, 200), 128, np.uint8)
    pixels[:, :50] = pixels[:, 150:] = 255  # white sides: cut by the crop
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    crop = image_io.load_image(tmp_path / "wide.png", 50, square="crop")[0]
    pad = image_io.load_image(tmp_path / "wide.png", 50)[0]
    assert crop.shape == pad.shape == (50, 50)
    assert torch.allclose(crop, torch.tensor(128 / 255))  # all centre, all gray
    assert (pad[:10] == 0).all() and (pad[20:30, :5] > 0.9).all()  # borders, and the white sides


def test_caption_length_line(demo_folder):
    """Tokens of the chosen tokenizer, EOS (or [CLS] and [SEP]) included: the byte-level tokenizer
    spends one per character."""
    gpt2 = cleft.load_pretrained(str(demo_folder / "tiny-gpt2"), "text")[1]
    bert = cleft.load_pretrained(str(demo_folder / "tiny-bert"), "text")[1]
    splits = {"train": [("a", "x" * 9), ("b", ("y" * 19, "z" * 29)), ("c", "w" * 39)],
              "val": [("d", "v")], "test": []}
    line = report_data.caption_lengths(splits, gpt2, max_length=25)  # 10, 20, 30, 40 tokens
    assert line == ("data: 3 train, 1 val, 0 test; captions: 25 tokens median, 38 at the 95th "
                    "percentile, 50.0% cut by --max-length 25")
    assert "26 tokens median" in report_data.caption_lengths(splits, bert, max_length=25)
    # at most `sample` captions, evenly spaced: 4 with sample=3 measure the 1st and 3rd (10, 30)
    four = {"train": [(str(i), "x" * (n - 1)) for i, n in enumerate([10, 20, 30, 100])],
            "val": [], "test": []}
    assert "20 tokens median" in report_data.caption_lengths(four, gpt2, 25, sample=3)


@pytest.fixture(scope="session")
def mimic_run(demo_folder, mimic, tmp_path_factory):
    """A stage-1 run on the MIMIC layout with drawn sentences: (flags, out_dir, captions of each
    step)."""
    root, _ = mimic
    out = tmp_path_factory.mktemp("mimic_run")
    flags = stage1_flags(demo_folder, "--data", "mimic-cxr", "--data-root", root, "--caption",
                         "sentence", "--batch-size", 4, "--num-workers", 0, "--max-steps", 4,
                         "--eval-every", 2, "--square", "crop")
    seen = record_captions(lambda: cleft.main([*flags, "--out-dir", str(out)]))
    return flags, out, seen


def record_captions(run):
    """The captions of each training step of run()."""
    seen, real_train_step = [], cleft.train_step

    def train_step(model, images, captions, *args):
        seen.append(list(captions))
        return real_train_step(model, images, captions, *args)
    cleft.train_step = train_step
    try:
        run()
    finally:
        cleft.train_step = real_train_step
    return seen


def test_training_on_reports_draws_sentences_and_resumes_alike(mimic_run, tmp_path, capsys):
    """Each step trains on one sentence per image; a run stopped at step 2 and resumed sees at
    every step the captions an uninterrupted run saw (an epoch is 3 steps: it crosses one)."""
    flags, out, straight = mimic_run
    drawn_from = cleft.load_splits(cleft.parse_config(flags))["train"]
    sentences = {s for _, target in drawn_from for s in (target if isinstance(target, tuple)
                                                         else (target,))}
    whole = cleft.load_splits(cleft.parse_config([*flags, "--caption", "findings-impression"]))
    assert len(straight) == 4 and all(len(step) == 4 for step in straight)
    assert all(caption in sentences for step in straight for caption in step)
    assert sum(caption not in dict(whole["train"]).values() for step in straight
               for caption in step) > 8  # most reports have several sentences
    resumed = record_captions(lambda: cleft.main([*flags, "--out-dir", str(tmp_path), "--max-steps",
                                                  "2"]))
    resumed += record_captions(lambda: cleft.main([*flags, "--out-dir", str(tmp_path), "--resume"]))
    assert resumed == straight
    assert "captions: " in capsys.readouterr().out
    assert cleft.load_config(out / "last").square == "crop"


def test_retrieval_on_mimic_test_split_and_zero_shot_5x200(mimic_run, mimic, demo_root, tmp_path):
    """evaluate.py --data mimic-cxr: recall over the official test split's frontal images, two
    identical reports one gallery entry; the same model still scores CheXpert-5x200 zero-shot."""
    _, out, _ = mimic_run
    root, _ = mimic
    result = tmp_path / "retrieval.json"
    evaluate.main(["--ckpt", str(out / "best"), "--data", "mimic-cxr", "--data-root", str(root),
                   "--num-workers", "0", "--out", str(result)])  # --task all: retrieval alone
    report = json.loads(result.read_text())
    assert report["n_images"]["pairs"] == 3 and list(report["results"]) == ["retrieval"]
    retrieval = report["results"]["retrieval"]
    assert retrieval["i2t_R@5"] == 100.0  # a gallery of two texts
    assert round(retrieval["i2t_R@1"] * 3 / 100, 6) in (0, 1, 2, 3)  # of 3 images
    assert len(retrieval["t2i_R@1_ci95"]) == 2
    with pytest.raises(SystemExit, match="only --task retrieval applies"):
        evaluate.main(["--ckpt", str(out / "best"), "--data", "mimic-cxr", "--data-root",
                       str(root), "--task", "linear"])
    zero_shot = tmp_path / "zs.json"
    evaluate.main(["--ckpt", str(out / "best"), "--data", "chexpert5x200", "--data-root",
                   str(demo_root), "--task", "zeroshot", "--num-workers", "0",
                   "--out", str(zero_shot)])
    assert 0 <= json.loads(zero_shot.read_text())["results"]["zeroshot"]["acc"] <= 100


def test_openi_retrieval_reads_every_frontal_pair(tmp_path):
    layouts.write_openi(tmp_path)
    pairs = report_data.retrieval_pairs("openi", tmp_path)
    assert len(pairs) == 15 and all("-1001" in path for path, _ in pairs)
    shutil.rmtree(tmp_path / "images")  # retrieval reads the tables; images only when embedded
    assert len(report_data.retrieval_pairs("openi", tmp_path)) == 15
