"""The implementations the step benchmark times: ours (one per backend) and the peers."""
import dataclasses

import torch

from bench import peers


@dataclasses.dataclass(frozen=True)
class Impl:
    key: str           # what --impls takes
    label: str         # what the table shows
    make: object       # (params, device) -> Optimizer; raises Unavailable
    algo: str = "AdEMAMix"
    graph: bool = False       # time the replay of a CUDA graph of step() instead of step()
    cuda_only: bool = False
    needs_flag: str | None = None   # run only when this command-line flag is given
    default_on_cpu: bool = True
    default_on_cuda: bool = True
    ours: bool = False
    grad_passes: int = 0  # passes over the grads besides the step's own read (clipping)
    bf16_params_only: bool = False  # stochastic param rounding: its fp32-param rows say why not


def _ours(backend, **options):
    def make(params, device):
        import ademamix_cuda

        return ademamix_cuda.AdEMAMix(params, backend=backend, **peers.HYPERPARAMETERS, **options)

    return make


def _ours_after_torch_clip(backend):
    """Ours, after torch.nn.utils.clip_grad_norm_ at every step (the unfused way to clip)."""
    def make(params, device):
        opt = _ours(backend)(params, device)
        step = opt.step

        def clipped_step(closure=None):
            torch.nn.utils.clip_grad_norm_(params, peers.MAX_GRAD_NORM)
            return step(closure)

        opt.step = clipped_step
        return opt

    return make


# The bf16-state rows (issue #11): m1, m2, nu stored in bf16 and written with stochastic rounding
# (SR), 12 B/el fewer than fp32 states; "-sr" also writes bf16 params with SR. A fixed seed keeps
# the correctness guard's error the same from run to run. Only when named (--impls), so the
# default run's length stays as it was; gpu_session.sh names them.
_BF16_STATES = dict(state_dtype=torch.bfloat16, sr_seed=0)
_SR_PARAMS = dict(_BF16_STATES, param_rounding="stochastic")
_NAMED = dict(ours=True, default_on_cpu=False, default_on_cuda=False)
# The 8-bit-state rows: m1, m2, nu as uint8 codes with one fp32 absmax per 256 elements (about
# 18.1 B/el against 36 with fp32 params). min_8bit_size=256 rather than the default 4096, so that
# the correctness guard's tensors (CHECK_SHAPES, all but one under 4096 elements) take the 8-bit
# path and every matrix and bias of the benchmark sets quantizes, even scaled down by --params;
# only vectors under 256 elements (the smallest LayerNorm/bias tensors of a scaled-down set, the
# guard's 105-element tensor) keep fp32 states, and the bytes formula gives their average.
_8BIT = dict(state_dtype="8bit", min_8bit_size=256)

