"""Synthetic copies of the three report datasets' published layouts (MIMIC-CXR-JPG with its
reports, CheXpert Plus, Open-I), small and written by the tests, with the captions each report
must give. The benchmark writes a MIMIC-CXR of full size with `write_mimic_tables` and
`mimic_report`."""

import csv
import gzip
import random
from pathlib import Path

import numpy as np
from PIL import Image

# the cases, as MIMIC-CXR's reports write them: a leading space, wrapped at 79 columns, ___ for
# what de-identification removed, a line of underscores between an addendum and its report
WRAPPED = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows, as seen on ___. The
 cardiomediastinal silhouette is normal.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""
WRAPPED_FINDINGS = ("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
                    "nodular opacities that most likely represent nipple shadows, as seen on. The "
                    "cardiomediastinal silhouette is normal.")
WRAPPED_IMPRESSION = "No acute cardiopulmonary process."

ADDENDUM = """                                 FINAL ADDENDUM
 ADDENDUM:
 Dr. ___ was paged with these results at 4:15 p.m. by Dr. ___.
 
 ______________________________________________________________________________
                                 FINAL REPORT
 INDICATION:  Cough.
 
 CONCLUSION:  Right lower lobe opacity, likely pneumonia, in the
 appropriate clinical setting.
 
 NOTIFICATION:  The findings were discussed with Dr. ___ by telephone.
"""
ADDENDUM_CAPTION = ("Right lower lobe opacity, likely pneumonia, in the appropriate clinical "
                    "setting.")

LAST_PARAGRAPH = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 
 INDICATION:  ___ year old man with cough
 
 COMPARISON:  None.
 
 Heart size is normal.  Lungs are clear.  No pleural effusion.
"""
LAST_PARAGRAPH_CAPTION = "Heart size is normal. Lungs are clear. No pleural effusion."

EMPTY = """                                 FINAL REPORT
 INDICATION:  ___
 
 IMPRESSION: 
 
 ___
"""

# CheXpert Plus: sections in capitals with numbered points
CAPITALS = "1.  NO ACUTE CARDIOPULMONARY PROCESS.\n2.  STABLE MILD CARDIOMEGALY."
CAPITALS_CAPTION = "No acute cardiopulmonary process. Stable mild cardiomegaly."

# Open-I: XXXX for what de-identification removed
OPENI_FINDINGS = "The heart is normal in size. XXXX are intact. The lungs are clear."
OPENI_CAPTION = "The heart is normal in size. are intact. The lungs are clear."

FINDINGS_WORDS = ["heart size is normal", "the lungs are clear", "no pleural effusion",
                  "mild cardiomegaly", "small left effusion", "no pneumothorax",
                  "right lower lobe opacity", "stable mediastinal contours"]


def mimic_report(rng, findings_sentences=4):
    """A MIMIC-CXR-style report of realistic length (about 80 words, 600 characters)."""
    pick = lambda n: ".  ".join(rng.choice(FINDINGS_WORDS).capitalize() for _ in range(n)) + "."
    findings = pick(findings_sentences)
    lines = [findings[i:i + 78] for i in range(0, len(findings), 78)]  # wrapped
    return ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
            " INDICATION:  ___ with shortness of breath\n \n COMPARISON:  ___\n \n FINDINGS: \n \n"
            + "".join(f" {line}\n" for line in lines) + " \n IMPRESSION: \n \n " + pick(1) + "\n")


def image(path, rng, size=(80, 96)):
    """A small gray JPEG (or PNG) that the loaders can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, size[::-1], dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_csv(path, header, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_mimic_tables(root, images, gz=True):
    """mimic-cxr-2.0.0-split.csv(.gz) and -metadata.csv(.gz) for images [(dicom, study, subject,
    split, view)]; the metadata has the release's other columns too."""
    suffix = ".csv.gz" if gz else ".csv"
    write_csv(root / f"mimic-cxr-2.0.0-split{suffix}", ["dicom_id", "study_id", "subject_id",
                                                         "split"],
              [(d, study, subject, split) for d, study, subject, split, _ in images], gz)
    write_csv(root / f"mimic-cxr-2.0.0-metadata{suffix}",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
               "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
               "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
               "PatientOrientationCodeSequence_CodeMeaning"],
              [(d, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506, 213014.531,
                "CHEST (PA AND LAT)", "postero-anterior", "Erect")
               for d, study, subject, _, view in images], gz)


def report_file(root, subject, study):
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"


