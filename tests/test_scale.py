"""Paper-scale fidelity: the parameter report (dry_run.py) on the meta device, the medclip-vit-l
preset, and exact large-batch gradients with --accum-steps (gradient cache)."""

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cleft
import dry_run
from conftest import stage1_flags, tiny_config, tiny_model
from dist_worker import global_batch
from image_io import load_image

ROOT = Path(__file__).resolve().parents[1]


def dry_run_counts(*flags):
    """(text tower trained, text tower total, image tower total, all total) of the paper-size model,
    on meta."""
    model = dry_run.meta_model(cleft.parse_config(list(flags)))  # the paper's models
    count = lambda module, trained=False: sum(
        p.numel() for p in module.parameters() if p.requires_grad or not trained
    )
    assert all(p.is_meta for p in model.parameters())  # nothing allocated, nothing downloaded
    return (
        count(model.text_tower, True),
        count(model.text_tower),
        count(model.image_tower),
        count(model),
    )


def test_dry_run_counts_the_papers_model():
    lora, lm_total, image_total, _ = dry_run_counts()
    assert lora == 32 * 8 * (2560 + 7680) == 2_621_440  # the paper's "LM #Param 2.6M"
    assert (
        lm_total - lora == 2_594_247_680
    )  # BioMedLM's GPT-2 body: 32 blocks of width 2560, vocabulary 28,896
    assert image_total == 86_580_480 - 2 * 768  # DINOv2 ViT-B/14 without its final layer norm
    assert dry_run_counts("--peft", "ia3")[0] == 32 * (
        7680 + 10240
    )  # c_attn outputs and mlp.c_proj inputs
    assert (
        dry_run_counts("--peft", "prefix")[0] == 20 * 32 * 2 * 2560
    )  # keys and values of 20 virtual tokens
    assert dry_run_counts("--freeze-lm")[0] == 0
    assert dry_run_counts("--full-ft-lm")[0] == 2_594_247_680
    assert dry_run_counts("--train-embed")[0] == 2_621_440 + 28896 * 2560


def test_dry_run_counts_the_preset():
    _, bert, vit_l, total = dry_run_counts("--preset", "medclip-vit-l")
    assert (
        bert == 109_482_240 - 590_592
    )  # BERT-base without the pooler layer that [CLS] pooling leaves unused
    assert vit_l == 304_368_640 - 2 * 1024  # DINOv2 ViT-L/14 without its final layer norm
    assert total == bert + vit_l + (768 + 1024) * 512 + 1


