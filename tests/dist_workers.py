"""What the ranks of tests/test_distributed.py run: a small model, its data, and one function per
scenario (SCENARIOS), each called on every rank of a spawned process group.

The model and data are built so that gradients differ between world sizes only by rounding: every
input, weight and bias is positive, so every activation, the loss' derivative (y + 10) and every
gradient element is a sum of positive terms. Splitting the batch over ranks reorders those sums
(a relative change of ~1e-7 in fp32) and never cancels them, and Adam-style normalization keeps the
updates' relative error at that level. Over 24 steps that stays far below FP32_RTOL (1e-5, the
bound tests/helpers.py justifies for fp32 against float64); measured: <= 1e-7 (foreach, 2 and 4
ranks, FSDP2 and DDP).

A scenario does its collectives (training, gathering full tensors) on every rank, then checks on
rank 0 only, so a failed check never leaves another rank waiting inside a collective. Local checks
collect problems and raise them (Problems) after the last collective, for the same reason.
"""
import copy
import datetime
import faulthandler
import json
import os
import re
import signal
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map_only

import ademamix_cuda
from helpers import FP32_RTOL, KERNEL_BACKENDS, STATE_KEYS, bits_equal, rel_err
from reference import ReferenceAdEMAMix

BATCH = 8      # divisible by every world size tested (1, 2, 4): each rank gets an equal share
STEPS = 24     # training steps of the parity scenarios (the SPEC asks for 20+)
K_SAVE = 10    # steps before a checkpoint; inside both warmups, so the loaded step count matters
K_AFTER = 14   # steps after loading one (24 in all)
# Weights: both schedules end inside the run and beta3 = 0.99 makes the slow EMA a large part of
# the update, so a wrong step count shows. Biases: beta1 = 0, so exp_avg_fast is None for them.
WEIGHT_GROUP = dict(lr=2e-3, betas=(0.9, 0.999, 0.99), alpha=5.0, beta3_warmup=15,
                    alpha_warmup=10, weight_decay=0.1)
BIAS_GROUP = dict(betas=(0.0, 0.99, 0.995), alpha=3.0, weight_decay=0.0)
AUTHORS_KEYS = {"step", *STATE_KEYS}


@dataclass(frozen=True)
class Case:
    """One test case: a scenario run by `world` ranks on `device` with optimizer `backend`."""

    scenario: str
    device: str
    world: int
    backend: str

    @property
    def id(self):
        return f"{self.scenario}[{self.device}-world{self.world}-{self.backend}]"


@dataclass
class Rank:
    rank: int
    world: int
    device: torch.device
    shared_dir: str  # lives across spawns: checkpoints saved at one world size, loaded at another

    def mesh(self, shape=None, names=("dp",)):
        """A device mesh over all ranks (cached: creating one is a collective)."""
        shape = tuple(shape or (self.world,))
        key = (shape, names)
        if key not in _MESHES:
            _MESHES[key] = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
        return _MESHES[key]

    def checkpoint_dir(self, backend):
        return os.path.join(self.shared_dir, f"dcp-{self.device.type}-{backend}")


_MESHES = {}
_SINGLE_RUNS = {}  # (device, backend, steps) -> gather() of a one-process run, computed once


# ---------------------------------------------------------------------------------------------
# model, data, optimizer

class MLP(nn.Module):
    """5 -> 6 -> 3 -> 1. The output sizes 6, 3 and 1 (dim 0 of each weight and bias) shard
    unevenly: on 4 ranks FSDP2 splits them 2/2/2/0, 1/1/1/0 and 1/0/0/0 rows (empty shards on
    ranks 1-3), on 2 ranks 3/3, 2/1 and 1/0."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 6)
        self.l2 = nn.Linear(6, 3)
        self.l3 = nn.Linear(3, 1)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def new_model(device, seed=0):
    """Every param in [0.5, 1]: positive (see the module doc) and far enough from 0 that 24 steps
    (each moving a param by at most a few lr) keep it positive."""
    model = MLP()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
    return model.to(device)


def fsdp2(model, mesh, **kwargs):
    """fully_shard on every layer, then on the root, as FSDP2 users do."""
    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def batch(step, device):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.rand(BATCH, 5, generator=gen).to(device)


def make_optimizer(model, backend, lr_tensor=False, cls=None, **options):
    """Ours (or `cls`, the reference) with a weight group and a beta1 = 0 bias group; `options`
    go to ours."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n.endswith("weight")]},
              {"params": [p for n, p in named if n.endswith("bias")], **BIAS_GROUP}]
    if lr_tensor:
        groups[0]["lr"] = torch.tensor(WEIGHT_GROUP["lr"])
    if cls is not None:
        return cls(groups, **WEIGHT_GROUP)
    return ademamix_cuda.AdEMAMix(groups, backend=backend, **WEIGHT_GROUP, **options)


