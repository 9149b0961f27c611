"""evaluate.py --compare: the paper's Table 1 or 2 with its published value beside ours in each
cell, from results files whose numbers the test knows."""

import json

import pytest

import evaluate
import tables


def result(value, low, high):  # one metric as evaluate.py writes it
    return {"acc": value, "acc_ci95": [low, high], "auc": value + 20, "auc_ci95": [low + 20,
                                                                                  high + 20]}


def write_report(path, dataset, row, source, results, data_pct=1.0):
    report = {"dataset": dataset, "model": {"row": row, "source": source}, "prompt": None,
              "checkpoint": source if row == "CLEFT" else None, "data_pct": data_pct,
              "seeds": [0], "results": results}
    path.write_text(json.dumps(report))
    return path


def parse(markdown):
    """{(method, model): {column: cell}} of the first Markdown table in `markdown`."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], cells[1])] = dict(zip(header[2:], cells[2:]))
    return rows


@pytest.fixture
def reports(tmp_path):
    cleft_chexpert = write_report(tmp_path / "a.json", "chexpert", "CLEFT", "runs/x/best", {
        "zeroshot": result(61.0, 58.0, 64.0),  # the paper's 66.74 lies above: marked
        "linear": result(63.0, 60.0, 66.0),  # 63.46 inside; LP-AUC 83.0 (80.0-86.0): 87.76 out
        "finetune": result(64.0, 63.96, 66.0)})  # 63.96 on the lower bound: inside
    cleft_rsna = write_report(tmp_path / "b.json", "rsna", "CLEFT", "runs/x/best", {
        "zeroshot": result(65.0, 62.0, 68.0)})
    random = write_report(tmp_path / "c.json", "chexpert5x200", "Random-ViT",
                          "facebook/dinov2-base, random weights (seed 0)",
                          {"linear": result(30.0, 27.0, 33.0)})
    tenth = write_report(tmp_path / "d.json", "chexpert5x200", "CLEFT", "runs/x/best",
                         {"linear": result(55.0, 50.0, 60.0)}, data_pct=0.1)
    other = write_report(tmp_path / "f.json", "rsna", "Other-ViT", "mine",
                         {"linear": result(50.0, 45.0, 55.0)})  # a row the paper does not have
    return [other, cleft_chexpert, cleft_rsna, random, tenth]


def test_each_number_in_its_cell_beside_the_paper_s(reports):
    text = tables.comparison(reports)
    assert text.startswith("In the columns of the paper's Table 1: CheXpert-5x200 and RSNA")
    rows = parse(text)
    ours = rows[("CLEFT", "runs/x/best")]
    assert ours["CheXpert-5x200 ZS-Acc"] == "61.00 (58.00-64.00) vs 66.74 †"
    assert ours["CheXpert-5x200 LP-Acc"] == "63.00 (60.00-66.00) vs 63.46"
    assert ours["CheXpert-5x200 LP-AUC"] == "83.00 (80.00-86.00) vs 87.76 †"
    assert ours["CheXpert-5x200 FT-Acc"] == "64.00 (63.96-66.00) vs 63.96"
    assert ours["CheXpert-5x200 FT-AUC"] == "84.00 (83.96-86.00) vs 88.22 †"
    assert ours["RSNA ZS-Acc"] == "65.00 (62.00-68.00) vs 64.93"
    assert ours["RSNA LP-Acc"] == "- vs 79.40"  # not measured: the paper's value alone
    random = rows[("Random-ViT", "facebook/dinov2-base, random weights (seed 0)")]
    assert random["CheXpert-5x200 LP-Acc"] == "30.00 (27.00-33.00) vs n.e."  # no value entered
    assert random["CheXpert-5x200 ZS-Acc"] == "- vs n.e."
    assert rows[("ImageNet-ViT", "-")]["RSNA FT-AUC"] == "- vs n.e."  # the paper's row, ours absent
    tenth = rows[("CLEFT, 10% of the data", "runs/x/best")]
    assert tenth["CheXpert-5x200 LP-Acc"] == "55.00 (50.00-60.00) vs n.e."  # the paper's are 100%
    methods = [method for method, _ in rows]  # the paper's order, then rows it does not have
    assert methods == ["Random-ViT", "ImageNet-ViT", "CLIP-ViT", "CLEFT", "CLEFT, 10% of the data",
                       "Other-ViT"]
    assert rows[("Other-ViT", "mine")]["RSNA LP-Acc"] == "50.00 (45.00-55.00) vs n.e."
    assert "Table 2" not in text  # no EMBED results given


def test_each_zero_shot_prompt_is_a_row_of_its_own(tmp_path):
    """The same checkpoint with the hand-written, a learned and an ensemble prompt: three rows,
    each saying which, each beside the paper's CLEFT values."""
    files = []
    for name, prompt, prompts in [("a", None, {"Edema": ["x"]}), ("b", "p.safetensors", None),
                                  ("c", None, {"Edema": ["x", "y"]})]:
        path = write_report(tmp_path / f"{name}.json", "chexpert", "CLEFT", "runs/x/best",
                            {"zeroshot": result(60.0 + len(files), 50.0, 70.0)})
        report = json.loads(path.read_text())
        path.write_text(json.dumps({**report, "prompt": prompt, "prompts": prompts}))
        files.append(path)
    rows = parse(tables.comparison(files))
    assert rows[("CLEFT", "runs/x/best")]["CheXpert-5x200 ZS-Acc"] == (
        "60.00 (50.00-70.00) vs 66.74")
    assert rows[("CLEFT", "runs/x/best, learned prompt")]["CheXpert-5x200 ZS-Acc"] == (
        "61.00 (50.00-70.00) vs 66.74")
    assert rows[("CLEFT", "runs/x/best, prompt ensemble")]["CheXpert-5x200 ZS-Acc"] == (
        "62.00 (50.00-70.00) vs 66.74")


