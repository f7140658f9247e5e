"""Launch plans: how the kernel backends map tensors to blocks, and keep that map across steps.

- The op's CPU stand-in for the GPU runs the CUDA kernel's block function, blocks in a new
  shuffled order each launch, with the plan (and its per-tensor block counters) cached across
  launches: the step count handoff between the blocks of a tensor is tested here, not only on a
  GPU.
- The optimizer's Triton Stepper reuses its plan while the tensors stay where they are, and
  takes the checked path when anything moves.
- On a GPU: plans built during a CUDA-graph capture (torch's whole-network capture recipe), an
  eager step before the first replay, two graphs sharing such a plan, a plan used on a second
  stream, and overlapping launches on two streams.
"""
import pytest
import torch

import ademamix_cuda
from helpers import (FP32_RTOL, GradSource, Lists, assert_rel_close, cpu_gpu_blocks,
                     make_param_values, require_backend, requires_gpu)

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=9,
             alpha_warmup=6, eps=1e-8, weight_decay=0.1, maximize=False)
CHUNK = 16384  # csrc/ademamix.h kChunkSize and the Triton CHUNK_SIZE


def test_gpu_stand_in_step_handoff_over_many_launches():
    """Tensors of 1 to 7 chunks, each starting at its own step count, 30 launches of one cached
    plan (block counters persist and only grow), every fourth step skipped by found_inf: each
    step count moves by exactly one per launch that is not skipped, and params and states match
    the reference. A last block that writes the step too early, or a counter that miscounts on
    a later launch, shows as a wrong count or a wrong schedule step here."""
    require_backend("cuda")
    shapes = [(1,), (CHUNK,), (CHUNK + 1,), (3 * CHUNK + 5,), (7 * CHUNK,), (0,), (5, 7)]
    lists = Lists(shapes, torch.float32, "cpu", seed=201)
    starts = [0, 3, 1, 8, 2, 5, 4]
    for s, t in zip(lists.steps, starts):
        s.fill_(t)
    lists.ref_t = list(starts)
    grads = GradSource(shapes, seed=202)
    for k in range(1, 31):
        g = [x.float() for x in grads.next()]
        skip = k % 4 == 0
        with cpu_gpu_blocks():
            ademamix_cuda.functional.ademamix(*lists.args(g), backend="cuda",
                                              found_inf=torch.tensor(float(skip)), **HYPER)
        if not skip:
            lists.reference_step(g, **HYPER)
        lists.check(FP32_RTOL, f"launch {k}")


# ---------------------------------------------------------------------------------------------
# The Triton Stepper (the optimizer's per-group launcher)


def _count_calls(monkeypatch, name):
    from ademamix_cuda.triton_kernels import ademamix as tk

    calls = []
    real = getattr(tk, name)

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(tk, name, counting)
    return calls


def _reference_pair(shapes, seed):
    from reference import ReferenceAdEMAMix

    values = make_param_values(shapes, seed)
    params = [torch.nn.Parameter(v.float()) for v in values]
    ref_params = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    opt = ademamix_cuda.AdEMAMix(params, lr=1e-2, weight_decay=0.1, backend="triton")
    ref = ReferenceAdEMAMix(ref_params, lr=1e-2, weight_decay=0.1)
    return params, opt, ref_params, ref


def _check(params, opt, ref_params, ref, what):
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        assert_rel_close(p, rp, FP32_RTOL, f"{what} param[{i}]")
        for key in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
            assert_rel_close(opt.state[p][key], ref.state[rp][key], FP32_RTOL,
                             f"{what} param[{i}] {key}")


def test_stepper_reuses_its_plan_until_something_moves(monkeypatch):
    """Same tensors: no re-check, no new plan. Grads at new addresses: only the plan's grad
    column is rewritten. A param given new storage (p.data = ...): the fully checked path. In
    every case the tensors at the current addresses are the ones updated."""
    require_backend("triton")
    shapes = ((5,), (3, 4))
    params, opt, ref_params, ref = _reference_pair(shapes, seed=211)
    grads = GradSource(shapes, seed=212)
    runs = _count_calls(monkeypatch, "_run")
    moves = _count_calls(monkeypatch, "_with_grads")

    def step(what):
        for p, rp, g in zip(params, ref_params, grads.next()):
            if p.grad is None:
                p.grad = g.float()
            else:
                p.grad.copy_(g)  # same grad tensors, new values
            rp.grad = p.grad.detach().double().clone()
        opt.step()
        ref.step()
        _check(params, opt, ref_params, ref, what)

    step("first step")
    assert (len(runs), len(moves)) == (1, 0)
    for k in range(3):
        step(f"same tensors {k}")
    assert (len(runs), len(moves)) == (1, 0), "a step with unchanged tensors re-planned"

    keep_alive = [p.grad for p in params]  # the old grads stay allocated: new addresses
    for p in params:
        p.grad = p.grad.clone()
    step("grads moved")
    assert (len(runs), len(moves)) == (1, 1)
    del keep_alive

    old = params[1].data
    params[1].data = old.clone()  # new storage: the old one must not be written again
    old_copy = old.clone()
    step("param moved")
    assert len(runs) == 2
    assert torch.equal(old, old_copy), "the param's old storage was written"