IMPLS = [
    Impl("cuda", "ours cuda", _ours("cuda"), ours=True),
    Impl("triton", "ours triton", _ours("triton"), ours=True, cuda_only=True),
    Impl("foreach", "ours foreach", _ours("foreach"), ours=True),
    Impl("single", "ours single", _ours("single"), ours=True),
    Impl("cuda-graph", "ours cuda, CUDA graph", _ours("cuda"), ours=True, graph=True,
         cuda_only=True),
    Impl("triton-graph", "ours triton, CUDA graph", _ours("triton"), ours=True, graph=True,
         cuda_only=True),
    Impl("cuda-bf16s", "ours cuda, bf16 states", _ours("cuda", **_BF16_STATES), **_NAMED),
    Impl("triton-bf16s", "ours triton, bf16 states", _ours("triton", **_BF16_STATES),
         cuda_only=True, **_NAMED),
    Impl("foreach-bf16s", "ours foreach, bf16 states", _ours("foreach", **_BF16_STATES), **_NAMED),
    Impl("single-bf16s", "ours single, bf16 states", _ours("single", **_BF16_STATES), **_NAMED),
    Impl("cuda-bf16s-graph", "ours cuda, bf16 states, CUDA graph", _ours("cuda", **_BF16_STATES),
         graph=True, cuda_only=True, **_NAMED),
    Impl("triton-bf16s-graph", "ours triton, bf16 states, CUDA graph",
         _ours("triton", **_BF16_STATES), graph=True, cuda_only=True, **_NAMED),
    Impl("cuda-8bit", "ours cuda, 8-bit states", _ours("cuda", **_8BIT), **_NAMED),
    Impl("triton-8bit", "ours triton, 8-bit states", _ours("triton", **_8BIT), cuda_only=True,
         **_NAMED),
    Impl("foreach-8bit", "ours foreach, 8-bit states", _ours("foreach", **_8BIT), **_NAMED),
    Impl("single-8bit", "ours single, 8-bit states", _ours("single", **_8BIT), **_NAMED),
    Impl("cuda-8bit-graph", "ours cuda, 8-bit states, CUDA graph", _ours("cuda", **_8BIT),
         graph=True, cuda_only=True, **_NAMED),
    Impl("triton-8bit-graph", "ours triton, 8-bit states, CUDA graph", _ours("triton", **_8BIT),
         graph=True, cuda_only=True, **_NAMED),
    Impl("cuda-bf16s-sr", "ours cuda, bf16 states + SR params", _ours("cuda", **_SR_PARAMS),
         bf16_params_only=True, **_NAMED),
    Impl("triton-bf16s-sr", "ours triton, bf16 states + SR params", _ours("triton", **_SR_PARAMS),
         bf16_params_only=True, cuda_only=True, **_NAMED),
    Impl("foreach-bf16s-sr", "ours foreach, bf16 states + SR params",
         _ours("foreach", **_SR_PARAMS), bf16_params_only=True, **_NAMED),
    Impl("single-bf16s-sr", "ours single, bf16 states + SR params", _ours("single", **_SR_PARAMS),
         bf16_params_only=True, **_NAMED),
    Impl("cuda-clip", "ours cuda, clipping fused", _ours("cuda", max_grad_norm=peers.MAX_GRAD_NORM),
         ours=True, grad_passes=1),
    Impl("cuda+torch-clip", "ours cuda after torch clip_grad_norm_",
         _ours_after_torch_clip("cuda"), ours=True, grad_passes=3),
    Impl("triton-clip", "ours triton, clipping fused",
         _ours("triton", max_grad_norm=peers.MAX_GRAD_NORM), ours=True, cuda_only=True,
         grad_passes=1),
    Impl("triton+torch-clip", "ours triton after torch clip_grad_norm_",
         _ours_after_torch_clip("triton"), ours=True, cuda_only=True, grad_passes=3),
    Impl("authors", "authors' style (for-loop)", peers.authors_style),
    Impl("foreach-peer", "torch._foreach AdEMAMix", peers.foreach_ademamix),
    Impl("compile", "torch.compile(foreach AdEMAMix)", peers.compiled_foreach_ademamix,
         needs_flag="compile"),
    Impl("bnb32", "bitsandbytes AdEMAMix 32-bit", peers.bnb_ademamix_32bit),
    Impl("bnb8", "bitsandbytes AdEMAMix 8-bit", peers.bnb_ademamix_8bit),
    Impl("apex", "apex FusedAdam", peers.apex_fused_adam, algo="Adam", cuda_only=True),
    Impl("adamw-fused", "torch AdamW fused", peers.adamw_fused, algo="Adam"),
    Impl("adamw-fused-graph", "torch AdamW fused, CUDA graph",
         peers.adamw_fused_capturable, algo="Adam", graph=True, cuda_only=True),
    Impl("adamw-foreach", "torch AdamW foreach", peers.adamw_foreach, algo="Adam"),
    Impl("adamw-loop", "torch AdamW for-loop", peers.adamw_for_loop, algo="Adam",
         default_on_cuda=False),
]
IMPL_KEYS = [i.key for i in IMPLS]
# Peers from other packages: their rows say "not installed" when the import fails.
_PEER_MODULES = {"bnb32": "bitsandbytes", "bnb8": "bitsandbytes", "apex": "apex.optimizers"}


def label_of(impl, device):
    if impl.key.startswith("cuda") and device.type == "cpu":
        return impl.label.replace("ours cuda", "ours cuda ext (CPU kernel)")
    return impl.label


NOT_FOR_FP32_PARAMS = ("does not apply to fp32 params: param_rounding='stochastic' rounds bf16 "
                       "params (the bf16 rows have it)")


def why_not_for_dtype(impl, dtype_name):
    """None if `impl` runs on params of `dtype_name` ("fp32", "bf16"), else the row's reason."""
    if impl.bf16_params_only and dtype_name != "bf16":
        return NOT_FOR_FP32_PARAMS
    return None


def why_not_run(impl, device, args):
    """None if `impl` should run in this session, else the reason shown in its row."""
    if impl.needs_flag and not getattr(args, impl.needs_flag):
        return f"skipped: pass --{impl.needs_flag}"
    module = _PEER_MODULES.get(impl.key)
    if module:
        reason = peers.importable(module)
        if reason:
            return reason
    if impl.key.startswith("triton") and device.type != "cuda":
        return "not available: CUDA only (the Triton interpreter is not a benchmark)"
    if impl.cuda_only and device.type != "cuda":
        return "not available: CUDA only"
    if impl.ours:
        try:
            from ademamix_cuda import backends
        except Exception as e:  # the package itself does not import: every row says so
            return f"not available: ademamix_cuda does not import ({type(e).__name__}: {e})"
        ok, reason = backends.available(device)[impl.key.split("-")[0].split("+")[0]]
        if not ok:
            return f"not available: {reason}"
    return None
