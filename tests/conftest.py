import dataclasses
import os
import signal
import subprocess
import sys
from contextlib import suppress
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


# a multi-process command's limit: they take 10-40 s on a busy 2-core machine; a hang ends here
TIMEOUT = 150


def children_of():
    """{parent pid: [child pids]} of every running process (Linux: read from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, IndexError):  # a process that ended meanwhile
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def descendants(pid):
    """Every process under pid, its children's children too."""
    children = children_of()
    found = []
    unvisited = [pid]
    while unvisited:
        below = children.get(unvisited.pop(), [])
        found += below
        unvisited += below
    return found


def kill_tree(process):
    """SIGKILL to a Popen and every process under it: torchrun's workers run in sessions of their
    own, so killing its process group would leave them. All are found before any is killed (an
    orphan's parent becomes init, and the link is lost)."""
    for pid in [process.pid, *descendants(process.pid)]:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):  # a process missed would hold its pipes open
        process.communicate(timeout=30)


def communicate(process, timeout=TIMEOUT):
    """(stdout, stderr) of a Popen; on a timeout (or Ctrl-C) every process under it is killed
    first, and the test fails saying so."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail(f"{process.args[:4]}... ran past {timeout} s: it and every process under it "
                    "were killed")
    except BaseException:
        kill_tree(process)
        raise


def run_tree(command, **kwargs):
    """subprocess.run for a command that starts processes of its own (torchrun), with the whole
    tree killed if it runs past TIMEOUT."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    stdout, stderr = communicate(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(autouse=True)
def signal_handlers_put_back():
    """cleft.main records SIGTERM and Ctrl-C while it trains and puts the handlers back when it
    ends; a run that stops with an error leaves them to this."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in handlers.items():
        signal.signal(number, handler)


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """What `python demo.py` writes, smaller: a synthetic CheXpert-layout dataset in FOLDER/demo
    (300 patients, 10 images per 5x200 class) and the tiny models, saved with save_pretrained,
    in FOLDER/tiny-gpt2, tiny-dinov2 and tiny-bert. Every test loads them by path."""
    folder = tmp_path_factory.mktemp("demo")
    demo.prepare(folder, patients=300, per_class=10)
    return folder


@pytest.fixture(scope="session")
def demo_root(demo_folder):
    return demo_folder / "demo"


def stage1_flags(folder, *flags):
    """cleft.py's flags for the demo folder (its data, its tiny models); later flags win."""
    return [*demo.stage1_args(folder), *map(str, flags)]


def tiny_config(folder, **overrides):
    """The demo's stage-1 config (the tiny models in `folder`) with dropout off, so results are
    deterministic."""
    config = cleft.parse_config(stage1_flags(folder))
    return dataclasses.replace(config, **{"lora_dropout": 0.0, **overrides})


def tiny_model(folder, **overrides):
    """A tiny CLEFT loaded from the folders in eval mode (no dropout in the random GPT-2 either);
    gradients still flow."""
    import torch

    torch.manual_seed(0)
    return cleft.build_model(tiny_config(folder, **overrides)).eval()


@pytest.fixture(scope="session")
def stage1_ckpt(demo_folder, tmp_path_factory):
    """A stage-1 checkpoint from a short run on the small demo (with an image cache, which stages 2
    and 3 reuse)."""
    out = tmp_path_factory.mktemp("stage1")
    cleft.main(stage1_flags(demo_folder, "--out-dir", out, "--max-steps", 4, "--eval-every", 4,
                            "--batch-size", 8, "--num-workers", 0, "--image-cache", out / "cache"))
    return out / "best"
