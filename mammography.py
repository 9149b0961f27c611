"""EMBED mammography, the paper's second domain: the BI-RADS and density classes in the public
code's wording, the 2D images joined to their exam's labels and split by patient 70/10/20 (seed 0),
and the export of the training and validation part as pairs for stages 1 and 2 (--data csv).
evaluate.py draws the balanced test sets from the other 20%.

    python evaluate.py --data embed-birads --data-root /data/embed --export /data/embed/birads.csv
"""

import os

from checks import read_csv, write_csv
from cleft import print0, split_by_patient

MAMMOGRAM_PREFIX = "this is a breast 2d full-field digital mammogram of a patient with "
BIRADS = {"A": "birads score 0: additional imaging required", "N": "birads score 1: negative",
          "B": "birads score 2: benign finding", "P": "birads score 3: probably benign finding",
          "S": "birads score 4: suspicious abnormality",
          "M": "birads score 5: highly suggestive of malignancy",
          "K": "birads score 6: known biopsy-proven malignancy"}
DENSITY = {"1": "breast tissue density 1: almost entirely fat",
           "2": "breast tissue density 2: scattered fibroglandular densities",
           "3": "breast tissue density 3: heterogeneously dense",
           "4": "breast tissue density 4: extremely dense"}

def embed_records(root):
    """2D images of EMBED_OpenData_metadata.csv with the exam's BI-RADS (`asses`) and density
    (`tissueden`; 5, 'normal male', left out) from EMBED_OpenData_clinical.csv, joined on patient,
    exam and side (side B covers both), split by patient 70% train / 10% val / 20% rest (seed 0)."""
    clinical, records = {}, []
    for row in read_csv(root / "EMBED_OpenData_clinical.csv",
                        ["empi_anon", "acc_anon", "side", "asses", "tissueden"]):
        density = row["tissueden"].split(".")[0]  # written as 3.0 in some releases
        for side in ("L", "R") if row["side"] == "B" else (row["side"],):
            labels = clinical.setdefault((row["empi_anon"], row["acc_anon"], side), {})
            labels.update({k: v for k, v in [("birads", row["asses"]), ("density", density)]
                           if v in (BIRADS if k == "birads" else DENSITY)})
    for row in read_csv(root / "EMBED_OpenData_metadata.csv",
                        ["empi_anon", "acc_anon", "ImageLateralityFinal", "FinalImageType",
                         "anon_dicom_path"]):
        labels = clinical.get((row["empi_anon"], row["acc_anon"], row["ImageLateralityFinal"]))
        if row["FinalImageType"] == "2D" and labels:
            path = row.get("png_path") or row["anon_dicom_path"]
            records.append({"image": str(root / path.lstrip("/")), "patient": row["empi_anon"],
                            **labels})
    train, rest = split_by_patient(records, 0.3, key=lambda r: r["patient"])
    val, rest = split_by_patient(rest, 2 / 3, key=lambda r: r["patient"])
    return {"train": train, "val": val, "rest": rest}

def export_embed(parts, task, labels, out):
    """A CSV of the train and val images (never the test part) for cleft.py --data csv and
    prompt_tune.py --data csv: image (relative to the file), text (a caption from both labels, in
    the prompts' wording), label (this task's class text, or blank), split."""
    rows = []
    for split in ("train", "val"):
        for r in parts[split]:
            caption = ", ".join(t[r[k]] for k, t in [("birads", BIRADS), ("density", DENSITY)]
                                if k in r)
            rows.append({"image": os.path.relpath(r["image"], out.parent), "split": split,
                         "text": MAMMOGRAM_PREFIX + caption, "label": labels.get(r.get(task), "")})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows, ["image", "text", "label", "split"])
    print0(f"wrote {out}: {len(rows)} train and val images with captions and {task} labels")
