"""The implementations the step benchmark times: ours (one per backend) and the peers."""
import dataclasses

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


def _ours(backend):
    def make(params, device):
        import ademamix_cuda

        return ademamix_cuda.AdEMAMix(params, backend=backend, **peers.HYPERPARAMETERS)

    return make


IMPLS = [
    Impl("cuda", "ours cuda", _ours("cuda"), ours=True),
    Impl("triton", "ours triton", _ours("triton"), ours=True, cuda_only=True),
    Impl("foreach", "ours foreach", _ours("foreach"), ours=True),
    Impl("single", "ours single", _ours("single"), ours=True),
    Impl("cuda-graph", "ours cuda, CUDA graph", _ours("cuda"), ours=True, graph=True,
         cuda_only=True),
    Impl("triton-graph", "ours triton, CUDA graph", _ours("triton"), ours=True, graph=True,
         cuda_only=True),
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
    if impl.key == "cuda" and device.type == "cpu":
        return "ours cuda ext (CPU kernel)"
    return impl.label


def why_not_run(impl, device, args):
    """None if `impl` should run in this session, else the reason shown in its row."""
    if impl.needs_flag and not getattr(args, impl.needs_flag):
        return f"skipped: pass --{impl.needs_flag}"
    module = _PEER_MODULES.get(impl.key)
    if module:
        reason = peers.importable(module)
        if reason:
            return reason
    if impl.key == "triton" and device.type != "cuda":
        return "not available: CUDA only (the Triton interpreter is not a benchmark)"
    if impl.cuda_only and device.type != "cuda":
        return "not available: CUDA only"
    if impl.ours:
        try:
            from ademamix_cuda import backends
        except Exception as e:  # the package itself does not import: every row says so
            return f"not available: ademamix_cuda does not import ({type(e).__name__}: {e})"
        ok, reason = backends.available(device)[impl.key.removesuffix("-graph")]
        if not ok:
            return f"not available: {reason}"
    return None
