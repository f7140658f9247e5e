"""Loading a bitsandbytes AdEMAMix / AdEMAMix8bit optimizer state into `ademamix_cuda.AdEMAMix`.

    sd = torch.load("bnb_optimizer.pt")                  # bnb.optim.AdEMAMix(8bit).state_dict()
    if is_bitsandbytes_state_dict(sd):
        sd = from_bitsandbytes(sd)                        # our fp32 layout
    opt = ademamix_cuda.AdEMAMix(model.parameters(), ...)
    opt.load_state_dict(sd)

bitsandbytes is not needed (nor imported): the conversion reads the saved tensors only, and
dequantizes 8-bit states with the quantization map and scales saved in the state_dict.

What bitsandbytes stores (read from the bitsandbytes-foundation/bitsandbytes sources; described
here in our words)
-------------------------------------------------------------------------------------------------
bitsandbytes/optim/ademamix.py
  * `AdEMAMix` (optim_bits 32 or 8), `AdEMAMix8bit` (optim_bits=8) and the paged variants
    subclass `Optimizer2State` with the optimizer name "ademamix", block_wise=True,
    percentile_clipping=100. Defaults: alpha=5.0, weight_decay=1e-2, betas=(0.9, 0.999, 0.9999),
    eps=1e-8, min_8bit_size=4096, t_alpha=t_beta3=None.
  * `AdEMAMix.init_state` sets state["step"] = 0 (a Python int, per parameter) and stores BOTH
    first moments in one buffer: state1 has shape (2, *p.shape) - state1[0] is the fast EMA m1,
    state1[1] the slow EMA m2; state2 has p's shape and holds nu. The dtype is float32, or uint8
    when optim_bits == 8 and p.numel() >= min_8bit_size (smaller params keep fp32 states, and
    then have no absmax/qmap entries).
  * 8-bit states also get qmap1 = the signed dynamic map (used for m1 AND m2), qmap2 = the
    unsigned dynamic map (nu), absmax1 of shape (2, n_blocks) and absmax2 of shape (n_blocks,),
    float32, with n_blocks = ceil(numel / 256). Older releases used blocks of 2048 (both in
    init_state and in the kernel's BLOCKSIZE_2STATE), so their absmax has ceil(numel / 2048)
    entries.
  * `AdEMAMix.update_step`: with t_alpha and t_beta3 both None it defers to
    Optimizer2State.update_step; otherwise it increments state["step"] and computes, in Python
    floats, alpha_t = min(step * alpha / t_alpha, alpha) and
    beta3_t = min(exp(ln(b1) ln(b3) / ((1 - s) ln(b3) + s ln(b1))), b3) with s = step / t_beta3,
    then calls the 32-bit or the 8-bit blockwise update with gnorm_scale 1.
  * `AdEMAMix32bit` / `PagedAdEMAMix32bit` (in the versions read) derive from Optimizer2State,
    not from AdEMAMix: their state1 is allocated with p's shape (no room for m2) and the t_alpha /
    t_beta3 schedules are not applied. Such a state1 is rejected here (no m2 to convert).
bitsandbytes/optim/optimizer.py
  * `Optimizer2State.__init__` puts lr, betas, eps, weight_decay, alpha, t_alpha, t_beta3 in the
    param_group defaults; optim_bits, min_8bit_size, percentile_clipping, block_wise, max_unorm,
    skip_zeros live in `self.args`, not in the state_dict (accepted here if present, and dropped).
  * `Optimizer2State.update_step` increments state["step"] before the kernel call, so a saved
    step is the number of steps taken (as ours).
  * `Optimizer8bit.non_castable_tensor_keys` = qmap1/2, max1/2, new_max1/2, state1/2,
    gnorm_vec, absmax1/2, unorm_vec. Recent releases' `Optimizer8bit.state_dict` moves exactly
    those entries of each parameter's state into a nested dict under the key
    "__bnb_optimizer_quant_state__" (to hide them from FSDP's gathering) and leaves "step" outside;
    `load_state_dict` unwraps them. Both the nested and the flat (older) layouts are read here.
bitsandbytes/functional.py
  * `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: for i in 0..6, the
    midpoints of linspace(0.1, 1, k + 1) scaled by 10**(i - 6), with k = 2**i (signed: also
    their negatives) or k = 2**(i + 1) (unsigned); plus 0 and 1.0; 256 values, sorted ascending.
  * Blockwise (de)quantization: value = code[index] * absmax[block], blocks of `blocksize`
    consecutive elements in flat order.
csrc/cuda/optimizers.cu (kOptimizer32bit2State, kOptimizerStatic8bit2StateBlockwise)
  * The flat state1 buffer holds m1 at [0, n) and m2 at [n, 2n) (n = p.numel()).
  * 8-bit: m1 element j uses qmap1 and absmax1.flat[j // B]; nu uses qmap2 and
    absmax2[j // B]; m2 element j uses qmap1 and absmax1.flat[(n + B * (j // B)) // B]
    = absmax1.flat[n // B + j // B] (B = 256; each thread block handles B elements of all
    three states). When n is a multiple of B this is absmax1[1][j // B]. When it is not, m2's
    block b reads and writes the slot of absmax1.flat[n_blocks - 1 + b]: m2's block 0 shares
    its scale slot with m1's last block (whichever thread block writes last wins; bnb reads the
    codes back with that value), and absmax1[1][-1] is never used. `from_bitsandbytes` reads
    m2 exactly as bnb's kernel does, so the converted values are the ones bnb would resume from.
    (For the legacy blocks of 2048 the same indexing is assumed: the kernel is a template over
    the block size; that older kernel was not read.)
  * Update (both kernels, per element):
        m1 = b1 m1 + (1 - b1) g;  m2 = b3_t m2 + (1 - b3_t) g;  nu = b2 nu + (1 - b2) g^2
        p -= lr * (m1 / (1 - b1^t) + alpha_t m2) / (sqrt(nu) / sqrt(1 - b2^t) + eps)
        if weight_decay > 0: p *= 1 - lr * weight_decay          (after the step above)
    The 8-bit kernel skips elements whose grad is nan/inf (their three states become 0 and p is
    left as it is); new absmax values are the block maxima of |state|.

Math, ours against bnb's
------------------------
  * Same: m1 and nu are bias-corrected, m2 is not; eps is added after sqrt(nu / bc2); alpha's
    warm-up (linear, capped); the step count (per parameter, incremented before the update,
    the schedules use the incremented value).
  * beta3 warm-up: algebraically the same curve (ours interpolates the half-life linearly, which
    is bnb's exp(...) formula); ours adds 1e-8 inside the log (so beta1 == 0 works: bnb raises a
    math domain error when t_beta3 is set and beta1 == 0) and uses beta3 itself once
    t >= warm-up, where bnb takes the min with beta3. Differences are at rounding level.
  * Weight decay: bnb multiplies the already-updated param by (1 - lr wd); ours applies
    p - lr (u + wd p) with the param before the step. The two differ by lr^2 wd u per step
    (bnb's own Python reference class _ReferenceAdEMAMix does it our way).
  * bnb's 8-bit kernel skips non-finite grad elements (and zeroes their states); ours does not.
  * bnb's step is an int; ours a 0-d float32 tensor (exact up to 2**24 steps).
  * beta1 == 0: bnb still stores m1 (= the last grad; bias correction 1); ours stores no fast EMA
    (exp_avg_fast is None) and the update is the same, so m1 is dropped in the conversion.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["from_bitsandbytes", "is_bitsandbytes_state_dict", "QUANT_STATE_KEY", "BLOCKSIZE"]

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
BLOCKSIZE = 256  # bnb's block size for 8-bit optimizer states
_LEGACY_BLOCKSIZE = 2048  # older bnb releases
_BNB_STATE_KEYS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "max1", "max2",
                   "new_max1", "new_max2", "gnorm_vec", "unorm_vec")
_QUANT_KEYS = ("qmap1", "qmap2", "absmax1", "absmax2")
# bnb param_group / config keys that have no meaning for us (dropped)
_BNB_ONLY_GROUP_KEYS = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise",
                        "max_unorm", "skip_zeros", "is_paged", "args", "optimizer_name")
_REQUIRED_GROUP_KEYS = ("params", "lr", "betas", "alpha", "eps", "weight_decay")


def _param_states(state_dict):
    state = state_dict.get("state")
    return state.values() if isinstance(state, Mapping) else ()


def is_bitsandbytes_state_dict(state_dict) -> bool:
    """True for a state_dict in bitsandbytes' Optimizer8bit layout (AdEMAMix or another 2-state
    bnb optimizer): a parameter state with "state1" (flat, or nested under
    "__bnb_optimizer_quant_state__"), or, with no state yet, param groups that carry bnb's
    t_alpha / t_beta3 / optim_bits keys and none of ours. Never raises."""
    if not isinstance(state_dict, Mapping):
        return False
    groups = state_dict.get("param_groups")
    if not isinstance(groups, (list, tuple)) or "state" not in state_dict:
        return False
    for s in _param_states(state_dict):
        if isinstance(s, Mapping):
            nested = s.get(QUANT_STATE_KEY)
            if "state1" in s or (isinstance(nested, Mapping) and "state1" in nested):
                return True
            if any(k in s for k in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")):
                return False
    groups = [g for g in groups if isinstance(g, Mapping)]
    ours = any("alpha_warmup" in g or "beta3_warmup" in g for g in groups)
    theirs = any(k in g for g in groups for k in ("t_alpha", "t_beta3", "optim_bits"))
    return theirs and not ours


def from_bitsandbytes(state_dict, *, blocksize: int | None = None) -> dict:
    """The state_dict of a bitsandbytes AdEMAMix / AdEMAMix8bit (32-bit or 8-bit blockwise
    states, paged or not) in ademamix_cuda.AdEMAMix's fp32 layout, for its load_state_dict.

    8-bit states are dequantized with the qmap and absmax saved with them (value =
    qmap[code] * absmax[block], as bnb's kernel reads them); 32-bit states are copied. Param ids
    and the group structure are kept; group keys t_alpha / t_beta3 become alpha_warmup /
    beta3_warmup, bnb-only keys are dropped, other keys (lr, betas, alpha, eps, weight_decay,
    and e.g. an LR scheduler's initial_lr) are kept. Tensors stay on the device they are on.

    blocksize: of the 8-bit states; None infers it per parameter from the absmax sizes (256, or
    2048 for checkpoints of older bnb releases; the two cannot be confused).

    Raises ValueError for anything that is not a bnb AdEMAMix state (the message names the
    parameter and the problem). The input is not modified.
    """
    if blocksize is not None and (isinstance(blocksize, bool) or not isinstance(blocksize, int)
                                  or blocksize <= 0):
        raise ValueError(f"blocksize must be a positive int or None, got {blocksize!r}")
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state_dict: expected a dict with the keys 'state' and "
                         "'param_groups'")
    states, groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(states, Mapping):
        raise ValueError(f"state_dict['state'] must be a dict, got {type(states).__name__}")
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"state_dict['param_groups'] must be a list, got {type(groups).__name__}")

    new_groups, beta1_of = [], {}
    for gi, group in enumerate(groups):
        new_group = _convert_group(gi, group)
        for pid in new_group["params"]:
            if pid in beta1_of:
                raise ValueError(f"parameter id {pid!r} is listed in more than one param group")
            beta1_of[pid] = new_group["betas"][0]
        new_groups.append(new_group)

    new_states = {}
    for pid, raw in states.items():
        if pid not in beta1_of:
            raise ValueError(f"the state_dict holds state for parameter {pid!r}, which is in no "
                             "param group")
        new_states[pid] = _convert_state(pid, raw, beta1_of[pid], blocksize)
    return {"state": new_states, "param_groups": new_groups}


def _convert_group(gi, group):
    if not isinstance(group, Mapping):
        raise ValueError(f"param group {gi} must be a dict, got {type(group).__name__}")
    missing = [k for k in _REQUIRED_GROUP_KEYS if k not in group]
    if missing:
        raise ValueError(f"param group {gi} is not a bitsandbytes AdEMAMix group: it lacks {missing}")
    if "alpha_warmup" in group or "beta3_warmup" in group:
        raise ValueError(f"param group {gi} already has ademamix_cuda keys (alpha_warmup / "
                         "beta3_warmup): it is not a bitsandbytes state_dict")
    bits = group.get("optim_bits", 32)
    if isinstance(bits, bool) or bits not in (8, 32):
        raise ValueError(f"param group {gi}: unknown optim_bits {bits!r} (bitsandbytes AdEMAMix "
                         "stores 8 or 32 bit states)")
    if group.get("block_wise", True) is False:
        raise ValueError(f"param group {gi}: block_wise=False states are not supported "
                         "(bitsandbytes' AdEMAMix is always blockwise)")
    betas = group["betas"]
    if isinstance(betas, Tensor):
        betas = betas.tolist()
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise ValueError(f"param group {gi}: betas must be (beta1, beta2, beta3) for AdEMAMix, "
                         f"got {betas!r}")
    params = group["params"]
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"param group {gi}: 'params' must be a list of ids, got {type(params).__name__}")
    out = {}
    for key, value in group.items():
        if key in _BNB_ONLY_GROUP_KEYS or key in ("t_alpha", "t_beta3"):
            continue
        out[key] = value
    out["params"] = list(params)
    out["betas"] = tuple(float(b) for b in betas)
    out["alpha_warmup"] = group.get("t_alpha")
    out["beta3_warmup"] = group.get("t_beta3")
    return out


def _flat_state(pid, raw):
    """The parameter's bnb state with the FSDP-wrapped entries put back at the top level."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"parameter {pid!r}: its state must be a dict, got {type(raw).__name__}")
    flat = {k: v for k, v in raw.items() if k != QUANT_STATE_KEY}
    if QUANT_STATE_KEY in raw:
        nested = raw[QUANT_STATE_KEY]
        if not isinstance(nested, Mapping):
            raise ValueError(f"parameter {pid!r}: {QUANT_STATE_KEY!r} must be a dict, got "
                             f"{type(nested).__name__}")
        clash = sorted(set(nested) & set(flat))
        if clash:
            raise ValueError(f"parameter {pid!r}: {clash} appear both inside and outside "
                             f"{QUANT_STATE_KEY!r}")
        flat.update(nested)
    return flat


def _step_tensor(pid, step):
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ValueError(f"parameter {pid!r}: 'step' must be one number, got shape {list(step.shape)}")
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step >= 0 or math.isinf(step):
        raise ValueError(f"parameter {pid!r}: 'step' must be a non-negative number, got {step!r}")
    return torch.tensor(float(step), dtype=torch.float32)


def _convert_state(pid, raw, beta1, blocksize):
    s = _flat_state(pid, raw)
    if "step" not in s:
        raise ValueError(f"parameter {pid!r}: not a bitsandbytes state, it lacks 'step' (has {sorted(s)})")
    missing = [k for k in ("state1", "state2") if k not in s]
    if missing:
        raise ValueError(f"parameter {pid!r}: not a bitsandbytes AdEMAMix state, it lacks {missing} "
                         f"(has {sorted(s)})")
    if any(k in s for k in ("max1", "new_max1", "max2", "new_max2")):
        raise ValueError(f"parameter {pid!r}: non-blockwise 8-bit states (max1/new_max1) are not "
                         "supported (bitsandbytes' AdEMAMix is always blockwise)")
    state1, state2 = s["state1"], s["state2"]
    for key, value in (("state1", state1), ("state2", state2)):
        if not isinstance(value, Tensor):
            raise ValueError(f"parameter {pid!r}: {key!r} must be a tensor, got {type(value).__name__}")
    if state1.dim() < 1 or state1.shape[0] != 2 or state1.shape[1:] != state2.shape:
        raise ValueError(
            f"parameter {pid!r}: state1 has shape {list(state1.shape)} and state2 {list(state2.shape)}; "
            f"bitsandbytes' AdEMAMix stacks m1 and m2 in state1 with shape [2, *param.shape] = "
            f"{[2, *state2.shape]} (a state1 without that leading 2 has no slow EMA: e.g. "
            "AdEMAMix32bit's, or another optimizer's)")
    quantized = state1.dtype == torch.uint8 or state2.dtype == torch.uint8 or any(k in s for k in _QUANT_KEYS)
    if quantized:
        m1, m2, nu = _dequantize(pid, s, blocksize)
    else:
        for key, value in (("state1", state1), ("state2", state2)):
            if not value.is_floating_point():
                raise ValueError(f"parameter {pid!r}: 32-bit {key!r} must be a float tensor, "
                                 f"got {value.dtype}")
        fmt = torch.contiguous_format
        s1 = state1.detach().to(torch.float32)
        m1, m2 = s1[0].clone(memory_format=fmt), s1[1].clone(memory_format=fmt)
        nu = state2.detach().to(torch.float32).clone(memory_format=fmt)
    return {"step": _step_tensor(pid, s["step"]),
            "exp_avg_fast": None if beta1 == 0.0 else m1,
            "exp_avg_slow": m2,
            "exp_avg_sq": nu}


def _n_blocks(n, b):
    return -(-n // b)


def _dequantize(pid, s, blocksize):
    codes1, codes2 = s["state1"], s["state2"]
    for key, value in (("state1", codes1), ("state2", codes2)):
        if value.dtype != torch.uint8:
            raise ValueError(f"parameter {pid!r}: 8-bit {key!r} codes must be uint8, got {value.dtype} "
                             "(a state with qmap/absmax entries holds 8-bit codes)")
    missing = [k for k in _QUANT_KEYS if k not in s]
    if missing:
        raise ValueError(f"parameter {pid!r}: 8-bit state lacks {missing}: the saved quantization "
                         "map (qmap) and block scales (absmax) are needed to dequantize it")
    for key in _QUANT_KEYS:
        value = s[key]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            what = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"parameter {pid!r}: {key!r} must be a float tensor, got {what}")
    for key in ("qmap1", "qmap2"):
        if s[key].numel() != 256:
            raise ValueError(f"parameter {pid!r}: {key!r} must hold 256 values (one per 8-bit "
                             f"code), got shape {list(s[key].shape)}")
    n = codes2.numel()
    absmax1, absmax2 = s["absmax1"], s["absmax2"]
    candidates = (blocksize,) if blocksize is not None else (BLOCKSIZE, _LEGACY_BLOCKSIZE)
    fits = [b for b in candidates
            if absmax2.numel() == _n_blocks(n, b) and absmax1.numel() == 2 * _n_blocks(n, b)
            and absmax1.dim() in (1, 2) and (absmax1.dim() == 1 or absmax1.shape[0] == 2)]
    if not fits:
        expected = ", ".join(f"absmax1 [2, {_n_blocks(n, b)}] and absmax2 [{_n_blocks(n, b)}] "
                             f"for blocks of {b}" for b in candidates)
        raise ValueError(f"parameter {pid!r}: absmax1 has shape {list(absmax1.shape)} and absmax2 "
                         f"{list(absmax2.shape)}, which do not fit {n} codes per state "
                         f"(n_blocks = ceil(numel / blocksize); expected {expected})")
    b = fits[0]
    device = codes1.device
    q1 = s["qmap1"].detach().reshape(-1).to(device=device, dtype=torch.float32)
    q2 = s["qmap2"].detach().reshape(-1).to(device=device, dtype=torch.float32)
    a1 = absmax1.detach().reshape(-1).to(device=device, dtype=torch.float32)
    a2 = absmax2.detach().reshape(-1).to(device=device, dtype=torch.float32)
    block = torch.arange(n, device=device) // b
    c1 = codes1.detach().reshape(2, n).long()
    c2 = codes2.detach().reshape(n).long()
    shape = codes2.shape
    m1 = (q1[c1[0]] * a1[block]).reshape(shape)
    # m2's block k uses the absmax slot bnb's kernel uses: (n + b * k) // b (see the docstring)
    m2 = (q1[c1[1]] * a1[n // b + block]).reshape(shape)
    nu = (q2[c2] * a2[block]).reshape(shape)
    return m1, m2, nu
