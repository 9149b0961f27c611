"""CheXpert parsing (captions, frontal filter, uncertain/blank labels, patient split, 5x200 rule and
exclusion), the pairs CSV, image loading, unreadable images, and the samplers."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cleft
import evaluate
import image_io


def row(**labels):
    """A CheXpert train.csv row with the given labels (others blank)."""
    base = {c: "" for c in cleft.CHEXPERT_COLUMNS}
    base.update(
        {
            "Path": "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
            "Frontal/Lateral": "Frontal",
        }
    )
    base.update({name.replace("_", " "): value for name, value in labels.items()})
    return base


def test_caption_uses_positive_findings_in_header_order():
    r = row(
        Pleural_Effusion="1.0", Cardiomegaly="1.0", Edema="-1.0", Atelectasis="0.0", Fracture=""
    )
    assert (
        cleft.caption_from_labels(r)
        == "this is a chest x ray of a patient with cardiomegaly, pleural effusion"
    )
    # only uncertain or blank labels: not a healthy study, so the bare prefix (public code)
    bare = "this is a chest x ray of a patient with "
    assert cleft.caption_from_labels(row(Edema="-1.0")) == bare
    assert (
        cleft.caption_from_labels(row(No_Finding="1.0"))
        == "this is a chest x ray of a patient with no finding"
    )


def test_five_class_rule():
    assert cleft.five_class_index(row(Edema="1.0")) == 3
    assert (
        cleft.five_class_index(row(Edema="1.0", Cardiomegaly="0.0", No_Finding="1.0")) == 3
    )  # No Finding unchecked
    assert cleft.five_class_index(row(Edema="1.0", Cardiomegaly="1.0")) is None  # two classes
    assert cleft.five_class_index(row(Edema="1.0", Atelectasis="-1.0")) is None  # uncertain
    assert cleft.five_class_index(row(Edema="1.0", Pneumonia="-1.0")) is None
    assert (
        cleft.five_class_index(row(Edema="1.0", Support_Devices="1.0")) is None
    )  # another finding
    assert cleft.five_class_index(row(Lung_Opacity="1.0")) is None


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_build_5x200_picks_only_rows_that_satisfy_the_rule(demo_root):
    rows = read(demo_root / "train.csv")
    chosen = evaluate.build_5x200(rows, per_class=10, seed=3)
    assert len(chosen) == 50 and len({r["Path"] for r in chosen}) == 50
    assert [sum(cleft.five_class_index(r) == c for r in chosen) for c in range(5)] == [10] * 5
    assert all(r["Frontal/Lateral"] == "Frontal" for r in chosen)
    assert all(
        v != "-1.0"
        for r in chosen
        for k, v in r.items()
        if k in cleft.FIVE_CLASSES + cleft.MUST_BE_ABSENT
    )
    # the rule stated independently of cleft.five_class_index: exactly one of the five classes is
    # 1.0, the other four and these eight findings are blank or 0.0, and nothing is -1
    five = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    absent = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia",
              "Pneumothorax", "Pleural Other", "Fracture", "Support Devices"]
    for r in chosen:
        assert [r[c] for c in five].count("1.0") == 1
        assert all(r[c] in ("", "0.0") for c in five if r[c] != "1.0")
        assert all(r[c] in ("", "0.0") for c in absent)
    assert sorted(next(c for c in five if r[c] == "1.0") for r in chosen) == sorted(five * 10)
    assert chosen == evaluate.build_5x200(rows, per_class=10, seed=3)  # seeded
    with pytest.raises(SystemExit, match="fewer than"):
        evaluate.build_5x200(rows, per_class=10_000)


def test_chexpert_splits(demo_root):
    splits = cleft.load_splits(
        cleft.parse_config(["--data", "chexpert", "--data-root", str(demo_root)])
    )
    rows = read(demo_root / "train.csv")
    assert any(
        r["Frontal/Lateral"] == "Lateral" for r in rows
    )  # the demo has lateral views to filter
    for name in ("train", "val"):
        assert splits[name] and all(
            path.endswith("_frontal.jpg") and Path(path).exists() for path, _ in splits[name]
        )
        assert all(caption.startswith(cleft.CAPTION_PREFIX) for _, caption in splits[name])
    patients = {name: {cleft.patient_of(p) for p, _ in splits[name]} for name in splits}
    assert not patients["train"] & patients["val"]  # split by patient
    assert not patients["test"] & (
        patients["train"] | patients["val"]
    )  # 5x200 patients never pre-trained on
    assert len(splits["test"]) == 50 and sorted({c for _, c in splits["test"]}) == [0, 1, 2, 3, 4]
    frontal = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
    kept = len(splits["train"]) + len(splits["val"])
    assert kept == sum(cleft.patient_of(r["Path"]) not in patients["test"] for r in frontal)
    assert (
        0.02 < len(patients["val"]) / (len(patients["train"]) + len(patients["val"])) < 0.08
    )  # about 5%
    again = cleft.load_splits(
        cleft.parse_config(["--data", "chexpert", "--data-root", str(demo_root), "--seed", "7"])
    )
    assert again == splits  # the split does not move with the training seed


def test_pairs_csv(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(40):
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
    (tmp_path / "pairs.csv").write_text(
        "image,text\n" + "".join(f"images/{i}.jpg,report {i}\n" for i in range(40))
    )
    splits = cleft.load_splits(
        cleft.parse_config(["--data", "csv", "--data-root", str(tmp_path / "pairs.csv")])
    )
    assert len(splits["train"]) == 38 and len(splits["val"]) == 2 and splits["test"] == []
    assert all(
        Path(path).exists() and text == f"report {Path(path).stem}"
        for path, text in splits["train"] + splits["val"]
    )
    # a split column is kept as given: train and val by name, any other rows (test) left out
    names = ["train"] * 30 + ["val"] * 6 + ["test"] * 4
    (tmp_path / "split.csv").write_text("image,text,split\n" + "".join(
        f"images/{i}.jpg,report {i},{name}\n" for i, name in enumerate(names)))
    splits = cleft.load_splits(
        cleft.parse_config(["--data", "csv", "--data-root", str(tmp_path / "split.csv")]))
    assert [Path(path).stem for path, _ in splits["train"]] == [str(i) for i in range(30)]
    assert [Path(path).stem for path, _ in splits["val"]] == [str(i) for i in range(30, 36)]
    (tmp_path / "bad.csv").write_text("path,caption\na.jpg,x\n")
    with pytest.raises(SystemExit, match=r"lacks the column\(s\) \['image', 'text'\]"):
        cleft.load_splits(
            cleft.parse_config(["--data", "csv", "--data-root", str(tmp_path / "bad.csv")])
        )
    with pytest.raises(SystemExit, match="does not exist"):
        cleft.load_splits(
            cleft.parse_config(["--data", "chexpert", "--data-root", str(tmp_path / "nowhere")])
        )


def framed(height, width):
    """A mid-gray image with a white frame 40 pixels wide: its borders are easy to find."""
    pixels = np.full((height, width), 128, np.uint8)
    pixels[:40], pixels[-40:], pixels[:, :40], pixels[:, -40:] = 255, 255, 255, 255
    return pixels


@pytest.mark.parametrize("height, width", [(600, 300), (300, 600)])  # tall, wide
def test_the_evaluation_view_keeps_the_whole_image(tmp_path, height, width):
    """Padded to a square, not cropped: every edge of the image is in view, the padding is black
    and where it should be (on the short side, evenly), and the view is deterministic."""
    Image.fromarray(framed(height, width)).save(tmp_path / "x.png")
    view = image_io.load_image(tmp_path / "x.png", 64)[0]  # (64, 64)
    assert view.shape == (64, 64)
    content = view if height > width else view.T  # the long side down the rows
    assert (content[:, :15] == 0).all() and (content[:, 49:] == 0).all()  # padding, both sides
    inside = content[:, 16:48]
    assert (inside > 0.3).all()  # all of the image: nothing cut off
    for edge in (inside[1], inside[-2], inside[:, 1], inside[:, -2]):  # its white frame, in view
        assert edge.mean() > 0.9
    assert inside[6:-6, 6:-6].max() < 0.55  # and the gray inside it
    torch.testing.assert_close(view, image_io.load_image(tmp_path / "x.png", 64)[0])


def test_training_views_stay_inside_the_padded_square(tmp_path):
    """Zoom >= 1, a shift within the zoomed square and a rotation of at most 10 degrees: a white
    square image shows no more dark area than rotated corners (far below the 25% a shift out of
    the square by a quarter of its side would show), and views are seeded."""
    Image.fromarray(np.full((200, 200), 255, np.uint8)).save(tmp_path / "white.png")
    views = [image_io.load_image(tmp_path / "white.png", 64, np.random.default_rng(s))[0]
             for s in range(20)]
    assert max((view < 0.5).float().mean().item() for view in views) < 0.12
    assert not torch.equal(views[0], views[1])
    torch.testing.assert_close(
        views[1], image_io.load_image(tmp_path / "white.png", 64, np.random.default_rng(1))[0])


def test_large_jpeg_is_decoded_reduced(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2800, 2400), dtype=np.uint8)).save(
        tmp_path / "big.jpg"
    )
    with Image.open(tmp_path / "big.jpg") as image:
        image.draft("L", (224, 224))
        assert image.size == (300, 350)  # decoded at 1/8 scale, still above 224
    assert image_io.load_image(tmp_path / "big.jpg", 224).shape == (1, 224, 224)


def test_other_formats_are_reduced_by_a_whole_factor(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1300, 1000), dtype=np.uint8)).save(
        tmp_path / "big.png"
    )
    assert image_io.decode_xray(tmp_path / "big.png", 224).size == (250, 325)  # 1000 // 224 = 4
    assert image_io.decode_xray(tmp_path / "big.png", 600).size == (
        1000,
        1300,
    )  # no whole factor keeps 600


def test_image_cache_gives_the_same_views_without_decoding_again(tmp_path, monkeypatch):
    path, cache = tmp_path / "big.jpg", tmp_path / "cache"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1000), dtype=np.uint8)).save(
        path
    )
    views = lambda **kw: [
        image_io.load_image(path, 64, **kw),
        image_io.load_image(path, 64, np.random.default_rng(3), **kw),
    ]
    expected = views()
    first = views(cache=cache)  # decodes and stores
    entries = list(cache.glob("*/*.npy"))
    assert len(entries) == 1 and np.load(entries[0]).shape == (
        150,
        125,
    )  # the 1/8-scale decode, not the full image
    with monkeypatch.context() as patched:
        patched.setattr(
            image_io, "decode_xray", lambda *args: pytest.fail("decoded although cached")
        )
        second = views(cache=cache)
    for a, b, c in zip(expected, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)

    entries[0].write_bytes(
        entries[0].read_bytes()[:100]
    )  # a damaged entry is decoded again and replaced
    assert torch.equal(image_io.load_image(path, 64, cache=cache), expected[0])
    assert np.load(entries[0]).shape == (150, 125)

    Image.fromarray(np.zeros((1200, 1000), np.uint8)).save(
        path
    )  # a changed file is never served stale
    assert (
        image_io.load_image(path, 64, cache=cache).abs().max() == 0
        and len(list(cache.glob("*/*.npy"))) == 2
    )


def test_an_unwritable_image_cache_costs_speed_not_images(tmp_path, monkeypatch, capsys):
    Image.fromarray(np.full((80, 80), 200, np.uint8)).save(tmp_path / "a.png")
    expected = image_io.load_image(tmp_path / "a.png", 64)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="cannot write to the image cache"):
        torch.testing.assert_close(
            image_io.load_image(tmp_path / "a.png", 64, cache=tmp_path / "cache"), expected
        )
    # a dataset checks its folder once, in the main process: one warning, above the progress bar
    # (not from each loader worker), and no cache
    for _ in range(2):
        records = [(str(tmp_path / "a.png"), 0)]
        assert image_io.XrayDataset(records, 64, cache=str(tmp_path / "cache")).cache == ""
    assert capsys.readouterr().err.count("warning: cannot write to the image cache") == 1
    assert image_io.XrayDataset([], 64, cache=str(tmp_path / "ok")).cache == str(tmp_path / "ok")

    def disk_full(file, array):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.warns(UserWarning, match="No space left on device"):
        torch.testing.assert_close(
            image_io.load_image(tmp_path / "a.png", 64, cache=tmp_path / "cache2"), expected
        )
    assert list((tmp_path / "cache2").rglob("*.*")) == []  # the partly written entry is gone


def test_worker_count_shares_the_cores_among_the_ranks_of_a_node(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    loader = lambda workers: cleft.make_loader([], [], workers, torch.device("cpu"))
    assert (
        loader(-1).num_workers == 7 and loader(3).num_workers == 3
    )  # 16 cores / 2 ranks, one left for each rank


def test_unreadable_images_are_skipped(tmp_path, capsys):
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(tmp_path / "good.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:200])
    dataset = image_io.XrayDataset(
        [
            (str(tmp_path / "missing.jpg"), "a"),
            (str(tmp_path / "truncated.jpg"), "b"),
            (str(tmp_path / "good.jpg"), "c"),
        ],
        image_size=32,
    )
    messages = []
    for index, skipped in [(0, ["missing.jpg", "truncated.jpg"]), (1, ["truncated.jpg"]), (2, [])]:
        image, caption, unreadable = dataset[(index, None)]
        assert caption == "c" and image.shape == (1, 32, 32)  # the next readable item stands in
        # every unreadable file it stood in for is named, with the reason
        assert [line.split(" (")[0] for line in unreadable.splitlines()] == [
            str(tmp_path / name) for name in skipped
        ]
        messages.append(unreadable)
    assert capsys.readouterr().err == ""  # loader workers print nothing themselves
    image_io.UNREADABLE.clear()
    again = [messages[0]]  # met again (at another evaluation, say): not reported again
    image_io.report_unreadable(messages)
    image_io.report_unreadable(again)
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and len(image_io.UNREADABLE) == 2
    assert errors[0].startswith(f"warning: skipping unreadable image {tmp_path / 'missing.jpg'} (")
    assert errors[1].startswith(f"warning: skipping unreadable image {tmp_path / 'truncated.jpg'}")


def test_train_batches_are_the_same_global_batches_for_any_world_size(monkeypatch):
    def batches(world_size, rank, start_step=0, count=7):
        monkeypatch.setattr(cleft, "world", lambda: (rank, world_size))
        it = iter(cleft.TrainBatches(n=50, batch_size=12, seed=5, start_step=start_step))
        return [next(it) for _ in range(count)]

    one = batches(1, 0)
    two = [a + b for a, b in zip(batches(2, 0), batches(2, 1))]
    assert one == two
    assert batches(1, 0, start_step=3, count=4) == one[3:]  # resuming mid-run gives the same data
    epoch0 = [i for batch in one[:4] for i, _ in batch]  # 50 // 12 = 4 steps per epoch
    assert len(set(epoch0)) == 48  # no repeats inside an epoch
    assert [i for i, _ in one[4]] != [i for i, _ in one[0]]  # a new order each epoch


def test_eval_batches_cover_the_data_in_order(monkeypatch):
    monkeypatch.setattr(cleft, "world", lambda: (1, 2))
    padded = cleft.eval_batches(10, batch_size=4)
    assert [[i for i, _ in b] for b in padded] == [[2, 3], [6, 7], [9, 9]]
    assert all(seed is None for b in padded for _, seed in b)  # no augmentation
    monkeypatch.setattr(cleft, "world", lambda: (0, 2))
    assert [[i for i, _ in b] for b in cleft.eval_batches(3, batch_size=4)] == [[0, 1]]
