"""Data-parallel training of a small GSPN network (the paper's architecture) with the TVM kernels.

    torchrun --nproc-per-node 2 examples/train_ddp.py [--steps 5] [--global-batch 8]

Each process takes its share of every global batch; ``DistributedDataParallel`` averages the
gradients (gloo on CPU, NCCL when CUDA is available), so the result equals one process training on
the whole global batch. The scans run with the TVM kernels (``gspn_tvm.enable()``) forward and
backward; ``--reference-kernels`` keeps the PyTorch reference kernels. The data is synthetic and
the configuration small (a GSPN-T layout with ``EMBED_DIM 16``, 32 x 32 images): this shows the
mechanics, not accuracy.

``train(model, batches, optimizer, rank=..., world_size=...)`` is the training loop itself;
``tests/test_train_ddp.py`` runs this script under torchrun and compares with a single process.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

#: The small configuration trained here: GSPN-T's layout, narrower and shallower.
SMALL_CONFIG = {"embed_dim": 16, "depths": [1, 1, 2, 1], "img_size": 32, "drop_path_rate": 0.0}
NUM_CLASSES = 10


def build_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """The network, initialized from ``seed`` (the same weights in every process).

    Drop-path is off (``drop_path_rate=0``): its random masks would differ between a rank's share
    and the whole batch. The published configs use LayerNorm (``ln2d``), which has no batch statistics.
    """
    from gspn_ref.models import gspn_tiny

    torch.manual_seed(seed)
    return gspn_tiny(num_classes=NUM_CLASSES, **{**SMALL_CONFIG, **overrides})


def synthetic_batches(steps: int, global_batch: int, img_size: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches ``(images (B, 3, S, S), labels (B,))``, the same in every process."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(global_batch, 3, img_size, img_size, generator=gen),
         torch.randint(0, NUM_CLASSES, (global_batch,), generator=gen))
        for _ in range(steps)
    ]  # fmt: skip


def train(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> list[float]:
    """One optimizer step per global batch; returns the loss of each step over the global batch.

    Process ``rank`` of ``world_size`` takes the ``rank``-th equal slice of every batch; the loss is
    the mean cross-entropy of its slice. With ``model`` wrapped in ``DistributedDataParallel`` the
    gradients are averaged over the processes, which is the gradient of the mean over the global
    batch. ``world_size=1`` with a plain module is the single-process run of the same training.
    """
    model.train()
    losses = []
    for images, labels in batches:
        if len(images) % world_size:
            raise ValueError(f"batches: the global batch ({len(images)}) must divide evenly over {world_size} processes")
        share = len(images) // world_size
        part = slice(rank * share, (rank + 1) * share)
        x, y = images[part].to(device), labels[part].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(global_loss)
            global_loss /= world_size
        losses.append(global_loss.item())
    return losses


def make_optimizer(model: torch.nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=8, help="images per step over all processes")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-kernels", action="store_true", help="do not enable the TVM kernels")
    parser.add_argument("--save", help="rank 0 saves the trained state dict (torch.save) to this file")
    args = parser.parse_args(argv)

    # The depthwise convolutions' weights (C, 1, k, k) get gradients whose stride on the size-1
    # axis differs from DDP's bucket view: same memory layout, a harmless performance notice per rank.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    try:
        if not args.reference_kernels:
            import gspn_tvm

            gspn_tvm.enable()
        model = build_model(args.seed).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        batches = synthetic_batches(args.steps, args.global_batch, SMALL_CONFIG["img_size"], seed=args.seed + 1)
        losses = train(ddp, batches, make_optimizer(model, args.lr), rank=rank, world_size=world_size, device=device)
        if rank == 0:
            kernels = "reference" if args.reference_kernels else "TVM"
            print(f"{world_size} processes ({dist.get_backend()}, {device.type}), {kernels} kernels, "
                  f"global batch {args.global_batch}, {sum(p.numel() for p in model.parameters()):,} parameters")
            for step, loss in enumerate(losses):
                print(f"step {step}: loss {loss:.6f}")
            if args.save:
                torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.save)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