def loss_of(model, x):
    return ((model(x).float() + 10.0) ** 2).mean()


def train(model, opt, steps, *, rank, world, device, start=0, after_backward=None,
          dtype=torch.float32):
    """Steps start..start+steps-1; rank r takes the r-th share of each step's batch. FSDP2 and DDP
    average the gradients over ranks, so every world size optimizes the same full-batch loss."""
    for s in range(start, start + steps):
        x = batch(s, device).to(dtype).chunk(world)[rank]
        loss_of(model, x).backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        opt.zero_grad()


def train_ranks(r, model, opt, steps, start=0, after_backward=None):
    train(model, opt, steps, rank=r.rank, world=r.world, device=r.device, start=start,
          after_backward=after_backward)


# ---------------------------------------------------------------------------------------------
# gathering and comparing

def full(t):
    """The whole tensor on the CPU (a collective for a DTensor), or None. The authors' class counts
    steps in a Python int."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return torch.tensor(float(t))
    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.to("cpu", copy=True)


def gather(model, opt):
    """name -> {"param": ..., "step": ..., state key: ...} as full CPU tensors. Every rank must call
    it (full_tensor is a collective), in the same order."""
    out = {}
    for name, p in model.named_parameters():
        state = opt.state.get(p, {})
        out[name] = {"param": full(p), **{k: full(state.get(k)) for k in ("step",) + STATE_KEYS}}
    return out


def single_process_run(device, backend, steps):
    """The same model, data and optimizer in this one process, on the full batch."""
    key = (str(device), backend, steps)
    if key not in _SINGLE_RUNS:
        model = new_model(device)
        opt = make_optimizer(model, backend)
        train(model, opt, steps, rank=0, world=1, device=device)
        _SINGLE_RUNS[key] = gather(model, opt)
    return _SINGLE_RUNS[key]


def mismatches(actual, expected, rtol, what):
    """Differences between two gather() results: norm-wise relative error per tensor above rtol,
    or any bit when rtol is None. Step counts must be equal."""
    out = []
    for name, entries in expected.items():
        for key, e in entries.items():
            a = actual.get(name, {}).get(key)
            tag = f"{what}: {name} {key}"
            if a is None or e is None:
                if a is not None or e is not None:
                    out.append(f"{tag}: {'missing' if a is None else 'present'}, expected "
                               f"{'None' if e is None else tuple(e.shape)}")
            elif tuple(a.shape) != tuple(e.shape):
                out.append(f"{tag}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
            elif key == "step":
                if float(a) != float(e):
                    out.append(f"{tag}: {float(a)}, expected {float(e)}")
            elif rtol is None:
                if a.dtype != e.dtype or not bits_equal(a, e):
                    out.append(f"{tag}: not bitwise equal ({a.dtype} vs {e.dtype}, relative "
                               f"error {rel_err(a, e):.2e})")
            elif rel_err(a, e) > rtol:
                out.append(f"{tag}: relative error {rel_err(a, e):.2e} > {rtol:.0e}")
    return out


class Problems(AssertionError):
    """Failed checks. Scenarios raise them after their last collective only."""


def assert_no_problems(problems, what=""):
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise Problems(f"{what}{len(problems)} problem(s):\n  {shown}{more}")


def raise_on_any_rank(problems):
    """Raises Problems on every rank when any rank found some: the gathers that would follow pair
    up only on states laid out alike everywhere (a wrong shard shape makes them hang)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    assert_no_problems([f"rank {k}: {p}" for k, found in enumerate(everyone) for p in found])


