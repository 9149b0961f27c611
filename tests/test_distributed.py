"""Two gloo processes on halves of a global batch give the loss and gradients of one process on all
of it; ranks that disagree about resuming all stop; the process group is released last."""

import os
import signal
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import cleft
from checkpoints import StopSignals, exit_code
from conftest import TIMEOUT, run_tree, tiny_model
from dist_worker import CONFIGS, global_batch, loss_and_grads

TESTS = Path(__file__).parent


def torchrun(*args, nproc=2):
    """torchrun with nproc CPU processes; all of them killed if it runs past conftest's TIMEOUT."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    return run_tree([*launcher, str(nproc), *map(str, args)], env=env)


@pytest.fixture(scope="module")
def two_processes(demo_folder, tmp_path_factory):
    """The loss and gradients of two gloo processes for each of dist_worker.CONFIGS (a torchrun)."""
    out = tmp_path_factory.mktemp("two") / "two.pt"
    result = torchrun(TESTS / "dist_worker.py", demo_folder, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("multi_positive, accum_steps", CONFIGS)
def test_two_processes_equal_one(demo_folder, two_processes, multi_positive, accum_steps):
    """With --accum-steps 2 each rank runs 2 micro-batches (gradient cache, DDP synchronised on the
    last)."""
    two = two_processes[f"{multi_positive}-{accum_steps}"]
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


def test_the_process_group_is_released_after_the_model_that_holds_it(tmp_path, monkeypatch):
    """DDP holds the process group. Freed by DDP's destructor, the group would wait, holding
    Python's lock, for gloo's threads, which may need that lock to free a collective's tensors:
    a hang at exit, now and then, after an error line. So die() leaves the group alone, and
    exit_code releases it once main's objects are gone."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    model_alive_at_release = []
    real_destroy = dist.destroy_process_group
    model = None

    def destroy(*args):
        model_alive_at_release.append(model() is not None)
        real_destroy(*args)

    def main():
        nonlocal model
        ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
        model = weakref.ref(ddp)
        cleft.die("a mistake")

    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    assert exit_code(main) == "error: a mistake"
    assert model_alive_at_release == [False] and not dist.is_initialized()


def stop_signal_agreed(rank, store, out):
    """One of two processes that both get SIGTERM (a scheduler signals every process of a job):
    writes the signal the ranks agree on to OUT/rank{rank}.txt."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    stop = StopSignals()
    os.kill(os.getpid(), signal.SIGTERM)
    (out / f"rank{rank}.txt").write_text(str(stop.agreed()))
    dist.destroy_process_group()


def test_ranks_that_all_get_sigterm_agree_on_sigterm(tmp_path):
    """The agreement is the largest signal any rank got, not their sum: with both ranks signalled
    it is still SIGTERM, so every process exits 143, the code a requeue script looks for."""
    processes = torch.multiprocessing.spawn(stop_signal_agreed, nprocs=2, join=False,
                                            args=(tmp_path / "store", tmp_path))
    deadline = time.time() + TIMEOUT
    while not processes.join(timeout=1):  # True once both have ended (raises if one failed)
        if time.time() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the two processes ran past {TIMEOUT} s and were killed")
    agreed = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert agreed == [str(int(signal.SIGTERM))] * 2
