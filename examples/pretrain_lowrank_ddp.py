"""Train a low-rank MLP on Fashion-MNIST with rank-adaptive LowRankAdam, in one process or under
torchrun (DistributedDataParallel, gloo on CPU). Offline: the data comes from an installed package.

    python examples/pretrain_lowrank_ddp.py --steps 300 --out runs/lowrank
    torchrun --nproc_per_node 2 examples/pretrain_lowrank_ddp.py --steps 300 --out runs/lowrank_ddp

The model's hidden layers are ``LowRankLinear`` (W = U diag(S) V^T, built by ``tlr.factorize``);
LowRankAdam with ``tau > 0`` lets each layer's rank shrink. Under DDP every process takes the same
geometric step from the all-reduced gradient; the optimizer broadcasts rank 0's rank decisions, and
when a step changed a rank (``opt.ranks_changed``: the layer holds new Parameters) this loop wraps
the model in DDP again. ``--batch-size`` is the global batch; each process takes its slice. Rank 0
writes ``<out>/result.json`` (accuracy, the ranks over time, parameter counts) and
``<out>/model.safetensors`` (the weights; ranks are in the shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import torchlowrank as tlr
from torchlowrank import distributed
from torchlowrank.files import atomic_path, atomic_write_text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (split over the processes)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--tau", type=float, default=0.1, help="LowRankAdam's truncation tolerance (0: fixed ranks)"
    )
    p.add_argument("--rank", type=int, default=64, help="initial rank of the hidden layers")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "rank", "width", "train_size", "test_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.tau < 1:
        p.error("--tau must be in [0, 1)")
    return args


def build_model(width: int, rank: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)  # the same initial weights on every process
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )
    tlr.factorize(model, rank, targets=["1", "3"])  # hidden layers -> LowRankLinear; the head stays dense
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = sum(
        int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000)
    ) / len(y)
    model.train()
    return acc


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank, world = distributed.rank(), distributed.world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    data = tlr.data.load_fashion_mnist(n_train=args.train_size, n_test=args.test_size, seed=args.seed)
    model = build_model(args.width, args.rank, args.seed)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = tlr.optim.LowRankAdam(model, lr=args.lr, tau=args.tau)
    layers = [m for m in model if isinstance(m, tlr.LowRankLinear)]
    g = torch.Generator().manual_seed(args.seed)  # the same global batches on every process
    half = args.batch_size // world
    ranks_over_time, rewraps, losses = [[m.rank for m in layers]], 0, []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, len(data.y_train), (args.batch_size,), generator=g)[
            rank * half : (rank + 1) * half
        ]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(ddp(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if opt.ranks_changed:
            ranks_over_time.append([m.rank for m in layers])
            if world > 1:  # new Parameters: DDP must know them before the next forward
                ddp = nn.parallel.DistributedDataParallel(model)
                rewraps += 1
    train_time = time.perf_counter() - t0
    # the replicas must be identical: the largest difference from rank 0's weights, over all processes
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    distributed.broadcast_tensors_([reference])
    diff = (flat - reference).abs().max()
    if world > 1:
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    test_acc = accuracy(model, data.x_test, data.y_test)
    dense_params = sum(m.in_features * m.out_features for m in layers)
    result = {
        "world_size": world,
        "steps": args.steps,
        "global_batch": args.batch_size,
        "tau": args.tau,
        "lr": args.lr,
        "test_accuracy": test_acc,
        "test_examples": len(data.y_test),
        "first_loss": losses[0],
        "last_loss_mean_10": sum(losses[-10:]) / len(losses[-10:]),
        "initial_ranks": ranks_over_time[0],
        "final_ranks": [m.rank for m in layers],
        "rank_changes": len(ranks_over_time) - 1,
        "ddp_rewraps": rewraps,
        "hidden_params": sum(m.U.numel() + m.S.numel() + m.V.numel() for m in layers),
        "hidden_params_dense": dense_params,
        "max_abs_weight_diff_between_ranks": float(diff),
        "train_time_s": train_time,
        "status": "ok" if test_acc > 0.5 else "did not learn (test accuracy <= 0.5): raise --steps or --lr",
    }
    if distributed.is_main_process():
        args.out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        with atomic_path(args.out / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        atomic_write_text(args.out / "result.json", json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        if result["status"] != "ok":
            print(f"warning: {result['status']}")
    distributed.barrier()
    if world > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