def group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def layout_problems(model, opt, backend, steps, state_dtype=torch.float32):
    """The state layout of the issue, on this rank: each state a DTensor with its param's mesh,
    placements, shape and stride (so DCP saves it sharded) and local shape (uneven and empty shards
    included), or a plain tensor for a plain param; of `state_dtype`; exp_avg_fast None with
    beta1 = 0; the step count a plain 0-d float32 tensor, as torch's AdamW keeps it under FSDP2."""
    out = []
    for name, p in model.named_parameters():
        state = opt.state.get(p)
        if not state:
            out.append(f"{name}: no state")
            continue
        if set(state) != AUTHORS_KEYS:
            out.append(f"{name}: state keys {sorted(state)}")
            continue
        step = state["step"]
        step_device = p.device if backend in KERNEL_BACKENDS else torch.device("cpu")
        if type(step) is not torch.Tensor or step.dim() != 0 or step.dtype != torch.float32:
            out.append(f"{name}: step must be a plain 0-d float32 tensor, got {type(step).__name__} "
                       f"{getattr(step, 'dtype', '')}{list(getattr(step, 'shape', []))}")
        elif step.device != step_device or float(step) != steps:
            out.append(f"{name}: step {float(step)} on {step.device}, expected {steps} on {step_device}")
        beta1_zero = group_of(opt, p)["betas"][0] == 0.0
        for key in STATE_KEYS:
            s = state[key]
            if beta1_zero and key == "exp_avg_fast":
                if s is not None:
                    out.append(f"{name}: exp_avg_fast must be None with beta1 = 0")
                continue
            if s is None or s.dtype != state_dtype or s.shape != p.shape:
                out.append(f"{name} {key}: {None if s is None else (s.dtype, tuple(s.shape))}, "
                           f"expected {state_dtype} {tuple(p.shape)}")
                continue
            if not isinstance(p, DTensor):
                if isinstance(s, DTensor):
                    out.append(f"{name} {key}: a DTensor for a plain param")
                continue
            if not isinstance(s, DTensor):
                out.append(f"{name} {key}: a plain {type(s).__name__}, expected a DTensor like its param")
            elif (s.device_mesh != p.device_mesh or s.placements != p.placements
                  or s.stride() != p.stride() or s.to_local().shape != p.to_local().shape):
                out.append(f"{name} {key}: mesh {s.device_mesh} {s.placements} stride {s.stride()} "
                           f"local {tuple(s.to_local().shape)}; the param has {p.device_mesh} "
                           f"{p.placements} stride {p.stride()} local {tuple(p.to_local().shape)}")
    return out


def local_snapshot(model, opt):
    """This rank's bytes of every param and state (local shards), for 'nothing changed' checks."""
    def local(t):
        if t is None:
            return None
        t = t.detach()
        return (t.to_local() if isinstance(t, DTensor) else t).clone()

    return {name: {"param": local(p), **{k: local(v) for k, v in opt.state.get(p, {}).items()}}
            for name, p in model.named_parameters()}


def changes(model, opt, snap, what):
    now = local_snapshot(model, opt)
    out = []
    for name, before in snap.items():
        if set(now[name]) != set(before):
            out.append(f"{what}: {name}: state keys {sorted(before)} became {sorted(now[name])}")
            continue
        for key, b in before.items():
            a = now[name][key]
            if (a is None) != (b is None) or (a is not None and not bits_equal(a, b)):
                out.append(f"{what}: {name} {key} changed")
    return out


# ---------------------------------------------------------------------------------------------
# scenarios: FSDP2 / HSDP / DDP training against one process

def check_against_single_process(r, model, opt, backend, what, steps=STEPS):
    raise_on_any_rank(layout_problems(model, opt, backend, steps))
    got = gather(model, opt)
    if r.rank == 0:
        assert_no_problems(mismatches(got, single_process_run(r.device, backend, steps), FP32_RTOL, what))


def fsdp2_parity(r, backend):
    model = fsdp2(new_model(r.device), r.mesh())
    opt = make_optimizer(model, backend)
    train_ranks(r, model, opt, STEPS)
    check_against_single_process(r, model, opt, backend, f"FSDP2 on {r.world} ranks vs one process")


MAX_NORM = 1.0  # clip_parity: below every step's gradient norm of this loss, so every step clips


