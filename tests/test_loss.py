"""The contrastive loss against a direct transcription of the paper's Eq. 1, and the LR schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

import cleft
from conftest import tiny_model


def eq1(image_features, text_features, scale, positives=None):
    """Eq. 1 written out term by term: -1/2N sum_i [log p(t_i | v_i) + log p(v_i | t_i)], with
    optional soft targets: row i's target mass is spread evenly over its positives."""
    n = len(image_features)
    positives = positives or [[i] for i in range(n)]
    sim = [
        [scale * float(image_features[i] @ text_features[j]) for j in range(n)] for i in range(n)
    ]
    total = 0.0
    for i in range(n):
        log_norm_image = math.log(sum(math.exp(sim[i][j]) for j in range(n)))
        log_norm_text = math.log(sum(math.exp(sim[j][i]) for j in range(n)))
        for j in positives[i]:
            weight = 1 / len(positives[i])
            total -= weight * (sim[i][j] - log_norm_image) + weight * (sim[j][i] - log_norm_text)
    return total / (2 * n)


def random_features(n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, d, generator=g), dim=-1),
        F.normalize(torch.randn(n, d, generator=g), dim=-1),
    )


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_loss_equals_eq1(scale):
    images, texts = random_features(7)
    loss = cleft.contrastive_loss(images, texts, torch.tensor(math.log(scale)))
    assert loss.item() == pytest.approx(eq1(images, texts, scale), rel=1e-5)


def test_loss_is_fp32_for_bf16_features():
    images, texts = random_features(6)
    loss = cleft.contrastive_loss(images.bfloat16(), texts.bfloat16(), torch.tensor(math.log(20.0)))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        eq1(images.bfloat16().float(), texts.bfloat16().float(), 20.0), rel=1e-5
    )


def test_multi_positive_matches_soft_target_eq1():
    captions = ["a", "b", "a", "c", "b", "a"]
    images, texts = random_features(len(captions), seed=1)
    ids = cleft.caption_ids(captions)
    positives = [[j for j, other in enumerate(captions) if other == c] for c in captions]
    loss = cleft.contrastive_loss(images, texts, torch.tensor(math.log(10.0)), ids)
    assert loss.item() == pytest.approx(eq1(images, texts, 10.0, positives), rel=1e-5)
    # with all captions distinct, multi-positive is the ordinary loss
    unique = cleft.caption_ids([str(i) for i in range(6)])
    assert cleft.contrastive_loss(images, texts, torch.tensor(2.0), unique).item() == pytest.approx(
        cleft.contrastive_loss(images, texts, torch.tensor(2.0)).item(), rel=1e-6
    )


def test_logit_scale_gradient_flows():
    images, texts = random_features(5)
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    cleft.contrastive_loss(images, texts, logit_scale).backward()
    assert logit_scale.grad is not None and logit_scale.grad.abs() > 0


def test_lr_schedule_warmup_then_cosine():
    lrs = [cleft.get_lr(step, max_lr=1e-3, warmup_steps=10, max_steps=110) for step in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then falling
    assert lrs[60] == pytest.approx(0.5e-3)  # half way through the cosine
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_scale_and_vectors(demo_folder):
    model = tiny_model(demo_folder)
    optimizer = cleft.make_optimizer(model, lr=1e-3, weight_decay=0.2)
    decayed, plain = (set(map(id, group["params"])) for group in optimizer.param_groups)
    assert (
        optimizer.param_groups[0]["weight_decay"] == 0.2
        and optimizer.param_groups[1]["weight_decay"] == 0.0
    )
    assert id(model.logit_scale) in plain and id(model.image_projection.weight) in decayed
    assert len(decayed | plain) == sum(p.requires_grad for p in model.parameters())


def test_ia3_vectors_get_no_weight_decay(demo_folder):
    """peft stores IA3's scaling vectors as (d, 1) and (1, d) tensors: vectors all the same."""
    model = tiny_model(demo_folder, peft="ia3")
    optimizer = cleft.make_optimizer(model, lr=1e-3, weight_decay=0.2)
    decayed = set(map(id, optimizer.param_groups[0]["params"]))
    ia3 = [p for n, p in model.named_parameters() if "ia3_l" in n]
    assert len(ia3) == 4 and not any(id(p) in decayed for p in ia3)
    assert id(model.text_projection.weight) in decayed