def test_the_paper_s_values_are_data_with_their_source():
    paper = json.loads(tables.PAPER.read_text())["tables"]
    for number, table in paper.items():
        for value in table["values"]:
            assert value["row"] in table["rows"] and value["dataset"] in table["datasets"]
            assert value["column"] in table["columns"] and value["column"] in tables.COLUMNS
            assert value["source"].startswith(f"Table {number}, row {value['row']}")
            assert value["column"] in value["source"]


def test_table_2_from_embed_results_and_the_command(tmp_path, capsys):
    birads = write_report(tmp_path / "e.json", "embed-birads", "ImageNet-ViT", "dino",
                          {"linear": result(40.0, 35.0, 45.0)})
    out = tmp_path / "comparison.md"
    evaluate.main(["--compare", str(birads), "--out", str(out)])
    written = out.read_text()
    assert written.startswith("In the columns of the paper's Table 2: EMBED BI-RADS and density")
    assert parse(written)[("ImageNet-ViT", "dino")]["EMBED BI-RADS LP-Acc"] == (
        "40.00 (35.00-45.00) vs n.e.")
    assert written.strip() in capsys.readouterr().out


def test_mistakes_end_in_one_line(tmp_path, reports):
    (tmp_path / "not.json").write_text("{}")
    twice = write_report(tmp_path / "twice.json", "chexpert5x200", "CLEFT", "runs/x/best",
                         {"linear": result(1.0, 0.0, 2.0)})
    other = write_report(tmp_path / "csv.json", "csv", "CLEFT", "runs/x/best", {})
    for paths, message in [([tmp_path / "not.json"], "is not a results file"),
                           ([reports[1], twice], "two results files"),
                           ([other], "none of the 1 results files"),
                           ([], "pass one or more")]:
        with pytest.raises(SystemExit) as stop:
            tables.comparison(paths)
        assert message in str(stop.value) and "\n" not in str(stop.value)


def test_results_files_without_compare_are_one_line(reports):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--data-root", "x", str(reports[0])])
    assert "add --compare" in str(stop.value) and "\n" not in str(stop.value)
