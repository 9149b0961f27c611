"""Results as tables: evaluate.py's Markdown rows in the layout of the paper's Table 1, and the
comparison `evaluate.py --compare` prints: our rows in the columns of the paper's Table 1 or 2,
each cell ours with its 95% interval beside the paper's published value where paper_tables.json
holds one (each with its table, row and column; so far Table 1's CLEFT row), and a mark where the
paper's value lies outside our interval.

    python evaluate.py --compare runs/cleft/best/results_chexpert.json runs/baselines/*.json
"""

import json
from collections import namedtuple
from pathlib import Path

from checks import die

PAPER = Path(__file__).with_name("paper_tables.json")
TASKS = ["zeroshot", "linear", "finetune"]  # the table's three pairs of columns
# a column of the paper's tables -> the (task, metric) of a results file
COLUMNS = {"ZS-Acc": ("zeroshot", "acc"), "LP-Acc": ("linear", "acc"),
           "LP-AUC": ("linear", "auc"), "FT-Acc": ("finetune", "acc"),
           "FT-AUC": ("finetune", "auc")}
SAME_TEST_SET = {"chexpert": "chexpert5x200"}  # evaluate.py's two names for CheXpert-5x200
# a row of ours: the paper's row name, the model it was measured on, the zero-shot prompt (learned,
# an ensemble, or '' for the hand-written one), the share of training data
Run = namedtuple("Run", ["row", "source", "prompt", "data_pct"])
KEYS = ["dataset", "data_pct", "results", "prompt"]  # what every results file has

def cell(results, key):  # '66.74 (63.80-69.60)', the sd after the value with several seeds
    if not results:
        return "-"
    if results[key] is None:  # undefined: the table's note says why
        return "n/a"
    low, high = results[f"{key}_ci95"]
    sd = f" ± {results[f'{key}_sd']:.2f}" if f"{key}_sd" in results else ""
    return f"{results[key]:.2f}{sd} ({low:.2f}-{high:.2f})"

def row_of(report):  # a results file's Run (files of older versions: a CLEFT checkpoint's)
    model = report.get("model") or {"row": "CLEFT", "source": report["checkpoint"]}
    prompt = ""  # the hand-written one, or no zero-shot
    if report["prompt"]:
        prompt = "learned prompt"
    elif any(len(prompts) > 1 for prompts in (report.get("prompts") or {}).values()):
        prompt = "prompt ensemble"
    return Run(model["row"], model["source"], prompt, report["data_pct"])

def model_name(report):  # 'CLEFT (best, learned prompt)', 'ImageNet-ViT (facebook/dinov2-base)'
    run = row_of(report)
    prompt = f", {run.prompt}" if run.prompt else ""
    if not run.row.startswith("CLEFT"):
        return f"{run.row} ({run.source}{prompt})"
    return f"{run.row} ({Path(run.source).parent.name}{prompt})"

def markdown_table(report):
    """The table evaluate.py prints: one row, Table 1's columns with the AUC of zero-shot too."""
    r = report["results"]
    name = model_name(report)
    cells = [cell(r.get(task), metric) for task in TASKS for metric in ("acc", "auc")]
    seeds = report["seeds"]
    over_seeds = f"; LP and FT: mean ± sd over seeds {seeds}" if len(seeds) > 1 else ""
    lines = [f"{report['dataset']}, {report['data_pct']:.0%} of the training data{over_seeds}; "
             "95% bootstrap intervals in parentheses",
             "| Method | ZS-Acc | ZS-AUC | LP-Acc | LP-AUC | FT-Acc | FT-AUC |",
             "|---|---|---|---|---|---|---|", f"| {name} | " + " | ".join(cells) + " |"]
    reasons = {task["auc_undefined"] for task in r.values() if task and "auc_undefined" in task}
    lines += [f"n/a: AUC is undefined, {reason}" for reason in reasons]  # the same for every task
    if r.get("retrieval"):
        keys = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
        lines += ["", "| Retrieval | I2T R@1 | I2T R@5 | I2T R@10 | T2I R@1 | T2I R@5 | T2I R@10 |",
                  "|---|---|---|---|---|---|---|",
                  f"| {name} | " + " | ".join(cell(r["retrieval"], k) for k in keys) + " |"]
    return "\n".join(lines)

