"""Distributed training: FSDP2 (DTensor params), HSDP, DDP and distributed checkpoints.

Every case runs in ranks spawned with torch.multiprocessing: gloo on CPU tensors (every backend:
"cuda" runs its op's CPU kernel, "triton" the Triton interpreter), nccl on GPUs (skipped without
enough of them). What the ranks do is in dist_workers.py, one scenario per test below.

Spawning ranks costs 5-20 s on 2 cores (each rank imports torch), so the first test that needs a
result runs every selected case of this module, one spawn per (device, world size) for all of
them; each test then reports its own case. A rank that dies (a segfault, a hang) fails the case it
was running; the cases after it, or after one that left the ranks out of step, run in a fresh
spawn. The session's last lines give the spawns' wall times and the slowest cases.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_workers import EXCHANGE_S, Case, run_cases
from helpers import environment_skip_reason, require_backend

BACKENDS = ("cuda", "triton", "foreach")
CPU_WORLDS = (("cpu", 1), ("cpu", 2), ("cpu", 4))
GPU_WORLDS = (("cuda", 1), ("cuda", 2), ("cuda", 4))
# Ranks that write nothing for this long are hung: they are killed. It exceeds the ranks' own
# timeout for exchanging a case's outcome (dist_workers.EXCHANGE_S), which usually fires first.
HANG_S = 2 * EXCHANGE_S + 30
# Runs with one spawn per world size; world size 2 first because it writes the checkpoints that
# the other world sizes load.
WORLD_ORDER = (2, 1, 4)
DEPENDS_ON = {"dcp_load": lambda c: Case("dcp_save", c.device, 2, c.backend)}


def scenario(name, **fixed):
    """Marks a test as the report of scenario `name` of dist_workers; the case's device, world size
    and backend come from `fixed` or the test's parameters."""
    def mark(test):
        test.dist_scenario = (name, fixed)
        return test
    return mark


def _case_of(item):
    name, fixed = item.function.dist_scenario
    params = {**fixed, **item.callspec.params}
    return Case(name, params["device"], params["world"], params["backend"])


def _skip_reason(case):
    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if case.device == "cuda":
        if not torch.cuda.is_available():
            return "the nccl cases need CUDA devices (torch.cuda.is_available() is False)"
        if torch.cuda.device_count() < case.world:
            return f"needs {case.world} CUDA devices for nccl, this machine has {torch.cuda.device_count()}"
        if not dist.is_nccl_available():
            return "torch was built without nccl"
    elif not dist.is_gloo_available():
        return "torch was built without gloo"
    return environment_skip_reason(case.backend, case.device)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path):
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def _describe(errors):
    """One failure text from the ranks' tracebacks (identical ones shown once), or None."""
    by_text = defaultdict(list)
    for rank, error in enumerate(errors):
        if error is not None:
            by_text[error].append(rank)
    return "\n".join(f"ranks {ranks}:\n{text}" for text, ranks in by_text.items()) or None


def _running(out_dir, world):
    """The id of the case some rank started and did not end, or None."""
    for rank in range(world):
        running = None
        for line in _read(os.path.join(out_dir, f"rank{rank}.log")).splitlines():
            if line.startswith("start "):
                running = line[len("start "):]
            elif line.startswith("end "):
                running = None
        if running is not None:
            return running
    return None


def _output_tails(out_dir, world, lines=30):
    tails = []
    for rank in range(world):
        text = _read(os.path.join(out_dir, f"rank{rank}.out")).splitlines()[-lines:]
        if text:
            tails.append(f"--- rank {rank} output:\n" + "\n".join(text))
    return "\n".join(tails)


def _spawn(device, world, cases, out_dir, shared_dir):
    """Runs `cases` in one spawn of `world` ranks. Returns ({case: failure text or None} for the
    cases that ended, {case: seconds}). If the ranks died or hung, the case they were running gets
    the failure (key None: they died outside any case)."""
    os.makedirs(out_dir)
    # Inherited by the ranks at process creation, before they import torch (OpenMP reads it
    # then): one thread each, as 4 ranks share 2 cores. TRITON_INTERPRET comes from conftest.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        context = mp.start_processes(
            run_cases, args=(world, _free_port(), device, cases, out_dir, shared_dir),
            nprocs=world, join=False, start_method="spawn")
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    died, progress, last_progress = None, None, time.monotonic()
    while died is None:
        try:
            if context.join(timeout=0.5):
                break
        except mp.ProcessExitedException as e:  # a signal (segfault, abort) or os._exit
            name = signal.Signals(-e.exit_code).name if e.exit_code < 0 else f"exit code {e.exit_code}"
            died = f"rank {e.error_index} died ({name})"
        except mp.ProcessRaisedException as e:
            died = f"rank {e.error_index} raised:\n{e}"
        now = [os.path.getsize(os.path.join(out_dir, n)) for n in sorted(os.listdir(out_dir))]
        if now != progress:
            progress, last_progress = now, time.monotonic()
        elif died is None and time.monotonic() - last_progress > HANG_S:
            for process in context.processes:
                os.kill(process.pid, signal.SIGUSR1)  # each rank prints its Python stack
            time.sleep(2)
            for process in context.processes:
                process.kill()
                process.join()
            died = f"no progress for {HANG_S} s: ranks killed"
    outcomes, seconds = {}, {}
    for line in _read(os.path.join(out_dir, "results.jsonl")).splitlines():
        record = json.loads(line)
        case = next(c for c in cases if c.id == record["id"])
        outcomes[case], seconds[case] = _describe(record["errors"]), record["seconds"]
    if died is not None:
        running = _running(out_dir, world)
        case = next((c for c in cases if c.id == running), None)
        outcomes[case] = f"{died}\n{_output_tails(out_dir, world)}"
    return outcomes, seconds


