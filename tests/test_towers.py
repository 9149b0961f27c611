"""Text tower (EOS pooling, truncation, dynamic padding, de-duplication, PEFT variants), image
tower, the towers and the loss without any Config, loading models through the real
from_pretrained path from folders of any name, offline, and the copy of the reusable parts."""

import ast
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cleft
import demo
from conftest import ROOT, tiny_config, tiny_model

CAPTIONS = [
    "this is a chest x ray of a patient with edema",
    "this is a chest x ray of a patient with no finding",
    "this is a chest x ray of a patient with edema",  # a repeat, as label-built captions do
    "short",
]


def text_tower(folder, adapter=None, **kwargs):
    """The demo's tiny GPT-2 loaded from its folder, in a TextTower."""
    lm, tokenizer = cleft.load_pretrained(str(folder / "tiny-gpt2"), "text")
    return cleft.TextTower(lm, tokenizer, adapter, **kwargs)


def test_eos_is_appended_and_pooled_position_is_it(demo_folder):
    tower = text_tower(demo_folder)
    eos_id = tower.tokenizer.eos_token_id
    input_ids, causal, eos_positions = tower.tokenize(CAPTIONS)
    lengths = [
        len(c.encode()) + 1 for c in CAPTIONS
    ]  # byte-level tokenizer: one token per byte, plus EOS
    assert input_ids.shape == (4, max(lengths))  # padded to the longest caption, not to max_length
    assert eos_positions.tolist() == [n - 1 for n in lengths]
    # position i attends to 0..i: an EOS sees its caption and never the padding after it
    assert torch.equal(causal, torch.ones(1, 1, max(lengths), max(lengths)).tril().bool())
    for row, eos in zip(input_ids, eos_positions):
        assert row[eos] == eos_id and (row[:eos] != eos_id).all()


def test_truncation_keeps_the_eos(demo_folder):
    tower = text_tower(demo_folder, max_length=16)
    input_ids, _, eos_positions = tower.tokenize(["x" * 100, "ab"])
    assert input_ids.shape == (2, 16)
    assert eos_positions.tolist() == [15, 2]
    assert (
        input_ids[0, 15] == tower.tokenizer.eos_token_id
        and input_ids[0, :15].tolist() == tower.tokenizer("x" * 15)["input_ids"]
    )


def naive_text_features(tower, captions, pad_to):
    """The public code's way: every caption encoded, all padded to a fixed length."""
    eos_id = tower.tokenizer.eos_token_id
    ids = [
        tower.tokenizer(c, add_special_tokens=False)["input_ids"][: pad_to - 1] + [eos_id]
        for c in captions
    ]
    input_ids = torch.tensor([x + [eos_id] * (pad_to - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (pad_to - len(x)) for x in ids])
    hidden = tower.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(len(ids)), torch.tensor([len(x) - 1 for x in ids])]


@pytest.mark.parametrize("peft", ["lora", "ia3", "prefix"])
def test_dynamic_padding_and_dedup_equal_naive(demo_folder, peft):
    tower = tiny_model(demo_folder, peft=peft).text_tower
    with torch.no_grad():  # make the adapters non-trivial (LoRA B starts at zero)
        for name, p in tower.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    weights = torch.randn(len(CAPTIONS), tower.width)
    grads = []
    for features in (tower(CAPTIONS), naive_text_features(tower, CAPTIONS, pad_to=80)):
        (features * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.requires_grad})
        tower.zero_grad()
        grads[-1]["features"] = features.detach()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_trainable_parameters_of_each_variant(demo_folder):
    tower = lambda **kw: cleft.build_model(tiny_config(demo_folder, **kw)).text_tower
    count = lambda **kw: sum(p.numel() for p in tower(**kw).parameters() if p.requires_grad)
    width, layers = 64, 2  # the tiny GPT-2
    assert count(peft="lora") == layers * 8 * (
        width + 3 * width
    )  # r * (in + out) on c_attn, as 32*8*(2560+7680) on BioMedLM
    assert count(peft="ia3") == layers * (
        3 * width + 4 * width
    )  # a vector on c_attn's output and mlp.c_proj's input
    assert (
        count(peft="prefix") == 20 * layers * 2 * width
    )  # keys and values of 20 virtual tokens in every layer
    assert count(freeze_lm=True) == 0
    total = sum(p.numel() for p in tower(full_ft_lm=True).parameters())
    assert count(full_ft_lm=True) == total
    assert count(peft="lora", train_embed=True) == count(peft="lora") + 257 * width


