"""Text tower (EOS pooling, truncation, dynamic padding, de-duplication, PEFT variants), image
tower, the towers and the loss without any Config, and loading models through the real
from_pretrained path, offline."""

import pytest
import torch
import torch.nn.functional as F

import cleft
import demo
from conftest import tiny_config, tiny_model

CAPTIONS = [
    "this is a chest x ray of a patient with edema",
    "this is a chest x ray of a patient with no finding",
    "this is a chest x ray of a patient with edema",  # a repeat, as label-built captions do
    "short",
]


def test_eos_is_appended_and_pooled_position_is_it():
    tower = cleft.TextTower("tiny")
    input_ids, attention_mask, eos_positions = tower.tokenize(CAPTIONS)
    lengths = [
        len(c.encode()) + 1 for c in CAPTIONS
    ]  # byte-level tokenizer: one token per byte, plus EOS
    assert input_ids.shape == (4, max(lengths))  # padded to the longest caption, not to max_length
    assert eos_positions.tolist() == [n - 1 for n in lengths]
    assert attention_mask.sum(dim=1).tolist() == lengths
    for row, eos in zip(input_ids, eos_positions):
        assert row[eos] == tower.eos_id and (row[:eos] != tower.eos_id).all()


def test_truncation_keeps_the_eos():
    tower = cleft.TextTower("tiny", max_length=16)
    input_ids, _, eos_positions = tower.tokenize(["x" * 100, "ab"])
    assert input_ids.shape == (2, 16)
    assert eos_positions.tolist() == [15, 2]
    assert (
        input_ids[0, 15] == tower.eos_id
        and input_ids[0, :15].tolist() == tower.tokenizer("x" * 15)["input_ids"]
    )


def naive_text_features(tower, captions, pad_to):
    """The public code's way: every caption encoded, all padded to a fixed length."""
    ids = [
        tower.tokenizer(c, add_special_tokens=False)["input_ids"][: pad_to - 1] + [tower.eos_id]
        for c in captions
    ]
    input_ids = torch.tensor([x + [tower.eos_id] * (pad_to - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (pad_to - len(x)) for x in ids])
    hidden = tower.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(len(ids)), torch.tensor([len(x) - 1 for x in ids])]


@pytest.mark.parametrize("peft", ["lora", "ia3", "prefix"])
def test_dynamic_padding_and_dedup_equal_naive(peft):
    torch.manual_seed(0)
    tower = cleft.CLEFT(tiny_config(peft=peft)).text_tower.eval()
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


def test_trainable_parameters_of_each_variant():
    tower = lambda **kw: cleft.CLEFT(tiny_config(**kw)).text_tower
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


def test_demo_defaults_yield_to_explicit_flags():
    cfg = cleft.parse_config(["--batch-size", "8"])
    assert (cfg.text_model, cfg.batch_size, cfg.max_steps) == (
        "tiny",
        8,
        demo.DEFAULTS["Config"]["max_steps"],
    )
    real = cleft.parse_config(["--data", "chexpert"])
    assert (real.text_model, real.vision_model, real.batch_size, real.lr) == (
        "stanford-crfm/BioMedLM",
        "facebook/dinov2-base",
        72,
        4e-5,
    )


def test_image_feature_is_mean_of_tokens_without_final_norm():
    torch.manual_seed(0)
    tower = cleft.ImageTower("tiny").eval()
    images = torch.randn(2, 3, 112, 112)
    model = tower.model
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet statistics, per channel
    pixels = (images - mean) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    tokens = model.encoder(
        model.embeddings(pixels)
    ).last_hidden_state  # the last block's output, before any norm
    torch.testing.assert_close(tower(images), tokens.mean(dim=1))
    assert isinstance(model.layernorm, torch.nn.Identity)


def test_models_load_through_from_pretrained(tmp_path):
    """tiny models saved with save_pretrained and read back through AutoModel/AutoTokenizer give the
    same features."""
    text, tokenizer = cleft.load_pretrained("tiny", "text")
    text.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    vision, _ = cleft.load_pretrained("tiny", "vision")
    vision.save_pretrained(tmp_path / "vision")
    from_code = tiny_model()
    from_disk = tiny_model(text_model=str(tmp_path / "text"), vision_model=str(tmp_path / "vision"))
    code, disk = from_code.state_dict(), from_disk.state_dict()
    towers = [k for k in code if k.startswith(("image_tower.", "text_tower.")) and "lora_" not in k]
    assert len(towers) > 40 and all(torch.equal(code[k], disk[k]) for k in towers)  # read from disk
    # the parts that are not the loaded models (projections, temperature, adapter) made equal
    from_disk.load_state_dict({k: v for k, v in code.items() if k not in towers}, strict=False)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        for a, b in zip(from_code(images, CAPTIONS[:2]), from_disk(images, CAPTIONS[:2])):
            torch.testing.assert_close(a, b)


def test_unreachable_model_gives_one_clear_error():
    with pytest.raises(SystemExit) as error:
        cleft.TextTower("no-such-org/no-such-model")
    message = str(error.value)
    assert (
        "no-such-org/no-such-model" in message and "HF_HUB_OFFLINE" in message and "tiny" in message
    )


def test_towers_and_loss_need_no_config():
    """The building blocks as a reader would copy them: explicit arguments, no Config anywhere."""
    torch.manual_seed(0)
    image_tower = cleft.ImageTower("tiny", checkpointing=False).eval()
    adapter = cleft.adapter_config("lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    text_tower = cleft.TextTower("tiny", adapter, max_length=32, checkpointing=False).eval()
    lora = [n for n, p in text_tower.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)  # the LM frozen, the adapter trained
    assert sum(p.numel() for n, p in text_tower.named_parameters() if p.requires_grad) == 2 * 4 * (
        64 + 192
    )
    image_projection = torch.nn.Linear(image_tower.width, 16)  # 96 -> 16
    text_projection = torch.nn.Linear(text_tower.width, 16)  # 64 -> 16
    images = F.normalize(image_projection(image_tower(torch.rand(3, 1, 112, 112))), dim=-1)
    texts = F.normalize(text_projection(text_tower(CAPTIONS[:3])), dim=-1)
    loss = cleft.contrastive_loss(images, texts, torch.tensor(2.0))
    loss.backward()
    assert images.shape == texts.shape == (3, 16) and torch.isfinite(loss) and loss > 0
    assert all(text_tower.get_parameter(n).grad is not None for n in lora)
