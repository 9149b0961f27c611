"""The paper's baseline rows (Tables 1 and 2), which evaluate.py scores without a CLEFT checkpoint:
ImageNet-ViT is a pre-trained image tower as CLEFT uses it, Random-ViT the same architecture with
seeded random weights, CLIP-ViT a CLIP checkpoint with its own text tower (so zero-shot too).

    python evaluate.py --vision-model facebook/dinov2-base --data rsna --data-root /data/rsna
    python evaluate.py --vision-model facebook/dinov2-base --random-init --data rsna ...
    python evaluate.py --vision-model openai/clip-vit-base-patch16 --data rsna ...
"""

import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer

from cleft import CLEFT, ImageTower, die, load_pretrained
from dry_run import architecture

TOWERS = ["dinov2", "dinov2_with_registers", "clip"]  # the model types a baseline row takes
# OpenAI CLIP's pixel statistics: its images are normalised with these, not ImageNet's
CLIP_STATISTICS = {"mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711]}

class ClipImageTower(nn.Module):
    """CLIP's vision transformer; the image feature is its pooled output, the class token after
    the final layer norm (CLIP's own)."""

    def __init__(self, vision_model):
        super().__init__()
        self.model = vision_model
        self.width = vision_model.config.hidden_size
        self.side = vision_model.config.image_size  # the input side CLIP was trained at
        for name, values in CLIP_STATISTICS.items():
            self.register_buffer(name, torch.tensor(values).view(3, 1, 1), persistent=False)

    def forward(self, images):  # (B, 1 or 3, S, S) pixels in [0, 1] -> (B, width)
        pixels = (images.expand(-1, 3, -1, -1) - self.mean) / self.std  # gray to 3 channels
        # any input side: the position embeddings are interpolated (unchanged at CLIP's own)
        return self.model(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output

class ClipTextTower(nn.Module):
    """CLIP's text transformer with its tokenizer; the text feature is its pooled output, the
    end-of-text token's (CLIP's own)."""

    def __init__(self, text_model, tokenizer):
        super().__init__()
        self.model = text_model
        self.tokenizer = tokenizer
        self.width = text_model.config.hidden_size
        self.max_length = text_model.config.max_position_embeddings  # 77 tokens in OpenAI's

    def forward(self, captions):  # B strings -> (B, width)
        tokens = self.tokenizer(captions, padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        device = self.model.embeddings.token_embedding.weight.device
        return self.model(input_ids=tokens["input_ids"].to(device),
                          attention_mask=tokens["attention_mask"].to(device)).pooler_output

def clip_as_cleft(clip, tokenizer):
    """A CLIPModel in CLEFT's shape (image_tower, encode_image, encode_text, logit_scale), every
    weight CLIP's own: its towers, its two projections and its learned temperature."""
    image_tower = ClipImageTower(clip.vision_model)
    text_tower = ClipTextTower(clip.text_model, tokenizer)
    model = CLEFT(image_tower, text_tower, clip.config.projection_dim)
    model.image_projection = clip.visual_projection  # (width -> D), no bias, as CLEFT's
    model.text_projection = clip.text_projection
    model.logit_scale = clip.logit_scale  # log(100) in OpenAI's
    return model

class ImageOnly(nn.Module):
    """An image tower alone: the linear probe and the fine-tune need no text tower."""

    def __init__(self, image_tower):
        super().__init__()
        self.image_tower = image_tower

def load_baseline(name, random_init=False, seed=0):
    """(model, row): a CLIP checkpoint is the CLIP-ViT row; a DINOv2 model (hub id or folder) the
    ImageNet-ViT row, as CLEFT's image tower (the mean of the last block's tokens, no final
    norm); with random_init the Random-ViT row: that architecture, weights drawn with `seed`."""
    try:
        config = architecture(name)  # the paper's models: a stored copy, no hub request
    except (OSError, ValueError) as error:
        die(f"cannot read the configuration of '{name}' ({str(error).splitlines()[0]}): pass a "
            "hub id (once online, or unset HF_HUB_OFFLINE) or a local save_pretrained folder.")
    if config.model_type not in TOWERS:
        die(f"'{name}' is a {config.model_type} model: --vision-model takes a DINOv2 model (the "
            "tower CLEFT trains, e.g. facebook/dinov2-base) or a CLIP checkpoint.")
    if config.model_type == "clip" and random_init:
        die("--random-init draws the image tower CLEFT trains (a DINOv2 architecture): pass one "
            "as --vision-model, e.g. facebook/dinov2-base.")
    if random_init:
        torch.manual_seed(seed)
        vit = AutoModel.from_config(config)
        return ImageOnly(ImageTower(vit, checkpointing=False)), "Random-ViT"
    try:
        model, _ = load_pretrained(name, "vision")
    except OSError as error:  # its message says what to do
        die(f"{error}.")
    if config.model_type != "clip":
        return ImageOnly(ImageTower(model, checkpointing=False)), "ImageNet-ViT"
    try:  # CLIP's zero-shot needs its own tokenizer, saved beside the model
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        die(f"cannot load the tokenizer of '{name}' ({str(error).splitlines()[0]}): a CLIP folder "
            "holds its tokenizer's files beside the model's (save both with save_pretrained).")
    return clip_as_cleft(model, tokenizer), "CLIP-ViT"
