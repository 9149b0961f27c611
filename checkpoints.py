"""
A run's files, written so that a crash never loses work: a checkpoint folder is written whole as
DIR.tmp and renamed into place (a crash between the two renames leaves DIR.old, which loading
falls back to), OUT/metrics.jsonl is cut back to the checkpoint's step on resume, and stage 2's
prompt file is written under a temporary name and renamed. cleft.py says what a checkpoint holds
and loads it; this is how the files are written. Not the method.
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def trained_weights(model):
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def save_checkpoint(directory, model, optimizer, cfg, step, best_val_loss):
    """OUT/{last,best}/ (see cleft.py), written to DIR.tmp/ and renamed: a crash while saving
    leaves the previous one whole. Rank 0 alone calls this."""
    directory, tmp, old = Path(directory), Path(f"{directory}.tmp"), Path(f"{directory}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    save_file(trained_weights(model), tmp / "model.safetensors")
    if cfg.peft != "none":  # loadable by PeftModel.from_pretrained
        model.text_tower.model.save_pretrained(tmp / "adapter")
    torch.save({"step": step, "best_val_loss": best_val_loss, "optimizer": optimizer.state_dict()},
               tmp / "state.pt")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)  # a crash from here on: loading falls back to DIR.old
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def saved_folder(directory):
    """DIR, or DIR.old if a crash hit between a save's two renames; None if neither holds one."""
    for folder in (Path(directory), Path(f"{directory}.old")):
        if (folder / "model.safetensors").exists():
            return folder
    return None


def start_metrics(path, resumed_step=None):
    """A new JSON-lines log at path, or on resume the old one without the steps after the
    checkpoint (they run again)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if resumed_step is not None and path.exists() else []
    kept = [line + "\n" for line in lines if line and json.loads(line)["step"] <= resumed_step]
    path.write_text("".join(kept))
    return path


def save_prompt(path, context, classes, cfg):
    """Stage 2's learned context (L, H), with its class names and config, to a safetensors file."""
    tmp = Path(f"{path}.tmp")
    save_file({"context": context.detach().cpu().contiguous()}, tmp,
              metadata={"classes": json.dumps(classes), "config": json.dumps(asdict(cfg))})
    os.replace(tmp, path)


def load_prompt(path):
    """(context (L, H), class names) from a file written by save_prompt."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("context"), json.loads(f.metadata()["classes"])
