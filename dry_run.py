"""
The parameter table of the model that cleft.py's flags configure, built on PyTorch's meta device
from stored architectures (no weights, no memory, no download, seconds), and set against the
paper's comparison, vanilla CLIP ViT-B/16 (its Fig. 1), and a CLIP with a fully trained BERT-base
text tower. Not part of the method.

    python dry_run.py                      # the paper's model: BioMedLM + LoRA, DINOv2 ViT-B/14
    python dry_run.py --peft ia3           # any of cleft.py's model flags
    python dry_run.py --preset medclip-vit-l
"""

from dataclasses import replace

import torch
import torch.nn as nn

from transformers import AutoConfig, AutoModel

from cleft import build_model, parse_config

ARCHITECTURES = {  # hub id -> (model type, config) of the paper's and the preset's models
    "stanford-crfm/BioMedLM": ("gpt2", dict(vocab_size=28896, n_positions=1024, n_embd=2560,
                                            n_layer=32, n_head=20, bos_token_id=28895,
                                            eos_token_id=28895)),
    "facebook/dinov2-base": ("dinov2", dict(hidden_size=768, num_hidden_layers=12,
                                            num_attention_heads=12, image_size=518, patch_size=14)),
    "facebook/dinov2-with-registers-base": ("dinov2_with_registers", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518,
        patch_size=14, num_register_tokens=4)),
    "facebook/dinov2-large": ("dinov2", dict(hidden_size=1024, num_hidden_layers=24,
                                             num_attention_heads=16, image_size=518,
                                             patch_size=14)),
    "bert-base-uncased": ("bert", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                       num_attention_heads=12)),
    # the preset's domain BERT (PubMedBERT): BERT-base with a biomedical vocabulary of the same size
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext": ("bert", dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        pad_token_id=0)),
    "openai/clip-vit-base-patch16": ("clip", dict(projection_dim=512, text_config=dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
        max_position_embeddings=77, vocab_size=49408), vision_config=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16))),
}


def architecture(name):
    """The config of model `name`: the stored copy for the models above (no hub request), else
    read from the hub or a local directory."""
    if name in ARCHITECTURES:
        model_type, kwargs = ARCHITECTURES[name]
        return AutoConfig.for_model(model_type, **kwargs)
    return AutoConfig.from_pretrained(name)


def meta_model(cfg):
    """CLEFT as cfg describes it, on the meta device: the towers of training, handed models built
    from their architecture alone (no weights, no memory, no download)."""

    def architecture_only(name, kind):  # nothing is tokenized here, so no tokenizer is needed
        return AutoModel.from_config(architecture(name)), None

    with torch.device("meta"):
        return build_model(cfg, load=architecture_only)


def parameter_report(cfg):
    """A Markdown table of the parameters of each part, total and trained, and the ratios."""
    bert_cfg = replace(cfg, text_model="bert-base-uncased", peft="none", full_ft_lm=True,
                       freeze_lm=False)
    model = meta_model(cfg)
    bert = meta_model(bert_cfg)
    with torch.device("meta"):
        clip = AutoModel.from_config(architecture("openai/clip-vit-base-patch16"))
    count = lambda module: sum(p.numel() for p in module.parameters())
    trained = lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad)
    lm_mode = "frozen" if cfg.freeze_lm else "fully trained" if cfg.full_ft_lm else cfg.peft
    lm_mode += ", embeddings trained" if cfg.train_embed else ""
    rows = [(f"image tower ({cfg.vision_model})", model.image_tower),
            (f"text tower ({cfg.text_model}, {lm_mode})", model.text_tower),
            ("projections", nn.ModuleList([model.image_projection, model.text_projection]))]
    lines = ["| part | parameters | trained |", "|---|---:|---:|"]
    lines += [f"| {name} | {count(m):,} | {trained(m):,} |" for name, m in rows]
    lines += ["| temperature | 1 | 1 |",
              f"| **total** | **{count(model):,}** | **{trained(model):,}** |", ""]
    lm, lm_total = trained(model.text_tower), count(model.text_tower)
    bert_lm = trained(bert.text_tower)
    clip_text = count(clip.text_model) + count(clip.text_projection)  # all of CLIP is trained
    lines += [f"trained share of the text tower: {100 * lm / lm_total:.3f}% ({lm:,} of "
              f"{lm_total:,})",
              "trained text-tower parameters vs vanilla CLIP ViT-B/16's text tower "
              f"({clip_text:,}): {100 * lm / clip_text:.2f}%",
              f"trained parameters in all vs vanilla CLIP ViT-B/16 ({count(clip):,}): "
              f"{100 * (1 - trained(model) / count(clip)):.1f}% fewer",
              "trained text-tower parameters vs a fully trained BERT-base text tower "
              f"({bert_lm:,}): {100 * lm / bert_lm:.2f}%",
              f"trained parameters in all vs a CLIP with that text tower ({trained(bert):,}): "
              f"{100 * trained(model) / trained(bert):.1f}%"]
    return "\n".join(lines)


def main(argv=None):  # cleft.py's flags; the paper's models unless --text-model etc. say otherwise
    print(parameter_report(parse_config(argv)))


if __name__ == "__main__":
    main()
