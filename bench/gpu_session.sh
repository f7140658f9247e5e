#!/usr/bin/env bash
# The GPU machine's checks in stages that each fit one 10-minute device call. Everything it
# prints also goes to $OUT/<stage>.log; the benchmark's JSON and PNG land in $OUT.
#
#   bash bench/gpu_session.sh test       build (with the ptxas report), the GPU tests (not slow)
#   bash bench/gpu_session.sh sanitize   compute-sanitizer memcheck, racecheck, synccheck
#   bash bench/gpu_session.sh bench      the host cost of step() (--host), then the full benchmark
#                                        with the Triton sweep
#   bash bench/gpu_session.sh bench-states
#                                        fp32 against bf16 states (and SR params) and 8-bit
#                                        states, with bitsandbytes' AdEMAMix (32- and 8-bit) as
#                                        peers, gpt set, fp32 and bf16 params: a call of its own,
#                                        so the full benchmark and the sweep keep theirs
#   bash bench/gpu_session.sh slow       the > 2^31-element test, and ncu on one step of each kernel
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
case "$stage" in
  test|sanitize|bench|bench-states|slow) ;;
  *) echo "usage: bash bench/gpu_session.sh test|sanitize|bench|bench-states|slow" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$stage.log") 2>&1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
ADEMAMIX_PTXAS_VERBOSE=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
  > "$OUT/build-$stage.txt" 2>&1 || { tail -40 "$OUT/build-$stage.txt"; exit 1; }
grep -E "Used [0-9]+ registers|spill" "$OUT/build-$stage.txt" | sort | uniq -c | sort -rn | head -8
rm -f "$OUT/build-$stage.txt"
"$PY" -m ademamix_cuda.info

case "$stage" in
  test)
    "$PY" -m pytest -q -rs -m "not slow" tests
    ;;
  sanitize)
    for tool in memcheck racecheck synccheck; do
      echo "== compute-sanitizer --tool $tool"
      compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" bench/sanitize.py || echo "== $tool FAILED ($?)"
    done
    ;;
  bench)
    # First: it is short, and its result survives a sweep that overruns the call.
    "$PY" -m bench --host --out "$OUT"
    "$PY" -m bench --sweep-triton --out "$OUT"
    ;;
  bench-states)
    # Targets: bf16 states at >= 90 % of copy bandwidth (24 B/el against 36: ~1.5x faster than
    # fp32 states); 8-bit states (cuda-8bit, triton-8bit) at >= 90 % of copy bandwidth too
    # (18.09 B/el against 36: ~2x faster than fp32 states) and >= 10x faster than bitsandbytes'
    # AdEMAMix8bit (bnb8; bnb32 beside it; both say "not installed" where bitsandbytes is not);
    # extra MiB shows whether a step makes param-sized temporaries.
    rows=cuda,cuda-bf16s,cuda-bf16s-sr,triton,triton-bf16s,triton-bf16s-sr
    rows+=,cuda-graph,cuda-bf16s-graph,triton-graph,triton-bf16s-graph
    rows+=,cuda-8bit,triton-8bit,cuda-8bit-graph,triton-8bit-graph
    # (the torch paths' SR draws its random bits in int64 temporaries, and their 8-bit path
    # quantizes in full-size temporaries: foreach only, as a peer)
    rows+=,foreach,foreach-bf16s,foreach-8bit
    "$PY" -m bench --sets gpt --dtypes fp32,bf16 --impls "$rows,authors,adamw-fused,bnb32,bnb8" \
      --out "$OUT"
    ;;
  slow)
    "$PY" -m pytest -q -rs -m slow tests
    # One step of each kernel on the gpt set (after two warm-up steps): DRAM throughput and
    # what limits it.
    for impl in cuda triton; do
      ncu --kernel-name regex:"ademamix" --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        "$PY" -m bench --sets gpt --dtypes fp32 --impls "$impl" --no-graph --no-check \
        --warmup 2 --reps 1 --max-reps 1 --min-time 0 --host-steps 1 --no-plot --out /tmp
    done
    ;;
esac
