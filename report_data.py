"""
Radiology reports as captions: MIMIC-CXR-JPG with the MIMIC-CXR reports, CheXpert Plus and Open-I
(IU X-ray), each read from the files its release publishes into the splits that cleft.load_splits
returns; each report is read as the official MIMIC-CXR section rules read it (FINDINGS and
IMPRESSION, else the last paragraph), and `--caption` picks what a training step sees of it. Also
the start-up line on the captions' length in tokens. cleft.py is the method; this file reads text.
"""

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from checks import csv_rows, die

CAPTIONS = ["findings-impression", "impression", "findings", "sentence", "section"]
MIN_WORDS = 3  # a study whose report has fewer usable words is dropped
EXAMPLES = 3  # missing reports listed by name in the start-up line


def print0(line):  # one line on stdout, from rank 0 (or a plain python process)
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


# --- A report's text: sections, clean-up, sentences, the caption of each --caption mode
HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*):", re.MULTILINE)  # capitals, a colon: a header
MAIN_SECTIONS = ["impression", "findings", "history", "comparison", "addendum"]  # in this order
NAMES_THE_VIEW = re.compile(  # a header such as 'CHEST, PA AND LAT:' heads the findings
    r"\b(chest|portable|pa and lat|lateral and pa|ap and lat|lateral and ap|frontal and|two views|"
    r"frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|"
    r"frontal semi-upright|ribs)\b")
NUMBERED_POINT = re.compile(r"(^|\n|[.;:]\s)\s*\d{1,2}[.)]\s+(?=[A-Za-z])")  # '1. No', '2) No'


def section_name(header):
    """The official parser's names: CONCLUSION is the impression, FINDING the findings; else the
    first of MAIN_SECTIONS the header contains (FINDINGS AND IMPRESSION: the impression); else a
    header that names the view is the findings."""
    name = " ".join(header.lower().split())
    renamed = {"conclusion": "impression", "finding": "findings"}
    main = next((section for section in MAIN_SECTIONS if section in name), None)
    view = "findings" if NAMES_THE_VIEW.search(name) else name
    return renamed.get(name) or main or view


def report_sections(text):
    """(findings, impression) of a free-text report, cleaned: the last non-empty section of each
    name. With neither, the official parser's 'last paragraph' stands as the findings: what
    follows the first paragraph of the last section (all of it, if it is one paragraph)."""
    headers = list(HEADER.finditer(text))
    bodies = {}  # name -> the last non-empty body under that name
    for header, following in zip(headers, headers[1:] + [None]):
        body = text[header.end():following.start() if following else len(text)]
        if body.strip():
            bodies[section_name(header.group(1))] = body
    if "findings" in bodies or "impression" in bodies:
        return clean(bodies.get("findings", "")), clean(bodies.get("impression", ""))
    last_section = text[headers[-1].end():] if headers else text
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", last_section) if p.strip()]
    return clean(" ".join(paragraphs[1:] or paragraphs)), ""


def clean(text):
    """One line of prose: de-identification marks (MIMIC's ___, Open-I's XXXX) and the line of
    underscores after an addendum, numbered points ('1. ', '2) ') and line wraps removed; text all
    in capitals put in sentence case."""
    text = re.sub(r"_{2,}|\bX{2,}\b", " ", text)
    text = NUMBERED_POINT.sub(r"\1 ", text)
    if not re.search("[a-z]", text):  # 'NO ACUTE PROCESS.' -> 'No acute process.'
        text = re.sub(r"(^\W*|[.!?]\s+)([a-z])", lambda m: m[1] + m[2].upper(), text.lower())
    return re.sub(r" ([.,;:])", r"\1", " ".join(text.split()))  # 'seen on ___.' -> 'seen on.'


def sentences(text):  # split after . ! ? followed by a space ('1.5 cm' stays whole)
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def caption_of(findings, impression, mode):
    """The training target of a report under --caption `mode`: a string, or a tuple of strings
    of which each step draws one (sentence, section); None if the report has < MIN_WORDS words.
    impression / findings: that section, or the whole text if the report has none."""
    sections = tuple(s for s in (findings, impression) if s)
    full = " ".join(sections)
    if len(full.split()) < MIN_WORDS:
        return None
    chosen = {"impression": impression, "findings": findings}.get(mode) or full
    drawn = {"sentence": tuple(sentences(full)), "section": sections}.get(mode, (chosen,))
    return drawn if len(drawn) > 1 else drawn[0]