def test_ablation_flags_imply_no_adapter():
    assert cleft.parse_config(["--freeze-lm"]).peft == "none"
    assert cleft.parse_config(["--full-ft-lm", "--peft", "lora"]).peft == "none"
    with pytest.raises(SystemExit, match="contradict"):
        cleft.parse_config(["--freeze-lm", "--full-ft-lm"])


def test_the_defaults_are_the_papers_and_flags_win():
    paper = cleft.parse_config([])
    assert (paper.data, paper.text_model, paper.vision_model, paper.batch_size, paper.lr) == (
        "chexpert", "stanford-crfm/BioMedLM", "facebook/dinov2-base", 72, 4e-5)
    assert cleft.parse_config(["--batch-size", "8"]).batch_size == 8


def test_image_feature_is_mean_of_tokens_without_final_norm(demo_folder):
    vit, _ = cleft.load_pretrained(str(demo_folder / "tiny-dinov2"), "vision")
    tower = cleft.ImageTower(vit).eval()
    images = torch.randn(2, 3, 112, 112)
    model = tower.model
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet statistics, per channel
    pixels = (images - mean) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    tokens = model.encoder(
        model.embeddings(pixels)
    ).last_hidden_state  # the last block's output, before any norm
    torch.testing.assert_close(tower(images), tokens.mean(dim=1))
    assert isinstance(model.layernorm, torch.nn.Identity)


def test_saved_folders_hold_the_models_and_load_under_any_name(demo_folder, tmp_path):
    """The demo's folders are ordinary save_pretrained output: read back through AutoModel and
    AutoTokenizer they hold the random models of demo.TINY (seed 0), and a copy whose name starts
    with 'tiny' is a folder like any other."""
    from transformers import AutoConfig, AutoModel

    for name, (model_type, kwargs) in demo.TINY.items():
        torch.manual_seed(0)
        built = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs)).state_dict()
        kind = "vision" if model_type == "dinov2" else "text"
        loaded, tokenizer = cleft.load_pretrained(str(demo_folder / name), kind)
        assert not loaded.training  # from_pretrained's mode: training sets its own
        assert built.keys() == loaded.state_dict().keys()
        assert all(torch.equal(built[k], v) for k, v in loaded.state_dict().items())
        assert (tokenizer is None) == (kind == "vision")
    for name in ("tiny-gpt2", "tiny-dinov2"):
        shutil.copytree(demo_folder / name, tmp_path / name.replace("-", "_"))
    cfg = tiny_config(demo_folder, text_model=str(tmp_path / "tiny_gpt2"),
                      vision_model=str(tmp_path / "tiny_dinov2"))
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.manual_seed(0)
        copied = cleft.build_model(cfg).eval()(images, CAPTIONS[:2])
        original = tiny_model(demo_folder)(images, CAPTIONS[:2])
    for a, b in zip(copied, original):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unreachable_model_gives_one_clear_error(demo_folder):
    with pytest.raises(OSError) as error:  # the reusable part raises, with the fix
        cleft.load_pretrained("no-such-org/no-such-model", "text")
    message = str(error.value)
    assert "no-such-org/no-such-model" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(SystemExit) as stop:  # the scripts turn it into one line
        cleft.build_model(tiny_config(demo_folder, text_model="no-such-org/no-such-model"))
    assert str(stop.value) == f"error: {message}; `python demo.py` runs offline on tiny models."


