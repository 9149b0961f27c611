"""Run under `torchrun --nproc_per_node=N tests/dist_worker.py DEMO_FOLDER OUT.pt`: for each of
CONFIGS (multi-positive targets, --accum-steps) each rank loads the tiny models from DEMO_FOLDER,
takes its slice of one fixed global batch and runs cleft.train_step under DDP; rank 0 saves the
mean losses and the (DDP-averaged) gradients. test_distributed.py compares them with one process
on the whole batch."""

import gc
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import cleft
from conftest import tiny_model


def global_batch(size=8):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(size, 3, 112, 112, generator=g)
    captions = [
        cleft.CAPTION_PREFIX + name
        for name in [
            "edema",
            "cardiomegaly",
            "edema",
            "no finding",
            "atelectasis",
            "edema",
            "no finding",
            "pleural effusion",
        ]
    ]
    return images, captions[:size]


def loss_and_grads(model, images, captions, multi_positive=False, accum_steps=1):
    """One training step's loss and gradients for this rank's pairs (cleft.train_step, as in
    cleft.main)."""
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    with torch.no_grad():  # LoRA B starts at zero; make every trainable tensor matter
        for p in raw.text_tower.parameters():
            if p.requires_grad:
                p.add_(
                    0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                )
    loss = cleft.train_step(model, images, captions, nullcontext(), accum_steps, multi_positive)
    return loss, {n: p.grad.clone() for n, p in raw.named_parameters() if p.requires_grad}


# (multi_positive, accum_steps) of each configuration compared with one process
CONFIGS = [(False, 1), (True, 1), (False, 2)]

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    folder, out = Path(sys.argv[1]), sys.argv[2]
    images, captions = global_batch()
    per_rank = len(captions) // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    results = {}  # (multi_positive, accum_steps) -> the mean loss and the DDP-averaged gradients
    for multi_positive, accum_steps in CONFIGS:  # a fresh model for each, as one process has
        model = DistributedDataParallel(tiny_model(folder))
        loss, grads = loss_and_grads(model, images[mine], captions[mine], multi_positive,
                                     accum_steps)
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        results[f"{multi_positive}-{accum_steps}"] = {"loss": loss, "grads": grads}
        del model  # DDP holds the process group: free it first, or gloo can abort at exit
    if rank == 0:
        torch.save(results, out)
    gc.collect()
    dist.destroy_process_group()