# --- The comparison with the paper's published values
def versus(results, key, published):
    """'ours (interval) vs paper', with † where the paper's value lies outside our interval as
    the table shows it (rounded to two decimals)."""
    ours = cell(results, key)
    if published is None:  # none entered in paper_tables.json
        return f"{ours} vs n.e."
    mark = ""
    if results and results.get(key) is not None:
        low, high = (round(bound, 2) for bound in results[f"{key}_ci95"])
        mark = "" if low <= published <= high else " †"
    return f"{ours} vs {published:.2f}{mark}"

def read_report(path):
    """A results file of evaluate.py, its dataset under one name; one line if it is not one."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        die(f"cannot read {path} ({error}): pass the results_*.json files evaluate.py wrote.")
    if not isinstance(report, dict) or [key for key in KEYS if key not in report]:
        die(f"{path} is not a results file of evaluate.py (it lacks {KEYS}): pass the "
            "results_*.json files it wrote.")
    report["dataset"] = SAME_TEST_SET.get(report["dataset"], report["dataset"])
    return report

def comparison_table(number, table, reports):
    """Table `number`'s columns: a row per model of ours (the paper's rows first, in its order,
    with or without results of ours), the paper's value beside ours where one is entered."""
    published = {(v["row"], v["dataset"], v["column"]): v["value"] for v in table["values"]}
    ours = {}  # Run -> {dataset: results}
    for report in reports:
        results = ours.setdefault(row_of(report), {})
        if report["dataset"] in results:
            die(f"two results files for {model_name(report)} on {report['dataset']} at "
                f"{report['data_pct']:.0%} of the data: pass one of them.")
        results[report["dataset"]] = report["results"]
    def order(run):  # 100% of the data first
        return run.row, run.source, run.prompt, -run.data_pct
    rows = []
    for name in table["rows"]:  # the paper's rows; one with no results of ours stays, empty
        measured = sorted((run for run in ours if run.row == name), key=order)
        rows += measured if measured else [Run(name, "", "", 1)]
    rows += sorted((run for run in ours if run.row not in table["rows"]), key=order)
    header = [f"{title} {column}" for title in table["datasets"].values()
              for column in table["columns"]]
    lines = [f"In the columns of the paper's Table {number}: {table['caption']}", "",
             "| Method | Model | " + " | ".join(header) + " |",
             "|---|---|" + "---|" * len(header)]
    for run in rows:
        results = ours.get(run, {})  # dataset -> its results
        cells = []
        for dataset in table["datasets"]:
            for column in table["columns"]:
                task, metric = COLUMNS[column]
                paper = published.get((run.row, dataset, column)) if run.data_pct == 1 else None
                cells.append(versus(results.get(dataset, {}).get(task), metric, paper))
        share = "" if run.data_pct == 1 else f", {run.data_pct:.0%} of the data"
        model = ", ".join(part for part in (run.source, run.prompt) if part) or "-"
        lines.append(f"| {run.row}{share} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def comparison(paths, paper=PAPER):
    """The Markdown of each of the paper's tables that a results file in `paths` belongs to."""
    if not paths:
        die("--compare takes the results files evaluate.py wrote: pass one or more.")
    reports = [read_report(path) for path in paths]
    tables = json.loads(Path(paper).read_text())["tables"]
    parts = []
    for number, table in tables.items():
        if mine := [r for r in reports if r["dataset"] in table["datasets"]]:
            parts.append(comparison_table(number, table, mine))
    if not parts:
        die(f"none of the {len(reports)} results files is on a dataset of the paper's Tables 1 "
            "and 2 (chexpert5x200, rsna, embed-birads, embed-density): pass those.")
    legend = ("Each cell: ours, with its 95% bootstrap interval (- not measured), vs the paper's "
              f"published value as {Path(paper).name} holds it, with its table, row and column "
              "(n.e.: none entered there); † the paper's value lies outside our interval. A CLEFT "
              "run is set beside the paper's CLEFT (LoRA) values whatever data it was trained on.")
    return "\n\n".join(parts + [legend])