def test_towers_and_loss_need_no_config(demo_folder):
    """The building blocks as a reader would copy them: loaded models and explicit arguments, no
    Config anywhere."""
    torch.manual_seed(0)
    vit, _ = cleft.load_pretrained(str(demo_folder / "tiny-dinov2"), "vision")
    image_tower = cleft.ImageTower(vit, checkpointing=False).eval()
    adapter = cleft.adapter_config("lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    text_tower_ = text_tower(demo_folder, adapter, max_length=32, checkpointing=False).eval()
    lora = [n for n, p in text_tower_.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)  # the LM frozen, the adapter trained
    assert sum(p.numel() for n, p in text_tower_.named_parameters() if p.requires_grad) == (
        2 * 4 * (64 + 192))
    image_projection = torch.nn.Linear(image_tower.width, 16)  # 96 -> 16
    text_projection = torch.nn.Linear(text_tower_.width, 16)  # 64 -> 16
    images = F.normalize(image_projection(image_tower(torch.rand(3, 1, 112, 112))), dim=-1)
    texts = F.normalize(text_projection(text_tower_(CAPTIONS[:3])), dim=-1)
    loss = cleft.contrastive_loss(images, texts, torch.tensor(2.0))
    loss.backward()
    assert images.shape == texts.shape == (3, 16) and torch.isfinite(loss) and loss > 0
    assert all(text_tower_.get_parameter(n).grad is not None for n in lora)


COPIED = ["adapter_config", "TextTower", "contrastive_loss"]


def copy_with_dependencies(names):
    """The source a reader copies out of cleft.py: the imports it needs, then `names` and every
    top-level cleft.py name they use, found by following the names each one mentions."""
    tree = ast.parse((ROOT / "cleft.py").read_text())
    lines = (ROOT / "cleft.py").read_text().splitlines()
    defined = {}  # top-level name -> its node
    imports = {}  # imported name -> the import line that binds it
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            defined[node.targets[0].id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound = (alias.asname or alias.name).split(".")[0]
                imports[bound] = ast.get_source_segment(
                    "\n".join(lines), node).replace("\n", " ")
    used_names = lambda node: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    chosen, todo = [], list(names)
    while todo:
        name = todo.pop()
        if name in chosen:
            continue
        chosen.append(name)
        todo += [n for n in used_names(defined[name]) if n in defined and n not in chosen]
    needed = set().union(*(used_names(defined[n]) for n in chosen))
    import_lines = sorted({imports[n] for n in needed if n in imports})
    ordered = [n for n in defined if n in chosen]  # in the file's order: each before its use
    body = ["\n".join(lines[defined[n].lineno - 1 - len(getattr(defined[n], "decorator_list", [])):
                            defined[n].end_lineno]) for n in ordered]
    return "\n".join(import_lines) + "\n\n" + "\n\n".join(body) + "\n", ordered


def test_the_reusable_parts_copy_out_and_run_on_any_gpt2_folder(demo_folder, tmp_path):
    """The text tower, its adapter config and the loss, with every cleft.py name they use, make at
    most 100 lines that mention no other project module and run unedited on a GPT-2 folder named
    tiny_gpt2, loaded with transformers."""
    source, names = copy_with_dependencies(COPIED)
    assert len(source.splitlines()) <= 100, (len(source.splitlines()), names)
    for name in ("cleft", "demo", "dry_run", "die", "grad_cache", "checkpoints", "image_io"):
        assert not re.search(rf"\b{name}\b", source), name  # no project module, no die
    shutil.copytree(demo_folder / "tiny-gpt2", tmp_path / "tiny_gpt2")
    usage = """
from transformers import AutoModel, AutoTokenizer
lm, tokenizer = AutoModel.from_pretrained("tiny_gpt2"), AutoTokenizer.from_pretrained("tiny_gpt2")
tower = TextTower(lm, tokenizer, adapter_config("lora"), max_length=32)
texts = torch.nn.functional.normalize(tower(["a chest x ray", "edema", "a chest x ray"]), dim=-1)
images = torch.nn.functional.normalize(torch.randn(3, tower.width), dim=-1)
loss = contrastive_loss(images, texts, torch.tensor(2.0))
loss.backward()
print("loss", round(loss.item(), 4), "trained", sum(p.grad is not None for p in tower.parameters()))
"""
    (tmp_path / "copied.py").write_text(source + usage)
    result = subprocess.run([sys.executable, "copied.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={"PATH": "", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 4" in result.stdout  # LoRA's A and B on the two blocks' c_attn


def project_imports():
    """{project file: the project files it imports, at the top or inside a function}."""
    files = {path.stem: path for path in ROOT.glob("*.py")}
    graph = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & set(files)
    return graph


def test_no_import_cycles_and_cleft_py_imports_no_stand_in():
    graph = project_imports()
    assert not graph["cleft"] & {"demo", "dry_run", "evaluate", "prompt_tune"}

    def reachable(start):
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += graph[name]
        return seen

    assert [name for name in graph if name in reachable(name)] == []  # no file reaches itself


def test_python_cleft_py_loads_once_and_without_data_names_the_demo():
    """Run as a script, cleft.py is __main__, and no import brings it in again as `cleft`. With
    no data it stops with one line that says what to pass and names the offline demo."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "cleft.py")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    imports = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = [line.split("|")[-1].strip() for line in imports]
    assert "image_io" in imported and "cleft" not in imported
    messages = [line for line in result.stderr.splitlines() if line not in imports]
    assert result.returncode == 1 and messages == [
        "error: no data: pass --data-root, the data set's folder (see README) or with --data csv a "
        "CSV of image,text pairs; `python demo.py` runs the offline demo."]