def clip_parity(r, backend):
    """FSDP2 (HSDP on a 2 x 2 mesh at 4 ranks, whose replicas must not be counted twice) with
    opt.clip_grad_norm_ before every step: the norms it returns and the training match one
    process that clips with torch.nn.utils.clip_grad_norm_."""
    mesh = r.mesh((2, r.world // 2), ("replicate", "shard")) if r.world == 4 else r.mesh()
    model = fsdp2(new_model(r.device), mesh)
    opt = make_optimizer(model, backend)
    norms = []
    train_ranks(r, model, opt, STEPS,
                after_backward=lambda: norms.append(full(opt.clip_grad_norm_(MAX_NORM))))
    raise_on_any_rank(layout_problems(model, opt, backend, STEPS))
    got = gather(model, opt)
    if r.rank != 0:
        return
    single = new_model(r.device)
    single_opt = make_optimizer(single, backend)
    want = []
    train(single, single_opt, STEPS, rank=0, world=1, device=r.device, after_backward=lambda: want.append(
        full(torch.nn.utils.clip_grad_norm_(single.parameters(), MAX_NORM))))
    problems = mismatches(got, gather(single, single_opt), FP32_RTOL,
                          f"clipped FSDP2 on {r.world} ranks vs torch's clipping in one process")
    problems += [f"step {k}: norm {float(a)} vs torch's {float(b)}"
                 for k, (a, b) in enumerate(zip(norms, want)) if rel_err(a, b) > FP32_RTOL]
    problems += [f"step {k}: norm {float(b)} <= max_norm: the scenario must clip"
                 for k, b in enumerate(want) if not float(b) > MAX_NORM]
    assert_no_problems(problems)


def hsdp_parity(r, backend):
    # HSDP: params Replicate() over "replicate" and Shard(0) over "shard"; FSDP2 reduce-scatters
    # within a replica and all-reduces across replicas, so all 4 ranks are data parallel.
    mesh = r.mesh((2, r.world // 2), ("replicate", "shard"))
    model = fsdp2(new_model(r.device), mesh)
    opt = make_optimizer(model, backend)
    train_ranks(r, model, opt, STEPS)
    check_against_single_process(r, model, opt, backend, "HSDP (2 x 2 mesh) vs one process")


def two_meshes(r, backend):
    # One param group holds DTensors of two meshes (l1 on the 2-D HSDP mesh, l2 and l3 on a 1-D
    # mesh): the optimizer must group them, not refuse them.
    mesh_2d = r.mesh((2, r.world // 2), ("replicate", "shard"))
    mesh_1d = r.mesh()
    model = new_model(r.device)
    fully_shard(model.l1, mesh=mesh_2d)
    fully_shard(model.l2, mesh=mesh_1d)
    fully_shard(model.l3, mesh=mesh_1d)
    fully_shard(model, mesh=mesh_1d)
    opt = make_optimizer(model, backend)
    train_ranks(r, model, opt, STEPS)
    check_against_single_process(r, model, opt, backend, "DTensors of two meshes vs one process")


def plain_and_dtensor_model(r):
    """l1 and l2 sharded by FSDP2 (DTensors); l3 left out of it (plain tensors, replicated), its
    gradients averaged by hand as DDP would."""
    model = new_model(r.device)
    mesh = r.mesh()
    fully_shard(model.l1, mesh=mesh)
    fully_shard(model.l2, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(model.l3.parameters()))

    def average_plain_grads():
        for p in model.l3.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(r.world)  # exact: the world size is a power of 2
    return model, average_plain_grads


def plain_and_dtensor(r, backend):
    model, average_plain_grads = plain_and_dtensor_model(r)
    opt = make_optimizer(model, backend)  # each group mixes DTensors (l1, l2) and plain tensors (l3)
    train_ranks(r, model, opt, STEPS, after_backward=average_plain_grads)
    check_against_single_process(r, model, opt, backend, "plain tensors and DTensors in one group")


def ddp_parity(r, backend):
    model = new_model(r.device)
    ddp = DistributedDataParallel(model, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    opt = make_optimizer(model, backend)
    train_ranks(r, ddp, opt, STEPS)
    check_against_single_process(r, model, opt, backend, f"DDP on {r.world} ranks vs one process")


def mixed_precision(r, backend):
    """bf16 compute, fp32 sharded params and grads seen by the optimizer. The bf16 backward rounds
    per rank's share of the batch, so a one-process run could not match; instead one process
    replays the exact (gathered) gradients of the distributed run on fp32 params."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = fsdp2(new_model(r.device), r.mesh(), mp_policy=policy)
    opt = make_optimizer(model, backend)
    problems, grads_seen, out_dtypes = [], [], set()
    model.l3.register_forward_hook(lambda module, args, out: out_dtypes.add(out.dtype))

    def record():
        for name, p in model.named_parameters():
            if p.dtype != torch.float32 or p.grad.dtype != torch.float32:
                problems.append(f"{name}: the optimizer sees {p.dtype} params, {p.grad.dtype} grads")
        grads_seen.append([full(p.grad) for p in model.parameters()])

    train_ranks(r, model, opt, STEPS, after_backward=record)
    if out_dtypes != {torch.bfloat16}:  # the premise: FSDP2 really computed in bf16
        problems.append(f"the forward computed in {out_dtypes}, expected bf16")
    raise_on_any_rank(problems + layout_problems(model, opt, backend, STEPS))
    got = gather(model, opt)
    if r.rank == 0:
        single = new_model(r.device)
        single_opt = make_optimizer(single, backend)
        for grads in grads_seen:
            for p, g in zip(single.parameters(), grads):
                p.grad = g.to(r.device)
            single_opt.step()
        assert_no_problems(mismatches(got, gather(single, single_opt), FP32_RTOL,
                                      "mixed precision vs one process fed the same gradients"))


# ---------------------------------------------------------------------------------------------
# scenarios: state dicts and distributed checkpoints

def clone_tree(tree):
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), tree)


def init_step_problems(model, opt, backend, before):
    """get_optimizer_state_dict on a fresh optimizer creates the states by one step() with zero
    grads and lr = 0 (torch.distributed.checkpoint.state_dict._init_optim_state): the params must
    not move, the states must be zero, laid out as usual, and count that one step."""
    out = layout_problems(model, opt, backend, steps=1)
    for (name, p), b in zip(model.named_parameters(), before):
        local = p.detach().to_local() if isinstance(p, DTensor) else p.detach()
        if not bits_equal(local, b):
            out.append(f"{name}: the zero-grad, lr = 0 step of _init_optim_state moved the param")
        for key in STATE_KEYS:
            s = opt.state[p].get(key)
            if s is not None:
                s = s.to_local() if isinstance(s, DTensor) else s
                if s.count_nonzero():
                    out.append(f"{name} {key}: nonzero after the zero-grad step")
    return out


def osd_problems(model, osd):
    """A sharded optimizer state dict: FQN keys, the authors' state keys, DTensor states on their
    param's mesh and placements, plain step tensors."""
    out = []
    for name, p in model.named_parameters():
        state = osd["state"].get(name)
        if state is None or set(state) != AUTHORS_KEYS:
            out.append(f"state dict: {name}: {None if state is None else sorted(state)}")
            continue
        if type(state["step"]) is not torch.Tensor:
            out.append(f"state dict: {name} step is a {type(state['step']).__name__}, not a plain tensor")
        for key in STATE_KEYS:
            s = state[key]
            if s is not None and not (isinstance(s, DTensor) and s.device_mesh == p.device_mesh
                                      and s.placements == p.placements):
                out.append(f"state dict: {name} {key} is not a DTensor on its param's mesh and placements")
    return out


def state_dict_sharded(r, backend):
    """get/set_optimizer_state_dict with sharded (DTensor) states into a fresh FSDP2 model and
    optimizer, whose states torch creates first by a zero-grad step with lr = 0 (a tensor lr, which
    torch replaces by torch.tensor(0.0) on the CPU for that step)."""
    mesh = r.mesh()
    a = fsdp2(new_model(r.device), mesh)
    opt_a = make_optimizer(a, backend, lr_tensor=True)
    train_ranks(r, a, opt_a, K_SAVE)
    osd = get_optimizer_state_dict(a, opt_a)
    problems = osd_problems(a, osd)
    # the live states keep moving with `a`: keep copies to load
    osd, msd = clone_tree(osd), clone_tree(get_model_state_dict(a))

    b = fsdp2(new_model(r.device, seed=1), mesh)  # other values: loading must overwrite them
    opt_b = make_optimizer(b, backend, lr_tensor=True)
    before = [p.detach().to_local().clone() for p in b.parameters()]
    get_optimizer_state_dict(b, opt_b)
    problems += init_step_problems(b, opt_b, backend, before)
    set_model_state_dict(b, msd)
    set_optimizer_state_dict(b, opt_b, osd)
    raise_on_any_rank(problems + layout_problems(b, opt_b, backend, K_SAVE))
    loaded, saved = gather(b, opt_b), gather(a, opt_a)
    train_ranks(r, a, opt_a, K_AFTER, start=K_SAVE)
    train_ranks(r, b, opt_b, K_AFTER, start=K_SAVE)
    got, want = gather(b, opt_b), gather(a, opt_a)
    if r.rank == 0:
        # same world size, backend and shards: the same bits
        assert_no_problems(mismatches(loaded, saved, None, "right after set_optimizer_state_dict")
                           + mismatches(got, want, None, f"{K_AFTER} steps after loading vs uninterrupted"))


BF16_STATES = dict(state_dtype=torch.bfloat16, sr_seed=12345)
# bf16 states against one process: the ranks round their local shards with the random bits of
# the shards' element indices, one process those of the whole tensors, so the two runs draw
# different bits. Each SR write errs by under one bf16 ulp (2^-8 relative), zero-mean; over 24
# steps at lr 2e-3 the params, which move by ~5e-2 relative, drift by ~1e-3 (measured ~2e-4).
BF16_PARAM_RTOL = 2e-3


def fsdp2_bf16_states(r, backend):
    """FSDP2 with bf16 states: DTensor states of dtype bf16 laid out like their params; the
    training within SR noise of one process with bf16 states; a sharded optimizer state dict
    (the groups' seeds in it) loaded into a fresh model and optimizer resumes bit for bit."""
    mesh = r.mesh()
    a = fsdp2(new_model(r.device), mesh)
    opt_a = make_optimizer(a, backend, **BF16_STATES)
    train_ranks(r, a, opt_a, K_SAVE)
    osd, msd = clone_tree(get_optimizer_state_dict(a, opt_a)), clone_tree(get_model_state_dict(a))
    b = fsdp2(new_model(r.device, seed=1), mesh)
    opt_b = make_optimizer(b, backend, state_dtype=torch.bfloat16, sr_seed=1)  # seeds: loaded
    get_optimizer_state_dict(b, opt_b)
    set_model_state_dict(b, msd)
    set_optimizer_state_dict(b, opt_b, osd)
    problems = layout_problems(a, opt_a, backend, K_SAVE, torch.bfloat16)
    problems += layout_problems(b, opt_b, backend, K_SAVE, torch.bfloat16)
    seeds_a, seeds_b = ([g["sr_seed"] for g in o.param_groups] for o in (opt_a, opt_b))
    if seeds_b != seeds_a:
        problems.append(f"loaded seeds {seeds_b}, saved {seeds_a}")
    raise_on_any_rank(problems)
    train_ranks(r, a, opt_a, K_AFTER, start=K_SAVE)
    train_ranks(r, b, opt_b, K_AFTER, start=K_SAVE)
    got, want = gather(b, opt_b), gather(a, opt_a)
    if r.rank != 0:
        return
    single = new_model(r.device)
    single_opt = make_optimizer(single, backend, **BF16_STATES)
    train(single, single_opt, STEPS, rank=0, world=1, device=r.device)
    alone = gather(single, single_opt)
    problems = mismatches(got, want, None, f"{K_AFTER} steps after loading vs uninterrupted")
    problems += mismatches({n: {"param": e["param"]} for n, e in want.items()},
                           {n: {"param": e["param"]} for n, e in alone.items()}, BF16_PARAM_RTOL,
                           f"bf16 states, FSDP2 on {r.world} ranks vs one process")
    assert_no_problems(problems)


def to_authors_layout(full_osd):
    """An FQN-keyed full optimizer state dict with integer keys, as the authors' class saves it."""
    fqns = [fqn for g in full_osd["param_groups"] for fqn in g["params"]]
    index = {fqn: i for i, fqn in enumerate(fqns)}
    return {"state": {index[fqn]: dict(s) for fqn, s in full_osd["state"].items()},
            "param_groups": [{**g, "params": [index[f] for f in g["params"]]}
                             for g in full_osd["param_groups"]]}


def full_osd_problems(full_osd, full_msd):
    out = []
    for name, p in full_msd.items():
        state = full_osd["state"].get(name)
        if state is None or set(state) != AUTHORS_KEYS:
            out.append(f"full state dict: {name}: {None if state is None else sorted(state)}")
            continue
        if float(state["step"]) != K_SAVE:
            out.append(f"full state dict: {name} step {state['step']!r}, expected {K_SAVE}")
        for key in STATE_KEYS:
            s = state[key]
            if s is None and not (key == "exp_avg_fast" and name.endswith("bias")):
                out.append(f"full state dict: {name} {key} is None")
            elif s is not None and (type(s) is not torch.Tensor or s.device.type != "cpu"
                                    or s.shape != p.shape):
                out.append(f"full state dict: {name} {key}: {type(s).__name__} on "
                           f"{getattr(s, 'device', '')} {tuple(s.shape)}, expected a plain CPU "
                           f"tensor {tuple(p.shape)}")
    return out


def state_dict_full(r, backend):
    """full_state_dict=True, cpu_offload=True: rank 0 gets plain full tensors. They load back into
    FSDP2 (broadcast from rank 0), into ours on one process and into the authors' class (float64
    stand-in); each continues as the uninterrupted run. Rank 0's one-process work comes after the
    last collective."""
    mesh = r.mesh()
    a = fsdp2(new_model(r.device), mesh)
    opt_a = make_optimizer(a, backend)
    train_ranks(r, a, opt_a, K_SAVE)
    gather_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_osd = get_optimizer_state_dict(a, opt_a, options=gather_opts)
    full_msd = get_model_state_dict(a, options=gather_opts)
    # set_*_state_dict(broadcast_from_rank0=True) put DTensors into the dicts they are given
    saved_osd, saved_msd = copy.deepcopy(full_osd), copy.deepcopy(full_msd)

    b = fsdp2(new_model(r.device, seed=1), mesh)
    opt_b = make_optimizer(b, backend)
    load_opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(b, full_msd if r.rank == 0 else {}, options=load_opts)
    set_optimizer_state_dict(b, opt_b, full_osd if r.rank == 0 else {}, options=load_opts)
    raise_on_any_rank(layout_problems(b, opt_b, backend, K_SAVE))
    train_ranks(r, a, opt_a, K_AFTER, start=K_SAVE)
    train_ranks(r, b, opt_b, K_AFTER, start=K_SAVE)
    got, want = gather(b, opt_b), gather(a, opt_a)
    if r.rank != 0:
        return
    problems = full_osd_problems(saved_osd, saved_msd)
    problems += mismatches(got, want, None, "full state dict back into FSDP2 vs uninterrupted")
    authors = to_authors_layout(saved_osd)
    ours_model = new_model(r.device, seed=1)
    ours_model.load_state_dict(saved_msd)
    ours = make_optimizer(ours_model, backend)
    ours.load_state_dict(copy.deepcopy(authors))
    train(ours_model, ours, K_AFTER, rank=0, world=1, device=r.device, start=K_SAVE)
    problems += mismatches(gather(ours_model, ours), want, FP32_RTOL,
                           "full state dict into ours on one process vs uninterrupted")
    ref_model = new_model("cpu", seed=1).double()
    ref_model.load_state_dict(saved_msd)
    ref = make_optimizer(ref_model, None, cls=ReferenceAdEMAMix)
    ref.load_state_dict(copy.deepcopy(authors))
    train(ref_model, ref, K_AFTER, rank=0, world=1, device="cpu", start=K_SAVE, dtype=torch.float64)
    problems += mismatches(gather(ref_model, ref), want, FP32_RTOL,
                           "full state dict into the authors' class (float64) vs uninterrupted")
    assert_no_problems(problems)


def dcp_save(r, backend):
    """Saves model and optimizer with torch.distributed.checkpoint after K_SAVE steps; rank 0 also
    keeps the gathered full values for dcp_load's exact check."""
    model = fsdp2(new_model(r.device), r.mesh())
    opt = make_optimizer(model, backend)
    train_ranks(r, model, opt, K_SAVE)
    path = r.checkpoint_dir(backend)
    raise_on_any_rank(layout_problems(model, opt, backend, K_SAVE))
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    expected = gather(model, opt)
    if r.rank == 0:
        torch.save(expected, path + ".expected.pt")


def dcp_load(r, backend):
    """Loads dcp_save's checkpoint (2 ranks) at this world size into a fresh model and optimizer:
    exactly the saved values, then K_AFTER more steps match one process's K_SAVE + K_AFTER."""
    path = r.checkpoint_dir(backend)
    model = fsdp2(new_model(r.device, seed=1), r.mesh())
    opt = make_optimizer(model, backend)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    raise_on_any_rank(layout_problems(model, opt, backend, K_SAVE))
    loaded = gather(model, opt)
    train_ranks(r, model, opt, K_AFTER, start=K_SAVE)
    got = gather(model, opt)
    if r.rank == 0:
        expected = torch.load(path + ".expected.pt", weights_only=True)
        assert_no_problems(
            mismatches(loaded, expected, None, "right after loading the 2-rank checkpoint")
            + mismatches(got, single_process_run(r.device, backend, K_SAVE + K_AFTER), FP32_RTOL,
                         f"resumed on {r.world} ranks vs one uninterrupted process"))


# ---------------------------------------------------------------------------------------------
# scenarios: bad input

def refused(call, match, what):
    """(raised, problems): call() must raise TypeError/ValueError/RuntimeError matching `match`."""
    try:
        call()
    except (TypeError, ValueError, RuntimeError) as e:
        if not re.search(match, str(e)):
            return True, [f"{what}: the error does not match {match!r}: {type(e).__name__}: {e}"]
        return True, []
    return False, [f"{what}: no error"]


def bad_grad_type(r, backend):
    """A DTensor param with a plain-tensor grad, and a plain param with a DTensor grad, given to an
    optimizer that stepped before (its states and cached lists exist) and to a fresh one: a clear
    error naming DTensor, and nothing changed (no state created)."""
    model, average_plain_grads = plain_and_dtensor_model(r)
    stepped = make_optimizer(model, backend)
    train_ranks(r, model, stepped, 2, after_backward=average_plain_grads)
    fresh = make_optimizer(model, backend)
    loss_of(model, batch(2, r.device).chunk(r.world)[r.rank]).backward()
    average_plain_grads()
    problems = []
    for what, p, make_bad in (
            ("a DTensor param with a plain grad", model.l1.weight, lambda g: g.full_tensor()),
            ("a plain param with a DTensor grad", model.l3.weight,
             lambda g: distribute_tensor(g, r.mesh(), [Shard(0)]))):
        good = p.grad
        p.grad = make_bad(good)
        for opt_name, opt in (("stepped", stepped), ("fresh", fresh)):
            snap = local_snapshot(model, opt)
            raised, found = refused(opt.step, r"(?i)dtensor", f"{what} ({opt_name} optimizer)")
            problems += found
            if raised:  # a step that ran was meant to change things
                problems += changes(model, opt, snap, f"{what} ({opt_name} optimizer)")
        p.grad = good
    raise_on_any_rank(problems)


def bad_state_mesh(r, backend):
    """A loaded state_dict whose state sits on another mesh (same ranks, another DeviceMesh), or
    on the param's mesh with other placements: load_state_dict refuses it, nothing changed."""
    mesh = r.mesh()
    model = fsdp2(new_model(r.device), mesh)
    opt = make_optimizer(model, backend)
    train_ranks(r, model, opt, 2)
    other = r.mesh(names=("other",))  # DeviceMesh.__eq__ compares dim names too
    good = opt.state_dict()
    s = good["state"][0]["exp_avg_slow"]
    bad_states = {
        "a state on another mesh": (DTensor.from_local(
            s.to_local().clone(), other, s.placements, shape=s.shape, stride=s.stride()), r"(?i)mesh"),
        "a state with other placements": (DTensor.from_local(
            s.full_tensor(), mesh, [Replicate()], shape=s.shape, stride=s.stride()), r"(?i)placement"),
    }
    snap = local_snapshot(model, opt)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    problems = []
    for what, (state, match) in bad_states.items():
        bad = {"state": {i: dict(st) for i, st in good["state"].items()},
               "param_groups": copy.deepcopy(good["param_groups"])}
        bad["state"][0]["exp_avg_slow"] = state
        raised, found = refused(lambda: opt.load_state_dict(bad), match, what)
        problems += found
        if raised:  # a load that went through was meant to change things
            problems += changes(model, opt, snap, what)
            if [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] != groups:
                problems.append(f"{what}: the param groups changed")
    raise_on_any_rank(problems)


SCENARIOS = {f.__name__: f for f in (
    fsdp2_parity, clip_parity, hsdp_parity, two_meshes, plain_and_dtensor, ddp_parity, mixed_precision,
    state_dict_sharded, state_dict_full, dcp_save, dcp_load, bad_grad_type, bad_state_mesh,
    fsdp2_bf16_states)}


# ---------------------------------------------------------------------------------------------
# the rank's main loop

# How long a rank waits in a collective, or for the other ranks' outcome of a case (see
# run_cases). The slowest case takes ~7 s on 2 cores.
EXCHANGE_S = 60


def in_step(errors):
    """Whether the ranks ended a case at the same point, so that their next collectives pair up:
    all succeeded, all failed alike, or they failed only the checks made after the last collective."""
    last_lines = {e.strip().splitlines()[-1] if e else None for e in errors}
    return len(last_lines) == 1 or all(
        line is None or line.startswith(f"{__name__}.Problems") for line in last_lines)


def run_cases(rank, world, store_port, device_type, cases, out_dir, shared_dir):
    """Runs `cases` in order on this rank, the entry point of each spawned process.

    Rank r writes its stdout/stderr to rank<r>.out and "start"/"end" lines with its tracebacks to
    rank<r>.log, so that the parent can name the case during which a rank died; rank 0 appends
    each case's outcome (all ranks' tracebacks) and duration to results.jsonl. The outcomes are
    exchanged through the TCP store, not a collective: a rank stuck in a collective that another
    rank left cannot hang the exchange, which times out instead. After a case that left the ranks
    out of step, the ranks exit and the parent runs the remaining cases in a fresh spawn.
    """
    out = os.open(os.path.join(out_dir, f"rank{rank}.out"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    faulthandler.register(signal.SIGUSR1)  # the parent asks for the stacks of hung ranks
    torch.set_num_threads(1)  # 2 cores, up to 4 ranks
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity needs fp32 matmuls
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", store_port, world, is_master=rank == 0)
    # A collective that a failed rank never joins times out instead of waiting 30 minutes.
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=EXCHANGE_S))
    r = Rank(rank, world, device, shared_dir)
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "a", buffering=1)
    for case in cases:
        log.write(f"start {case.id}\n")
        started = time.monotonic()
        error = None
        try:
            SCENARIOS[case.scenario](r, case.backend)
        except Exception:
            error = traceback.format_exc()
            log.write(error)
        store.set(f"{case.id}/{rank}", json.dumps(error))
        keys = [f"{case.id}/{k}" for k in range(world)]
        store.wait(keys, datetime.timedelta(seconds=EXCHANGE_S))
        errors = [json.loads(store.get(key)) for key in keys]
        log.write(f"end {case.id}\n")  # after the exchange: a timeout in it belongs to the case
        if rank == 0:
            with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
                f.write(json.dumps({"id": case.id, "errors": errors,
                                    "seconds": time.monotonic() - started}) + "\n")
        if not in_step(errors):
            break
    log.close()
    dist.destroy_process_group()
