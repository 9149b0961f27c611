"""Two gloo processes on halves of a global batch give the loss and gradients of one process on all
of it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from dist_worker import global_batch, loss_and_grads

TESTS = Path(__file__).parent


def torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("multi_positive, accum_steps", [(False, 1), (True, 1), (False, 2)])
def test_two_processes_equal_one(demo_folder, tmp_path, multi_positive, accum_steps):
    """With --accum-steps 2 each rank runs 2 micro-batches (gradient cache, DDP synchronised on the
    last)."""
    out = tmp_path / "two.pt"
    flags = (["--multi-positive"] if multi_positive else []) + ["--accum-steps", str(accum_steps)]
    result = torchrun(TESTS / "dist_worker.py", demo_folder, out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    images, captions = global_batch()
    loss, grads = loss_and_grads(tiny_model(demo_folder), images, captions, multi_positive)
    torch.testing.assert_close(two["loss"], loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == two["grads"].keys()
    for name in grads:  # projections, image tower, LoRA and the temperature
        torch.testing.assert_close(two["grads"][name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert grads["logit_scale"].abs() > 0


def test_ranks_that_disagree_about_resuming_all_stop(tmp_path):
    """Rank 1 sees OUT/last/ and rank 0 does not: neither goes on alone (one would wait for the
    other until the timeout); rank 0 prints the one message, rank 1 exits silently with code 1."""
    result = torchrun(TESTS / "resume_worker.py", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == (
        f"exit error: some processes see a checkpoint in {tmp_path / 'node0' / 'last'} and others "
        "do not: put --out-dir on a file system that every node shares.")
    assert (tmp_path / "rank1.txt").read_text() == "exit 1"
