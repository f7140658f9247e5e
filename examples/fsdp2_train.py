"""Train a small residual MLP with FSDP2 and AdEMAMix; save and resume with distributed checkpoints.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --steps 100 --checkpoint ckpt --save-every 50
    torchrun --nproc-per-node 4 examples/fsdp2_train.py --steps 200 --checkpoint ckpt   # resumes at 100

GPUs (nccl, one per rank, bf16 compute with fp32 sharded params) when CUDA is available, else CPUs
(gloo, fp32). The optimizer sees FSDP2's sharded DTensor params and keeps its states sharded the
same way, so a checkpoint saved at one world size resumes at another. Each rank draws its own
batches from a generator seeded by (step, rank): a resumed run sees the data it would have seen.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ademamix_cuda import AdEMAMix


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Model(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class TrainState(Stateful):
    """What a checkpoint holds. get_state_dict gives the model's and the optimizer's sharded
    (DTensor) state keyed by parameter names, which DCP saves and reshards."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.step = model, optimizer, 0

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "step": torch.tensor(self.step)}

    def load_state_dict(self, state_dict):
        # The saved hyperparameters (lr, betas, warmups...) replace the ones given on the command line.
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])
        self.step = int(state_dict["step"])


def latest_checkpoint(root):
    """The newest complete checkpoint under root (DCP writes .metadata last), or None."""
    if not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root)
            if d.startswith("step-") and os.path.exists(os.path.join(root, d, ".metadata"))]
    return os.path.join(root, max(done)) if done else None


def batch(step, rank, batch_size, dim, device):
    """Inputs and targets of a fixed random teacher (the same on every rank)."""
    gen = torch.Generator().manual_seed(step * 1_000_003 + rank)
    x = torch.randn(batch_size, dim, generator=gen)
    teacher = torch.randn(dim, generator=torch.Generator().manual_seed(0)) / dim ** 0.5
    y = torch.tanh(3 * x @ teacher).unsqueeze(1)
    return x.to(device), y.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="train until this step")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=None,
                        help="alpha and beta3 warm-up steps (default: --steps)")
    parser.add_argument("--backend", default="auto", help="AdEMAMix backend (auto, cuda, triton, foreach)")
    parser.add_argument("--checkpoint", help="directory of DCP checkpoints: resume from the newest, save there")
    parser.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same initial weights on every rank, before fully_shard splits them
    model = Model(args.dim, args.depth).to(device)
    # bf16 compute on GPUs; the optimizer still sees (and updates) fp32 sharded params
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if use_cuda else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)

    warmup = args.warmup or args.steps
    optimizer = AdEMAMix(model.parameters(), lr=args.lr, betas=(0.9, 0.999, 0.9999), alpha=8.0,
                         beta3_warmup=warmup, alpha_warmup=warmup, weight_decay=0.1,
                         backend=args.backend)
    state = TrainState(model, optimizer)
    resume = latest_checkpoint(args.checkpoint) if args.checkpoint else None
    if resume is not None:
        dcp.load({"train": state}, checkpoint_id=resume)
        if rank == 0:
            print(f"resumed from {resume} at step {state.step} on {world} ranks", flush=True)

    def save():
        path = os.path.join(args.checkpoint, f"step-{state.step:08d}")
        dcp.save({"train": state}, checkpoint_id=path)
        if rank == 0:
            print(f"saved {path}", flush=True)

    started, first = time.perf_counter(), state.step
    while state.step < args.steps:
        x, y = batch(state.step, rank, args.batch_size, args.dim, device)
        loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state.step += 1
        if state.step % args.log_every == 0 or state.step == args.steps:
            loss = loss.detach()
            dist.all_reduce(loss)
            if rank == 0:
                ms = 1e3 * (time.perf_counter() - started) / (state.step - first)
                print(f"step {state.step:6d}  loss {loss.item() / world:.5f}  {ms:.1f} ms/step  "
                      f"(AdEMAMix backend {optimizer.backend_used}, {world} ranks on {device.type})",
                      flush=True)
        if args.checkpoint and args.save_every and state.step % args.save_every == 0:
            save()
    saved_last = args.save_every and state.step % args.save_every == 0
    if args.checkpoint and state.step > first and not saved_last:
        save()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