class DistributedRunner:
    """Runs the selected cases of this module once per session and keeps their outcomes."""

    def __init__(self, session, work_dir):
        self.work_dir = work_dir
        self.shared_dir = os.path.join(work_dir, "shared")
        os.makedirs(self.shared_dir)
        self.selected = [_case_of(item) for item in session.items
                         if hasattr(getattr(item, "function", None), "dist_scenario")]
        self.outcomes = None
        self.seconds = {}  # case -> seconds its scenario ran
        self.spawn_seconds = defaultdict(float)  # (device, world) -> wall seconds of its spawns

    def check(self, node):
        case = _case_of(node)
        reason = _skip_reason(case)
        if reason is not None:
            pytest.skip(reason)
        require_backend(case.backend, case.device)
        if self.outcomes is None:
            self.outcomes = self._run_all()
        failure = self.outcomes.get(case, f"{case.id} did not run")
        if failure is not None:
            pytest.fail(f"{case.id}:\n{failure}", pytrace=False)

    def _run_all(self):
        wanted = [c for c in self.selected if _skip_reason(c) is None]
        wanted += [DEPENDS_ON[c.scenario](c) for c in wanted if c.scenario in DEPENDS_ON]
        wanted = list(dict.fromkeys(wanted))
        outcomes = {}
        for device in ("cpu", "cuda"):
            for world in WORLD_ORDER:
                cases = []
                for c in wanted:
                    if (c.device, c.world) != (device, world):
                        continue
                    dependency = DEPENDS_ON.get(c.scenario, lambda _: None)(c)
                    if dependency is not None and outcomes.get(dependency, "") is not None:
                        outcomes[c] = f"not run: it loads what {dependency.id} saves, which failed"
                    else:
                        cases.append(c)
                outcomes.update(self._run_spawns(device, world, cases))
        return outcomes

    def _run_spawns(self, device, world, cases):
        """Spawns until every case has an outcome: after a case that killed its ranks or left them
        out of step, the remaining cases run in a fresh spawn."""
        outcomes = {}
        while cases:
            started = time.monotonic()
            out_dir = os.path.join(self.work_dir, f"{device}-world{world}-{time.monotonic_ns()}")
            ran, seconds = _spawn(device, world, cases, out_dir, self.shared_dir)
            self.spawn_seconds[(device, world)] += time.monotonic() - started
            self.seconds.update(seconds)
            if None in ran:  # the ranks died outside any case: nothing more can run
                why = ran.pop(None)
                ran.update({c: why for c in cases if c not in ran})
            if not ran:
                ran = {cases[0]: "the ranks exited without running it"}
            outcomes.update(ran)
            cases = [c for c in cases if c not in outcomes]
        return outcomes


@pytest.fixture(scope="session")
def distributed(request, tmp_path_factory):
    runner = DistributedRunner(request.session, str(tmp_path_factory.mktemp("distributed")))
    yield runner
    if runner.spawn_seconds:
        spawns = ", ".join(f"{d} world {w} {s:.0f} s" for (d, w), s in runner.spawn_seconds.items())
        slowest = sorted(runner.seconds.items(), key=lambda kv: -kv[1])[:3]
        plugins = request.config.pluginmanager
        capture, reporter = plugins.get_plugin("capturemanager"), plugins.get_plugin("terminalreporter")
        if reporter is not None:  # shown even when output is captured: CI logs keep the timings
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                reporter.write_line(f"\ndistributed: spawns {spawns}; slowest cases "
                                    + ", ".join(f"{c.id} {s:.1f} s" for c, s in slowest))


# ---------------------------------------------------------------------------------------------
# the tests: each reports one scenario of dist_workers.py


@scenario("fsdp2_parity")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,world", CPU_WORLDS + GPU_WORLDS)
def test_fsdp2_matches_one_process(device, world, backend, distributed, request):
    """fully_shard on an MLP with uneven and empty shards, 24 steps: params and every state
    (gathered) match one process running the same model and data; states are DTensors like their
    params, step counts plain tensors."""
    distributed.check(request.node)


@scenario("clip_parity")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,world", [("cpu", 2), ("cpu", 4)])
def test_fused_clipping_matches_torch_clip_grad_norm(device, world, backend, distributed, request):
    """opt.clip_grad_norm_ on FSDP2 (2 ranks) and HSDP (4 ranks) params: the norm of the whole
    gradient, and training identical to one process clipping with torch's clip_grad_norm_."""
    distributed.check(request.node)


