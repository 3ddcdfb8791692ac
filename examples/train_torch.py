"""Train a small CNN on gpurec shards: on one GPU, on several with torchrun, or on the CPU.

    python examples/train_torch.py out/pets_train --classes 37 --epochs 10
    torchrun --nproc-per-node 4 examples/train_torch.py out/imagenet_train --classes 1000
    python examples/train_torch.py demo-out/sample_train --classes 3 --device cpu --batch-size 16

The Pipeline reads RANK/WORLD_SIZE itself, so under torchrun every process gets its own
disjoint part of each epoch and the same number of batches (DDP needs that). With
``output="torch"`` the batches are torch tensors on the training device, handed over
without a copy (through DLPack on the GPU), labels int64 for ``cross_entropy``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import gpurec

MEAN, STD = (123.68, 116.28, 103.53), (58.395, 57.12, 57.375)


def small_cnn(classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    return nn.Sequential(
        block(3, 32), block(32, 64), block(64, 128), block(128, 256),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="shards: a .rec, a prefix, or a glob")
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="stop each epoch after N steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "gpu":
        import cupy

        torch.cuda.set_device(local)
        cupy.cuda.Device(local).use()  # gpurec hands out arrays on the current device
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if args.device == "gpu" else "gloo")

    pipe = gpurec.Pipeline(
        args.source, args.batch_size, (3, args.size, args.size),
        device=args.device, mean=MEAN, std=STD, rand_mirror=True, seed=args.seed,
        output="torch", label_dtype="int64",
    )  # fmt: skip
    model = small_cnn(args.classes).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if args.device == "gpu" else None
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    for epoch in range(args.epochs):
        pipe.set_epoch(epoch)  # as with a DistributedSampler (iterating alone does the same)
        model.train()
        start, seen, total = time.perf_counter(), 0, 0.0
        for step, (images, labels) in enumerate(pipe):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            total += loss.item() * len(labels)
            if args.steps and step + 1 >= args.steps:
                break
        if rank == 0:
            rate = seen * world / (time.perf_counter() - start)
            print(f"epoch {epoch}: loss {total / max(seen, 1):.4f}, {rate:.0f} images/s")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