def test_stepper_refuses_a_grad_moved_onto_a_param():
    """Grads that moved are checked against the memory the step writes before the grad column
    is rewritten: a grad that is another param's memory is refused by name."""
    require_backend("triton")
    shapes = ((4,), (4,))
    params, opt, _, _ = _reference_pair(shapes, seed=216)
    for p, g in zip(params, GradSource(shapes, seed=217).next()):
        p.grad = g.float()
    opt.step()
    params[1].grad = params[0].detach()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"(params\[0\] and grads\[1\]|grads\[1\] and params\[0\]) "
                                             r"share memory"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_stepper_refuses_a_non_contiguous_grad():
    require_backend("triton")
    shapes = ((5,), (3, 4))
    params, opt, _, _ = _reference_pair(shapes, seed=221)
    for p, g in zip(params, GradSource(shapes, seed=222).next()):
        p.grad = g.float()
    opt.step()
    before = [p.detach().clone() for p in params]
    params[1].grad = torch.randn(4, 3).t()  # the param's shape, transposed memory
    with pytest.raises(RuntimeError, match="contiguous"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


# ---------------------------------------------------------------------------------------------
# GPU only: CUDA graphs and streams

KERNELS = ("cuda", "triton")


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 300), torch.nn.GELU(),
                               torch.nn.Linear(300, 10)).cuda()


