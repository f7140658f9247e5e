"""The optimizer step under FSDP2: ours beside torch's AdamW(foreach=True), on CPU ranks (gloo).

    python -m bench.fsdp_step                   # 2 ranks, both models, 200 timed steps
    python -m bench.fsdp_step --world 4 --steps 100

Each rank trains an FSDP2-sharded model (the distributed tests' 5-6-3-1 MLP, and the example's
residual MLP of 4 blocks at width 64) and times optimizer.step() alone with perf_counter, after
warm-up steps; the table gives rank 0's median ms per step. The Triton backend is left out: on a
CPU machine it runs interpreted, which times the interpreter. On GPUs, time the example instead
(examples/fsdp2_train.py prints ms per whole training step).
"""
import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

IMPLS = ("ours-cuda", "ours-foreach", "adamw-foreach")


def models():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from fsdp2_train import Model

    tiny = lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(),  # noqa: E731
                                 nn.Linear(3, 1))
    return {"test MLP 5-6-3-1": tiny, "example MLP d64 x4": lambda: Model(64, 4)}


def make_optimizer(impl, params):
    if impl == "adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
    from ademamix_cuda import AdEMAMix

    return AdEMAMix(params, lr=1e-3, weight_decay=0.1, backend=impl.split("-", 1)[1])


def worker(rank, world, port, warmup, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for name, build in models().items():
        for impl in IMPLS:
            torch.manual_seed(0)
            model = build()
            fully_shard(model, mesh=mesh)
            opt = make_optimizer(impl, model.parameters())
            n_in = next(model.parameters()).shape[-1]
            times = []
            for k in range(warmup + steps):
                x = torch.randn(8, n_in, generator=torch.Generator().manual_seed(k * world + rank))
                model(x).square().mean().backward()
                dist.barrier()  # every rank starts the step together
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
                opt.zero_grad(set_to_none=True)
            rows.append((name, impl, statistics.median(times[warmup:]) * 1e3))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.spawn(worker, args=(args.world, port, args.warmup, args.steps, out), nprocs=args.world)
    rows = out.get()
    print(f"FSDP2, {args.world} CPU ranks (gloo), torch {torch.__version__}, median ms per "
          f"optimizer.step() on rank 0 over {args.steps} steps")
    for name in dict.fromkeys(r[0] for r in rows):
        cells = {impl: ms for n, impl, ms in rows if n == name}
        ratio = cells["ours-cuda"] / cells["adamw-foreach"]
        print(f"  {name:20s} " + "  ".join(f"{impl} {ms:7.3f}" for impl, ms in cells.items())
              + f"   ours-cuda / adamw-foreach = {ratio:.2f}")


if __name__ == "__main__":
    main()
