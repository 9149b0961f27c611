"""Run under `torchrun --nproc_per_node=2 tests/full_disk_worker.py OUT FLAGS...`: cleft.py with
FLAGS on a disk that is full after step 0's checkpoints (rank 0's writes raise ENOSPC from then
on). Each rank writes how its cleft.main ended to OUT/rank{r}.txt (test_reliability.py reads
them)."""

import errno
import os
import sys
from pathlib import Path

import checkpoints
import cleft

real_save_file = checkpoints.save_file
written = []


def save_file(tensors, path, *args, **kwargs):  # best/ and last/ at step 0 fit, then none
    if Path(path).name == "model.safetensors":  # one a checkpoint (split.safetensors: another)
        written.append(path)
    if len(written) > 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_save_file(tensors, path, *args, **kwargs)


if __name__ == "__main__":
    checkpoints.save_file = save_file
    out = Path(sys.argv[1])
    code = checkpoints.exit_code(lambda: cleft.main(sys.argv[2:]))  # as `python cleft.py` ends
    result = "went on" if code == 0 else f"exit {code}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ['RANK']}.txt").write_text(result)
