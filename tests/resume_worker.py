"""Run under `torchrun --nproc_per_node=2 tests/resume_worker.py OUT`: rank 1 alone finds a
checkpoint in its --out-dir, as two nodes without a shared folder would. Each rank writes what
cleft.resume_state did to OUT/rank{r}.txt (test_distributed.py reads them)."""

import sys
from pathlib import Path

import torch.distributed as dist

import cleft
from checkpoints import exit_code

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[1])
    folder = out / f"node{rank}"
    if rank == 1:
        (folder / "last").mkdir(parents=True)
        (folder / "last" / "model.safetensors").write_bytes(b"")
    code = exit_code(lambda: cleft.resume_state(cleft.parse_config(["--out-dir", str(folder)])))
    result = "went on" if code is None else f"exit {code}"
    (out / f"rank{rank}.txt").write_text(result)