@scenario("hsdp_parity", world=4)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_hsdp_2d_mesh_matches_one_process(device, backend, distributed, request):
    """HSDP on a 2 x 2 mesh (Replicate, Shard(0)) matches one process."""
    distributed.check(request.node)


@scenario("two_meshes", world=4)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_param_group_with_dtensors_of_two_meshes(device, backend, distributed, request):
    """One param group holding DTensors of a 2-D and a 1-D mesh is grouped, not refused, and
    matches one process."""
    distributed.check(request.node)


@scenario("plain_and_dtensor", world=2)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_param_group_mixing_plain_tensors_and_dtensors(device, backend, distributed, request):
    """FSDP2 with ignored_params: one param group mixes DTensors and plain tensors; matches one
    process."""
    distributed.check(request.node)


@scenario("mixed_precision")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,world", [("cpu", 2), ("cuda", 1), ("cuda", 2)])
def test_fsdp2_mixed_precision_policy(device, world, backend, distributed, request):
    """MixedPrecisionPolicy(bf16 params, fp32 reduce): the optimizer sees fp32 sharded params and
    grads, keeps fp32 DTensor states, and matches one process fed the same gradients."""
    distributed.check(request.node)


# Two ranks and the op's kernel and foreach on the CPU (the Triton interpreter's bits are the
# op's, tests/test_low_precision.py); every backend on GPUs.
@scenario("fsdp2_bf16_states")
@pytest.mark.parametrize("backend,device,world", [(b, "cpu", 2) for b in ("cuda", "foreach")]
                         + [(b, "cuda", 2) for b in BACKENDS])
def test_fsdp2_with_bf16_states(device, world, backend, distributed, request):
    """state_dtype=torch.bfloat16 under FSDP2: bf16 DTensor states laid out like their params,
    training within SR noise of one process, and a sharded state dict that resumes bit for bit."""
    distributed.check(request.node)


@scenario("ddp_parity", world=2)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_ddp_matches_one_process(device, backend, distributed, request):
    """DistributedDataParallel (plain tensors, all-reduced gradients) matches one process."""
    distributed.check(request.node)


@scenario("state_dict_sharded", world=2)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_sharded_optimizer_state_dict_round_trip(device, backend, distributed, request):
    """get_optimizer_state_dict gives DTensor states and plain step tensors; on a fresh optimizer
    its zero-grad, lr = 0 step moves nothing; set_optimizer_state_dict into a fresh FSDP2 model
    loads the same bits and continues bit for bit as the uninterrupted run (tensor lr)."""
    distributed.check(request.node)


@scenario("state_dict_full", world=2)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_full_state_dict_loads_everywhere(device, backend, distributed, request):
    """full_state_dict=True, cpu_offload=True: the authors' keys with full plain tensors; it loads
    into the authors' class layout and into ours on one process, and back into FSDP2 with
    broadcast_from_rank0; all three continue as the uninterrupted run."""
    distributed.check(request.node)


@scenario("dcp_save", world=2)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_dcp_save(device, backend, distributed, request):
    """torch.distributed.checkpoint.save of the sharded model and optimizer at 2 ranks."""
    distributed.check(request.node)


@scenario("dcp_load")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,world", [("cpu", 1), ("cpu", 4)])
def test_dcp_load_resharded(device, world, backend, distributed, request):
    """The 2-rank checkpoint loads at 1 and 4 ranks with exactly the saved values, and training
    continues as one uninterrupted process."""
    distributed.check(request.node)


@scenario("bad_grad_type", world=2)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_grad_and_param_of_different_kinds_refused(device, backend, distributed, request):
    """A DTensor param with a plain grad, or a plain param with a DTensor grad, to an optimizer
    that stepped before and to a fresh one: a clear error naming DTensor, nothing changed."""
    distributed.check(request.node)


@scenario("bad_state_mesh", world=2)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu"])
def test_loaded_state_on_another_mesh_refused(device, backend, distributed, request):
    """load_state_dict with a state on another mesh, or with other placements than its param: a
    clear error naming the mesh / placements, nothing changed."""
    distributed.check(request.node)


def test_example_trains_saves_and_resumes_at_another_world_size(tmp_path):
    """examples/fsdp2_train.py under torchrun: 2 CPU ranks train and save, 1 rank resumes from the
    newest checkpoint and trains on (the foreach backend: the example's code path, not a kernel's,
    is what this checks)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build of torch")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def torchrun(ranks, steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", os.path.join(root, "examples", "fsdp2_train.py"),
               "--steps", str(steps), "--checkpoint", str(tmp_path), "--save-every", "10",
               "--backend", "foreach", "--log-every", "10"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    first = torchrun(2, 20)
    assert "step     20" in first and f"saved {tmp_path}/step-00000020" in first, first
    second = torchrun(1, 30)
    assert f"resumed from {tmp_path}/step-00000020 at step 20 on 1 ranks" in second, second
    assert "step     30" in second, second
