"""
`--accum-steps K`: the exact contrastive gradient of a batch too large for memory, computed in K
micro-batches (the gradient-cache method of Gao et al., 2021). Dividing InfoNCE over micro-batches
would give each one fewer negatives; this keeps the whole batch's similarity matrix, at the price
of one extra forward pass per micro-batch.
"""

from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel


def gradient_cache_step(model, images, captions, autocast, accum_steps, loss_fn):
    """Forward and backward of a batch as accum_steps micro-batches; loss_fn(image_features,
    text_features, logit_scale) is the loss over the whole batch. Returns it, detached.
    1) embed each micro-batch without a graph, remembering the RNG state it started from;
    2) the loss over the whole batch, and its gradient with respect to the embeddings;
    3) re-run each micro-batch with a graph and the same dropout masks, and back-propagate those
       gradients through it. Under DDP, gradients are synchronised on the last micro-batch only."""
    size = len(captions) // accum_steps
    chunks = [(images[k:k + size], captions[k:k + size]) for k in range(0, len(captions), size)]
    cuda, rng_states, outputs = torch.cuda.is_available(), [], []
    with torch.no_grad(), autocast:  # 1)
        for chunk in chunks:
            rng_states.append((torch.get_rng_state(), cuda and torch.cuda.get_rng_state()))
            outputs.append(model(*chunk))
    image_features = torch.cat([out[0] for out in outputs]).requires_grad_()  # (b, D)
    text_features = torch.cat([out[1] for out in outputs]).requires_grad_()  # (b, D)
    scale = outputs[0][2].detach().requires_grad_()
    loss = loss_fn(image_features, text_features, scale)  # 2)
    loss.backward()
    for k, chunk in enumerate(chunks):  # 3)
        last, rows = k == len(chunks) - 1, slice(k * size, (k + 1) * size)
        torch.set_rng_state(rng_states[k][0])
        if cuda:
            torch.cuda.set_rng_state(rng_states[k][1])
        ddp = isinstance(model, DistributedDataParallel)
        with model.no_sync() if ddp and not last else nullcontext():
            with autocast:
                image_part, text_part, logit_scale = model(*chunk)
            tensors = [image_part, text_part]
            grads = [image_features.grad[rows], text_features.grad[rows]]
            if last:  # the temperature's gradient goes in once, with the last backward
                tensors, grads = tensors + [logit_scale], grads + [scale.grad]
            torch.autograd.backward(tensors, grads)
    return loss.detach()