def write_mimic(root, gz=True, reports_root=None, extra_studies=12, seed=0):
    """A small MIMIC-CXR-JPG (images, split and metadata tables) with its reports (under root or
    reports_root). Returns {name: (image path, expected caption)} of the special cases and the
    image counts. Subjects 1x are train, 2x validate, 3x test."""
    root = Path(root)
    reports = Path(reports_root or root)
    rng = np.random.default_rng(seed)
    images = []  # (dicom, study, subject, split, view)
    texts = {}  # (subject, study) -> report text, or None for a missing file
    cases = {
        "wrapped": ("10000011", "50000001", "train", WRAPPED),
        "addendum": ("10000011", "50000002", "train", ADDENDUM),
        "last_paragraph": ("10000012", "50000003", "train", LAST_PARAGRAPH),
        "empty": ("10000013", "50000004", "train", EMPTY),
        "missing": ("10000014", "50000005", "train", None),
        "validate": ("10000021", "50000006", "validate", WRAPPED),
        "test_a": ("10000031", "50000007", "test", WRAPPED),
        "test_b": ("10000032", "50000008", "test", WRAPPED),  # the same text: one gallery entry
        "test_c": ("10000033", "50000009", "test", ADDENDUM),
    }
    for i in range(extra_studies):  # ordinary train studies, and two validate ones
        split = "validate" if i < 2 else "train"
        subject = f"{'2' if split == 'validate' else '1'}00001{i + 5:02d}"
        cases[f"extra{i}"] = (subject, f"5100{i:04d}", split, mimic_report(random.Random(i)))
    expected = {}
    for name, (subject, study, split, text) in cases.items():
        texts[(subject, study)] = text
        frontal = f"{study}-frontal"
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        views = {frontal: "PA" if int(study) % 2 else "AP", f"{study}-lateral": "LATERAL"}
        if name == "wrapped":  # a second frontal image: the study's text is held once for both
            views[f"{study}-frontal2"] = "AP"
            expected["wrapped2"] = str(folder / f"{study}-frontal2.jpg")
        for dicom, view in views.items():
            images.append((dicom, study, subject, split, view))
            image(folder / f"{dicom}.jpg", rng)
        expected[name] = str(folder / f"{frontal}.jpg")
    write_mimic_tables(root, images, gz)
    for (subject, study), text in texts.items():
        if text is not None:
            file = report_file(reports, subject, study)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text)
    return expected


def write_chexpert_plus(root, seed=0, png=False):
    """A small CheXpert Plus (df_chexpert_plus_240401.csv and images) and a chexpert_5x200.csv
    whose patient (patient00009) has studies in the table too. Returns {name: image path}. The
    images are CheXpert's JPEGs under the root, or with png=True the release's PNGs under PNG/PNG
    (the table names .jpg files either way)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    header = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
              "report", "section_findings", "section_impression", "split"]
    cases = {  # name -> (patient, study, findings, impression, split)
        "capitals": ("00001", 1, "", CAPITALS, "train"),
        "both": ("00002", 1, "Heart size is normal.\n  Lungs are clear.", "No acute process.",
                 "train"),
        "empty": ("00003", 1, "", "", "train"),
        "valid": ("00004", 1, "Small left effusion.", "Mild cardiomegaly is seen.", "valid"),
        "test_patient": ("00009", 2, "Low lung volumes.", "No acute process here.", "train"),
    }
    for i in range(10):
        cases[f"extra{i}"] = (f"001{i:02d}", 1, mimic_report(random.Random(i)).split(
            "FINDINGS: ")[1].split("IMPRESSION")[0], "Stable.", "train" if i < 8 else "valid")
    rows, paths = [], {}
    file_of = lambda path: (root / "PNG" / "PNG" / path).with_suffix(".png") if png else root / path
    for name, (patient, study, findings, impression, split) in cases.items():
        for view in ("frontal", "lateral"):
            path = f"{split}/patient{patient}/study{study}/view1_{view}.jpg"
            image(file_of(path), rng)
            rows.append((path, path.replace(".jpg", ".dcm"), view.capitalize(), "PA",
                         f"id{patient}", findings + impression, findings, impression, split))
        paths[name] = str(file_of(f"{split}/patient{patient}/study{study}/view1_frontal.jpg"))
    write_csv(root / "df_chexpert_plus_240401.csv", header, rows)
    from cleft import CHEXPERT_COLUMNS, FINDINGS  # the 5x200 file: one Edema image of patient 9
    labels = {name: "0.0" for name in FINDINGS} | {"Edema": "1.0", "No Finding": ""}
    path = "CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg"
    image(root / "train/patient00009/study1/view1_frontal.jpg", rng)
    write_csv(root / "chexpert_5x200.csv", CHEXPERT_COLUMNS,
              [[path, "Female", 60, "Frontal", "PA"] + [labels[name] for name in FINDINGS]])
    paths["5x200"] = str(root / "train/patient00009/study1/view1_frontal.jpg")
    return paths


def write_openi(root, studies=16, seed=0):
    """A small Open-I (indiana_reports.csv, indiana_projections.csv, images/images_normalized/)
    with a frontal and a lateral image per uid; uid 1 has the XXXX case, uid 2 an empty report.
    Returns {uid: frontal image path}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    reports, projections, paths = [], [], {}
    for uid in range(1, studies + 1):
        findings = {1: OPENI_FINDINGS, 2: ""}.get(uid, mimic_report(random.Random(uid)).split(
            "FINDINGS: ")[1].split("IMPRESSION")[0])
        impression = {2: ""}.get(uid, "No active disease.")
        reports.append((uid, "normal", "normal", f"Xray Chest PA and Lateral {uid}",
                        "XXXX-year-old male", "None.", findings, impression))
        for number, projection in [(1, "Frontal"), (2, "Lateral")]:
            filename = f"{uid}_IM-{uid:04d}-{number}001.dcm.png"
            image(root / "images" / "images_normalized" / filename, rng)
            projections.append((uid, filename, projection))
            if projection == "Frontal":
                paths[uid] = str(root / "images" / "images_normalized" / filename)
    write_csv(root / "indiana_reports.csv", ["uid", "MeSH", "Problems", "image", "indication",
                                             "comparison", "findings", "impression"], reports)
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    return paths