# --- Studies to splits
def study_splits(studies, caption):
    """({'train', 'val', 'test': []}, studies kept, studies dropped) of studies {key: (split,
    image paths, findings, impression)}, split 'train' or any other (validation): one caption
    object per study, shared by its images. Validation uses the whole text; a study with fewer
    than MIN_WORDS words is dropped."""
    splits = {"train": [], "val": [], "test": []}
    kept = 0
    for split, images, findings, impression in studies.values():
        mode = caption if split == "train" else "findings-impression"  # validation: all of it
        target = caption_of(findings, impression, mode)
        if target is not None:
            splits["train" if split == "train" else "val"] += [(image, target) for image in images]
            kept += 1
    return splits, kept, len(studies) - kept


def kept_line(name, splits, kept, dropped, missing=(), left_out=None):
    """The start-up line of a report source: what was kept, what was dropped and why.
    left_out: {why: number of images} of the images not used."""
    missing_names = ", ".join(str(m) for m in missing[:EXAMPLES])
    missing_text = (f", {len(missing)} with no report file (e.g. {missing_names})"
                    if missing else "")
    unused = ", ".join(f"{n} ({why})" for why, n in (left_out or {}).items())
    unused = f"; images not used: {unused}" if unused else ""
    print0(f"{name}: kept {kept} studies ({len(splits['train'])} train and {len(splits['val'])} "
        f"validation images); studies dropped: {dropped} with fewer than {MIN_WORDS} words of "
        f"report text{missing_text}{unused}")


def first_file(root, *names):  # the first of names that is a file under root, else die
    for name in names:
        if (Path(root) / name).is_file():
            return Path(root) / name
    die(f"{Path(root) / names[0]} does not exist: put the release's {names[0]} (or "
        f"{' or '.join(names[1:])}) there, or check --data-root.")


# --- MIMIC-CXR-JPG and its reports
def mimic_studies(root, reports_root="", wanted=("train", "validate")):
    """({study: (split, frontal image paths, findings, impression)}, report files missing, counts
    of the images left out) for the official splits in `wanted`."""
    root = Path(root)
    reports = Path(reports_root or root)
    metadata = first_file(root, "mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")
    split_file = first_file(root, "mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv")
    header, rows = csv_rows(metadata, ["dicom_id", "ViewPosition"])
    dicom, view = header.index("dicom_id"), header.index("ViewPosition")
    frontal = {row[dicom] for row in rows if row[view] in ("PA", "AP")}
    columns = ["dicom_id", "study_id", "subject_id", "split"]
    header, rows = csv_rows(split_file, columns)
    index = [header.index(c) for c in columns]
    images = {}  # (subject, study) -> (split, [image paths])
    left_out = Counter()
    for row in rows:
        dicom_id, study, subject, split = (row[i] for i in index)
        if dicom_id not in frontal or split not in wanted:
            left_out["lateral or other views" if dicom_id not in frontal else f"{split} split"] += 1
            continue
        folder = f"files/p{subject[:2]}/p{subject}"
        images.setdefault((folder, study), (split, []))[1].append(
            str(root / folder / f"s{study}" / f"{dicom_id}.jpg"))
    studies, missing = {}, []
    for (folder, study), (split, paths) in images.items():
        file = reports / folder / f"s{study}.txt"
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError:  # missing: counted, the first few named
            missing.append(file)
            continue
        studies[study] = (split, paths, *report_sections(text))
    if images and not studies:
        die(f"no report file under {reports}, e.g. {missing[0]}: unpack the MIMIC-CXR reports "
            "(files/pXX/pSUBJECT/sSTUDY.txt) there, or pass --reports-root.")
    return studies, missing, left_out


def mimic_cxr(root, caption="findings-impression", reports_root=""):
    """MIMIC-CXR-JPG's frontal (PA, AP) images of the official train and validate splits, with
    their study's report; the test split is never read here (evaluate.py scores on it)."""
    studies, missing, left_out = mimic_studies(root, reports_root)
    splits, kept, dropped = study_splits(studies, caption)
    kept_line("mimic-cxr", splits, kept, dropped, missing, left_out)
    return splits


# --- CheXpert Plus
CHEXPERT_PLUS_COLUMNS = ["path_to_image", "frontal_lateral", "section_findings",
                         "section_impression", "split"]


def image_layout(root, path):
    """(folder, suffix) of the images of a CheXpert Plus root, found from one `path_to_image` (a
    .jpg path): CheXpert's JPEGs under the root, or the release's PNGs under PNG/ or PNG/PNG/."""
    for folder in ("", "PNG", "PNG/PNG"):
        for suffix in (".jpg", ".png"):
            if (root / folder / path).with_suffix(suffix).is_file():
                return folder, suffix
    return "", Path(path).suffix  # none there: each unreadable image is reported as usual