def test_dry_run_prints_the_table_offline():
    result = subprocess.run(
        [sys.executable, str(ROOT / "dry_run.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "| text tower (stanford-crfm/BioMedLM, lora) | 2,596,869,120 | 2,621,440 |" in result.stdout
    )
    assert "vs a fully trained BERT-base text tower (108,891,648): 2.41%" in result.stdout
    # the paper's comparison (Fig. 1): vanilla CLIP ViT-B/16, 63.4M text tower, 149.6M in all
    assert "vs vanilla CLIP ViT-B/16's text tower (63,428,096): 4.13%" in result.stdout
    assert "vs vanilla CLIP ViT-B/16 (149,620,737): 39.2% fewer" in result.stdout


def test_preset_defaults_yield_to_flags():
    cfg = cleft.parse_config(["--preset", "medclip-vit-l", "--data", "chexpert", "--lr", "1e-4"])
    assert (
        cfg.text_model,
        cfg.vision_model,
        cfg.batch_size,
        cfg.weight_decay,
        cfg.warmup_steps,
        cfg.max_length,
    ) == ("microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext",
          "facebook/dinov2-large", 4096, 0.1, 2000, 77)
    # trained on MIMIC-CXR and Open-I reports, centre crops, 50,000 validation pairs
    assert (cfg.data, cfg.square, cfg.val_size) == ("chexpert", "crop", 50_000)
    assert cleft.parse_config(["--preset", "medclip-vit-l"]).data == "mimic-cxr,openi"
    assert (cfg.lr, cfg.peft, cfg.full_ft_lm, cfg.augment, cfg.hflip) == (
        1e-4,
        "none",
        True,
        "clip",
        True,
    )


def test_encoder_text_tower_reads_cls(demo_folder):
    encoder, tokenizer = cleft.load_pretrained(str(demo_folder / "tiny-bert"), "text")
    tower = cleft.EncoderTextTower(encoder, tokenizer, max_length=12, train_lm=True)
    input_ids, mask, positions = tower.tokenize(["ab", "x" * 50])
    cls, sep, pad = (tower.tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert positions.tolist() == [0, 0] and input_ids.shape == (2, 12)
    assert (
        input_ids[0].tolist()
        == [cls, *tower.tokenizer("ab", add_special_tokens=False)["input_ids"], sep] + [pad] * 8
    )
    assert (
        input_ids[1, 0] == cls and input_ids[1, -1] == sep and mask[0].sum() == 4
    )  # truncation keeps [SEP]
    assert tower.model.pooler is None and all(p.requires_grad for p in tower.parameters())


def test_preset_trains_on_the_demo(demo_folder, tmp_path):
    bert = demo_folder / "tiny-bert"
    cleft.main(stage1_flags(demo_folder, "--preset", "medclip-vit-l", "--data", "chexpert",
                            "--text-model", bert,
                            "--out-dir", tmp_path, "--max-steps", 2, "--eval-every", 2,
                            "--batch-size", 8, "--num-workers", 0))
    config = cleft.load_config(tmp_path / "last")
    assert (config.text_model, config.augment, config.hflip) == (str(bert), "clip", True)
    assert isinstance(cleft.load_model(tmp_path / "last").text_tower, cleft.EncoderTextTower)
    saved = load_file(tmp_path / "last" / "model.safetensors")
    assert any(
        k.startswith("text_tower.model.encoder.layer.0") for k in saved
    )  # the whole BERT is trained


def test_clip_augmentation_is_a_centre_crop(tmp_path):
    import numpy as np
    from PIL import Image

    pixels = np.zeros((300, 600), np.uint8)
    pixels[:, 300:] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    for seed in range(5):
        view = load_image(
            tmp_path / "wide.png", 64, np.random.default_rng(seed), affine=False
        )
        rows = view[0][16:48]  # the image; rows 0-15 and 48-63 are the padding to a square
        edge = (rows > 0.5).float().argmax(dim=1)  # first bright column of each row
        assert (edge == 32).all()  # no shift, zoom or rotation: the boundary stays in the centre
        assert view[0][:16].abs().max() < 0.4 and view[0][48:].abs().max() < 0.4  # padding


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def perturbed_model(folder, dropout):
    model = tiny_model(folder, lora_dropout=0.1 if dropout else 0.0)
    model.train(dropout)  # dropout on: train mode (LoRA and GPT-2 dropout)
    with torch.no_grad():
        for p in model.text_tower.parameters():
            if p.requires_grad:
                p.add_(
                    0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                )
    return model


@pytest.mark.parametrize("multi_positive", [False, True])
def test_accumulated_gradients_equal_the_full_batch_without_dropout(demo_folder, multi_positive):
    images, captions = global_batch()
    results = []
    for accum_steps in (1, 4):
        model = perturbed_model(demo_folder, dropout=False)
        loss = cleft.train_step(model, images, captions, nullcontext(), accum_steps, multi_positive)
        results.append((loss, grads_of(model)))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name in results[0][1]:
        torch.testing.assert_close(
            results[1][1][name], results[0][1][name], rtol=1e-4, atol=1e-6, msg=name
        )


def test_accumulated_gradients_replay_dropout_exactly(demo_folder):
    """Dropout on: gradient cache equals back-propagating the whole batch through one graph built
    from the same 4 micro-batch forwards (the same dropout masks), which is what a GPU with enough
    memory would compute."""
    images, captions = global_batch()
    torch.manual_seed(7)
    model = perturbed_model(demo_folder, dropout=True)
    features = [
        model(images[k : k + 2], captions[k : k + 2]) for k in range(0, 8, 2)
    ]  # with a graph
    loss = cleft.contrastive_loss(
        torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features]), model.logit_scale
    )
    loss.backward()
    reference = grads_of(model)
    torch.manual_seed(7)
    model = perturbed_model(demo_folder, dropout=True)
    cached_loss = cleft.train_step(model, images, captions, nullcontext(), accum_steps=4)
    torch.testing.assert_close(cached_loss, loss.detach())
    for name, grad in grads_of(model).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert reference["logit_scale"].abs() > 0


def test_short_demo_run_with_accumulation(demo_folder, tmp_path):
    cleft.main(stage1_flags(demo_folder, "--out-dir", tmp_path, "--max-steps", 3, "--eval-every", 3,
                            "--batch-size", 8, "--accum-steps", 4, "--num-workers", 0))
    assert torch.load(tmp_path / "last" / "state.pt", weights_only=True)["step"] == 3
    with pytest.raises(SystemExit, match="each one's share must divide by --accum-steps 3"):
        cleft.main(stage1_flags(demo_folder, "--batch-size", 8, "--accum-steps", 3,
                                "--out-dir", tmp_path / "other"))


@pytest.mark.parametrize("peft", ["lora", "ia3", "prefix"])
def test_frozen_weights_in_bf16_are_exact_under_bf16_autocast(demo_folder, peft):
    """Under bf16 autocast the frozen LM's matmul weights are cast to bf16 at every use, so storing
    them in bf16 gives the same loss and the same gradient for every trained tensor."""
    images, captions = global_batch()
    results = []
    for cast in (False, True):
        model = tiny_model(demo_folder, peft=peft)
        with torch.no_grad():  # adapters away from their identity start, so they matter
            for p in model.text_tower.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        if cast:
            cleft.frozen_to_bf16(model)
        loss = cleft.train_step(model, images, captions, torch.autocast("cpu", torch.bfloat16))
        results.append((loss, grads_of(model), model))
    (loss32, grads32, _), (loss16, grads16, model) = results
    assert torch.equal(loss32, loss16) and grads32.keys() == grads16.keys()
    assert all(torch.equal(grads32[name], grads16[name]) for name in grads32)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    frozen = [n for n in dtypes if n.endswith(("c_attn.weight", "c_attn.base_layer.weight",
                                              "mlp.c_fc.weight", "mlp.c_proj.weight",
                                              "mlp.c_proj.base_layer.weight"))]
    assert len(frozen) == 2 * 3 and all(dtypes[n] == torch.bfloat16 for n in frozen)
    assert all(dtypes[n] == torch.float32 for n in grads16)  # everything trained stays fp32
    embeddings = [n for n in dtypes if n.endswith(("wte.weight", "wpe.weight"))]
    assert len(embeddings) == 2 and all(dtypes[n] == torch.float32 for n in embeddings)


@pytest.mark.parametrize("ablation", [{"peft": "lora"}, {"peft": "ia3"}, {"peft": "prefix"},
                                      {"full_ft_lm": True}, {"train_embed": True}])
def test_trained_parameters_stay_fp32_under_bf16(demo_folder, ablation):
    """A bf16 run (the model as main builds it) stores the frozen LM's matmul weights in bf16, and
    every trained parameter in fp32, the LM's own under --full-ft-lm included: Adam's small updates
    to bf16 master weights would vanish."""
    cfg = tiny_config(demo_folder, **ablation)
    model, optimizer = cleft.model_and_optimizer(cfg, None, torch.device("cpu"), "bf16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(dtypes[n] == torch.float32 for n in trained)
    assert all(p.dtype == torch.float32 for group in optimizer.param_groups
               for p in group["params"])
    lm_matmuls = [n for n in dtypes if n.endswith(("c_attn.weight", "c_attn.base_layer.weight"))]
    assert len(lm_matmuls) == 2  # one per layer of the tiny GPT-2
    if ablation.get("full_ft_lm"):  # trained: fp32, like every trained parameter
        assert all(n in trained for n in lm_matmuls)
    else:  # frozen: bf16, half the memory
        assert all(dtypes[n] == torch.bfloat16 for n in lm_matmuls)


def test_dry_run_never_asks_the_hub():
    """The models a dry run builds (the default, the preset and the comparisons) are stored
    architectures: with the hub unreachable and HF_HUB_OFFLINE unset it still succeeds, without a
    single request (each would retry and print 'Retrying' for about 30 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there
    for flags in ([], ["--preset", "medclip-vit-l"]):
        result = subprocess.run([sys.executable, str(ROOT / "dry_run.py"), *flags],
                                env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "| **total** |" in result.stdout and "Retrying" not in result.stderr
