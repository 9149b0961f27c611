import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault(
    "HF_HUB_OFFLINE", "1"
)  # a hub request would hang ~30 s before failing; tests never need one
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import cleft  # noqa: E402
import demo  # noqa: E402


def pytest_configure(config):
    # the filter cleft.py applies at import (pytest resets the filters set while it imports)
    pattern = "`(is_gradient_checkpointing|past_key_values)` is deprecated"
    config.addinivalue_line("filterwarnings", f"ignore:{pattern}")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small synthetic CheXpert-layout dataset (300 patients, 10 images per 5x200 class)."""
    root = tmp_path_factory.mktemp("data") / "demo"
    demo.make_demo_dataset(root, patients=300, per_class=10)
    return root


def tiny_config(**overrides):
    """The demo's config (tiny models) with dropout off, so results are deterministic."""
    return dataclasses.replace(cleft.parse_config([]), **{"lora_dropout": 0.0, **overrides})


def tiny_model(**overrides):
    """A tiny CLEFT in eval mode (no dropout in the random GPT-2 either); gradients still flow."""
    import torch

    torch.manual_seed(0)
    return cleft.CLEFT(tiny_config(**overrides)).eval()


@pytest.fixture(scope="session")
def stage1_ckpt(demo_root, tmp_path_factory):
    """A stage-1 checkpoint from a short run on the small demo (with an image cache, which stages 2
    and 3 reuse)."""
    out = tmp_path_factory.mktemp("stage1")
    cleft.main(
        [
            "--data-root",
            str(demo_root),
            "--out-dir",
            str(out),
            "--max-steps",
            "4",
            "--eval-every",
            "4",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--image-cache",
            str(out / "cache"),
        ]
    )
    return out / "best"