def chexpert_plus(root, caption="findings-impression", excluded_patients=()):
    """CheXpert Plus's frontal images of its train and valid splits with their report sections;
    the images of `excluded_patients` ('patient00001', e.g. CheXpert-5x200's) are left out."""
    root = Path(root)
    table = first_file(root, "df_chexpert_plus_240401.csv", "df_chexpert_plus_240401.csv.gz")
    header, rows = csv_rows(table, CHEXPERT_PLUS_COLUMNS)
    path, view, findings, impression, split = (header.index(c) for c in CHEXPERT_PLUS_COLUMNS)
    studies = {}  # 'train/patient00001/study1' -> (split, image paths, findings, impression)
    left_out = Counter()
    layout = None  # (folder, suffix) of the images, found from the first row
    for row in rows:
        study = str(Path(row[path]).parent)
        patient = re.search(r"patient\d+", row[path])
        if row[view] != "Frontal" or (patient and patient.group(0) in excluded_patients):
            left_out["lateral views" if row[view] != "Frontal" else "CheXpert-5x200 patients"] += 1
            continue
        if study not in studies:  # the text once per study; every image row repeats it
            sections = (clean(row[findings]), clean(row[impression]))
            studies[study] = ("train" if row[split] == "train" else "val", [], *sections)
        layout = layout or image_layout(root, row[path])
        studies[study][1].append(str((root / layout[0] / row[path]).with_suffix(layout[1])))
    splits, kept, dropped = study_splits(studies, caption)
    kept_line("chexpert-plus", splits, kept, dropped, left_out=left_out)
    return splits


# --- Open-I (IU X-ray)
def openi_studies(root):
    """{uid: ('', frontal image paths, findings, impression)} of the Open-I layout."""
    root = Path(root)
    header, rows = csv_rows(root / "indiana_reports.csv", ["uid", "findings", "impression"])
    uid, findings, impression = (header.index(c) for c in ["uid", "findings", "impression"])
    reports = {row[uid]: (clean(row[findings]), clean(row[impression])) for row in rows}
    header, rows = csv_rows(root / "indiana_projections.csv", ["uid", "filename", "projection"])
    uid, filename, projection = (header.index(c) for c in ["uid", "filename", "projection"])
    studies = {}
    for row in rows:
        if row[projection] == "Frontal" and row[uid] in reports:
            study = studies.setdefault(row[uid], ("", [], *reports[row[uid]]))
            study[1].append(str(root / "images" / "images_normalized" / row[filename]))
    return studies


def openi(root, caption="findings-impression", hold_out=None):
    """Open-I's frontal images with their report; hold_out(uids) -> (train uids, val uids)
    holds out whole patients (a uid is one patient's study)."""
    studies = openi_studies(root)
    _, val = hold_out(sorted(studies))
    val = set(val)
    studies = {uid: ("val" if uid in val else "train", *study[1:])
               for uid, study in studies.items()}
    splits, kept, dropped = study_splits(studies, caption)
    kept_line("openi", splits, kept, dropped)
    return splits


def retrieval_pairs(name, root, reports_root=""):
    """(image, whole report text) pairs for retrieval: MIMIC-CXR's official test split (frontal)
    or every frontal Open-I image; studies with fewer than MIN_WORDS words are left out."""
    studies = (mimic_studies(root, reports_root, ("test",))[0] if name == "mimic-cxr"
               else openi_studies(root))
    held_out = {study: ("val", *rest) for study, (_, *rest) in studies.items()}  # the whole text
    splits, _, _ = study_splits(held_out, "findings-impression")
    return splits["val"]


# --- The start-up line on caption lengths
def caption_lengths(splits, tokenizer, max_length, sample=10_000):
    """'N train, N val, N test; captions: median, 95th percentile in tokens, share cut', over up
    to `sample` training captions (every one of the ones a step draws from)."""
    captions = [c for _, target in splits["train"]
                for c in ((target,) if isinstance(target, str) else target)]
    captions = captions[::max(1, -(-len(captions) // sample))]  # a step rounded up: <= sample
    extra = len(tokenizer("")["input_ids"]) or 1  # BERT's [CLS] and [SEP], or our EOS
    lengths = np.array([len(ids) + extra for ids in
                        tokenizer(captions, add_special_tokens=False)["input_ids"]])
    counts = ", ".join(f"{len(records)} {name}" for name, records in splits.items())
    return (f"data: {counts}; captions: {np.median(lengths):.0f} tokens median, "
            f"{np.percentile(lengths, 95):.0f} at the 95th percentile, "
            f"{100 * np.mean(lengths > max_length):.1f}% cut by --max-length {max_length}")
