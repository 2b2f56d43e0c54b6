"""Pre-train a small low-rank Llama with LowRankAdam under FSDP2 (``fully_shard``), in one process or
under torchrun (gloo on CPU, nccl on CUDA). Offline: the model comes from a config, the text from an
installed package (byte-level Rotten Tomatoes), or ``--data synthetic`` draws random bytes.

    python examples/pretrain_fsdp.py --steps 50
    torchrun --nproc-per-node 2 examples/pretrain_fsdp.py --steps 50 --out runs/fsdp

Every attention and MLP projection is a ``LowRankLinear`` (W = U diag(S) V^T, ``tlr.factorize``);
each decoder layer and the root model are wrapped in ``fully_shard``, so U and V are sharded by rows
over the processes. LowRankAdam steps the sharded factors directly: the sums over rows it needs (r x r
Gram matrices) are all-reduced, the 2r x 2r core is computed identically on every process, and the
moments are r x r per layer. Ranks are fixed by default; ``--tau 0.05 --rank-every 20`` trains rank
adaptively: FSDP2 cannot resize a sharded parameter, so after a step that changed a rank the loop
calls the re-shard point ``tlr.optim.reshard_after_rank_change`` (the model rebuilt at the new ranks
and sharded again; the optimizer, the same object, re-pointed at it). ``--batch-size`` is the global batch; each
process takes its slice, so the losses equal the one-process run up to rounding. With ``--out``,
rank 0 writes ``<out>/result.json`` and the model and optimizer state go to ``<out>/checkpoint``
through ``torch.distributed.checkpoint`` (loadable on any number of processes).
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

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (split over the processes)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=16, help="rank of every projection")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tau", type=float, default=0.0, help="> 0: rank adaptive (LowRankAdam's tau)")
    p.add_argument("--rank-every", type=int, default=20, help="with --tau: steps between rank decisions")
    p.add_argument("--data", choices=["text", "synthetic"], default="text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", type=Path, default=None, help="write result.json and a DCP checkpoint here")
    args = p.parse_args(argv)
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "rank",
        "rank_every",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_model(args: argparse.Namespace) -> nn.Module:
    """A byte-level Llama (vocab 256) from a config, its projections factorized to ``args.rank``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = LlamaForCausalLM(config)
    tlr.factorize(model, args.rank, targets=PROJECTIONS)  # LowRankLinear, from the truncated SVD
    return model


def token_stream(kind: str, seed: int) -> torch.Tensor:
    """uint8 bytes to cut training windows from."""
    if kind == "synthetic":
        return torch.randint(
            0, 256, (1 << 16,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
        )
    from torchlowrank.data.datasets import load_rotten_tomatoes_bytes

    return load_rotten_tomatoes_bytes(seed=seed).train


def batches(data: torch.Tensor, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq_len) int64 windows at random offsets, the same on every process."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (steps, batch), generator=g)
    return data[starts[..., None] + torch.arange(seq_len)].long()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ  # started by torchrun
    if distributed:
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device("cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    try:

        def build() -> nn.Module:
            return build_model(args).to(device)

        def shard(model: nn.Module) -> nn.Module:
            if distributed:
                from torch.distributed.fsdp import fully_shard

                for layer in model.model.layers:  # one all-gather / reduce-scatter per decoder layer
                    fully_shard(layer)
                fully_shard(model)
            return model

        model = shard(build())
        # after fully_shard: it steps the sharded factors; reshard=True: rank changes at the re-shard point
        opt = tlr.optim.LowRankAdam(model, lr=args.lr, tau=args.tau, rank_every=args.rank_every, reshard=True)
        rank_changes = 0
        data = batches(
            token_stream(args.data, args.seed), args.steps, args.batch_size, args.seq_len, args.seed
        )
        local = args.batch_size // world
        losses, start = [], time.perf_counter()
        for step, ids in enumerate(data, 1):
            ids = ids[rank * local : (rank + 1) * local].to(device)
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss  # the mean over this process's tokens
            loss.backward()  # FSDP2 reduce-scatters the mean over the processes: the global batch's
            opt.step()
            if opt.ranks_changed:  # new ranks: rebuild and re-shard (a no-op in one process)
                model = tlr.optim.reshard_after_rank_change(model, opt, build, shard)
                rank_changes += 1
            logged = loss.detach().clone()
            if distributed:
                dist.all_reduce(logged)
                logged /= world
            losses.append(float(logged))
            if rank == 0:
                print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
        result = dict(
            world_size=world,
            steps=args.steps,
            losses=losses,
            seconds=time.perf_counter() - start,
            lowrank_layers=len(tlr.optim.lowrank_units(model)),
            ranks=[layer.rank for _, layer in tlr.optim.lowrank_units(model)],
            rank_changes=rank_changes,
            nonfinite_steps=int(opt.nonfinite_steps),
        )
        if args.out is not None:
            save_checkpoint(model, opt, args.out / "checkpoint")
            if rank == 0:
                (args.out / "result.json").write_text(json.dumps(result, indent=1))
        if distributed:  # no process leaves while another still has gloo work queued
            dist.barrier()
        return result
    finally:
        if distributed:
            dist.destroy_process_group()


def save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    """The model and LowRankAdam's state (r x r moments, steps, ranks) through DCP: each process
    writes its shards; ``set_state_dict`` after ``dcp.load`` resumes on any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)


if __name__ == "__main__":
    main()