@requires_gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_whole_network_capture_recipe(backend):
    """torch's documented recipe: zero_grad(set_to_none=True), then forward, backward and step
    captured in one graph. The grads come from the graph's pool at new addresses, so the plan is
    built during the capture. Replays must match an eager twin fed the same data."""
    require_backend(backend, "cuda")
    models = [_mlp(231), _mlp(231)]
    lrs = [torch.tensor(1e-3, device="cuda") for _ in models]
    opts = [ademamix_cuda.AdEMAMix(m.parameters(), lr=lr, betas=(0.9, 0.999, 0.999),
                                   alpha=5.0, weight_decay=0.1, backend=backend)
            for m, lr in zip(models, lrs)]
    gen = torch.Generator(device="cuda").manual_seed(232)
    data = [(torch.randn(32, 64, device="cuda", generator=gen),
             torch.randn(32, 10, device="cuda", generator=gen)) for _ in range(20)]

    def train_step(model, opt, x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:  # warm-up: both optimizers take the same eager steps
            for model, opt in zip(models, opts):
                opt.zero_grad(set_to_none=True)
                train_step(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opts[1].zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step(models[1], opts[1], static_x, static_y)
    for k, (x, y) in enumerate(data[3:]):
        for lr in lrs:
            lr.fill_(1e-3 * (1 + k % 3))
        opts[0].zero_grad(set_to_none=True)
        train_step(models[0], opts[0], x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(models[0].parameters(), models[1].parameters())):
            assert_rel_close(b, a.detach().double(), FP32_RTOL, f"replay {k} param[{i}]")
            for key in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq", "step"):
                assert_rel_close(opts[1].state[b][key], opts[0].state[a][key].double(),
                                 FP32_RTOL, f"replay {k} param[{i}] {key}")


def _captured_plan_lists(backend):
    """Lists whose grads are allocated inside a capture (new addresses: the plan is built during
    the capture), the graph (not replayed yet), the grads it allocated, and a reference copy."""
    shapes = ((), (5,), (33, 65), (3 * CHUNK + 7,))
    source = [g.float().cuda() for g in GradSource(shapes, seed=242).next()]
    # Load (and for Triton compile) the kernels before the capture, on other tensors.
    ademamix_cuda.functional.ademamix(*Lists(shapes, torch.float32, "cuda", seed=240).args(source),
                                      backend=backend, **HYPER)
    torch.cuda.synchronize()
    lists = Lists(shapes, torch.float32, "cuda", seed=241)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = [g * 1.0 for g in source]  # allocated from the graph's private pool
        ademamix_cuda.functional.ademamix(*lists.args(grads), backend=backend, **HYPER)
    return lists, graph, grads, source


@requires_gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_eager_step_before_first_replay(backend):
    """A plan built during a capture is written on the device by the graph's copy, i.e. at the
    first replay. An eager step on the same tensors before any replay must upload it first."""
    require_backend(backend, "cuda")
    lists, graph, grads, source = _captured_plan_lists(backend)
    for g, s in zip(grads, source):
        g.copy_(s)  # the graph never ran: give its grads their values eagerly
    ademamix_cuda.functional.ademamix(*lists.args(grads), backend=backend, **HYPER)
    torch.cuda.synchronize()
    lists.reference_step([s.cpu() for s in source], **HYPER)
    lists.check(FP32_RTOL, "eager step before the first replay")
    graph.replay()  # the graph still works afterwards
    torch.cuda.synchronize()
    lists.reference_step([s.cpu() for s in source], **HYPER)
    lists.check(FP32_RTOL, "replay after the eager step")


@requires_gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_second_graph_on_a_plan_built_in_a_capture(backend):
    """Two graphs capture the same tensors; the plan was built during the first capture. Only
    the second graph is replayed: it must not depend on the first graph's copy."""
    require_backend(backend, "cuda")
    lists, first, grads, source = _captured_plan_lists(backend)
    second = torch.cuda.CUDAGraph()
    with torch.cuda.graph(second, pool=first.pool()):
        ademamix_cuda.functional.ademamix(*lists.args(grads), backend=backend, **HYPER)
    for g, s in zip(grads, source):
        g.copy_(s)
    for k in range(3):
        second.replay()
        torch.cuda.synchronize()
        lists.reference_step([s.cpu() for s in source], **HYPER)
        lists.check(FP32_RTOL, f"second graph, replay {k}")
    del first


@requires_gpu
def test_triton_plan_records_the_streams_that_use_it(monkeypatch):
    """A Triton plan built on one stream and used on another is recorded on that stream, so its
    memory is not handed out again while that stream may still read it."""
    require_backend("triton", "cuda")
    recorded = []
    real = torch.Tensor.record_stream
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, s: (recorded.append(s), real(t, s))[1])
    shapes = ((5,), (4097,))
    lists = Lists(shapes, torch.float32, "cuda", seed=251)
    grads = [g.float().cuda() for g in GradSource(shapes, seed=252).next()]
    ademamix_cuda.functional.ademamix(*lists.args(grads), backend="triton", **HYPER)
    other = torch.cuda.Stream()
    other.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(other):
        ademamix_cuda.functional.ademamix(*lists.args(grads), backend="triton", **HYPER)
    torch.cuda.current_stream().wait_stream(other)
    assert other in recorded


@requires_gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_counts_recover_after_overlapping_launches(backend):
    """Two launches of one plan overlap on two streams (a race on the data, which is then reset,
    but not on the block counters' consistency): later steps count exactly one per launch."""
    require_backend(backend, "cuda")
    shapes = ((7 * CHUNK + 3,), (2 * CHUNK,), (9,))
    lists = Lists(shapes, torch.float32, "cuda", seed=261)
    grads = [g.float().cuda() for g in GradSource(shapes, seed=262).next()]
    ademamix_cuda.functional.ademamix(*lists.args(grads), backend=backend, **HYPER)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for s in streams:
            with torch.cuda.stream(s):
                ademamix_cuda.functional.ademamix(*lists.args(grads), backend=backend, **HYPER)
    torch.cuda.synchronize()
    fresh = Lists(shapes, torch.float32, "cuda", seed=263)
    for mine, start in zip(lists.tensors(), fresh.tensors()):
        mine.copy_(start)
    lists.ref, lists.ref_t = fresh.ref, fresh.ref_t
    source = GradSource(shapes, seed=264)
    for k in range(5):
        for g, x in zip(grads, source.next()):
            g.copy_(x)  # the same tensors: the plan (and its counters) of the overlap
        ademamix_cuda.functional.ademamix(*lists.args(grads), backend=backend, **HYPER)
        torch.cuda.synchronize()
        lists.reference_step([g.cpu() for g in grads], **HYPER)
        lists.check(FP32_RTOL, f"step {k} after the overlap")
