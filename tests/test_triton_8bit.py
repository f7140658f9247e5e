"""8-bit blockwise states in the Triton kernel (ademamix_cuda/quant.py's format).

- Exactness: N free-running steps of the Triton step over tensors with 8-bit states (full blocks,
  a partial last block, a partial last block in the middle of nothing else) and one with float
  states in the same launch, against a torch reference written here that does the same fp32
  operations in the same order (the kernel's step scalars included: its expm1 polynomial in fp32),
  dequantizing with quant.values_of and quantizing with quant.quantize_blockwise. Every byte
  must match: params, codes, absmax, float states.
- Bad input: each rule of the 8-bit arguments raises an error naming the list and index.
- The op's CPU kernel (torch.ops.ademamix.step_), when it takes the absmax lists: byte-identical
  results.

Runs interpreted on CPU (conftest sets TRITON_INTERPRET=1 without a GPU), or compiled on CUDA.
"""
import math

import pytest
import torch

from ademamix_cuda import quant, rounding
from helpers import TRITON_INTERPRETED, environment_skip_reason, extension_built

DEVICE = "cpu" if TRITON_INTERPRETED else "cuda"
SEED = 0x5EED
# 8-bit codes are written with stochastic rounding: every call has a seed
HYPER = dict(lr=1e-2, beta2=0.999, beta3=0.9999, alpha=5.0, beta3_warmup=None, alpha_warmup=None,
             eps=1e-8, weight_decay=0.1, maximize=False, sr_seed=SEED)
# 8-bit tensors: whole blocks, a partial last block, three blocks and a bit; then float states
SIZES = ((4096,), (5000,), (256 * 3 + 17,), (1000,))
QUANTIZED = (True, True, True, False)
N_STEPS = 5
# The interpreter (numpy) warns on 0 / 0: an all-zero block's (and a masked tail's) values over
# their absmax 0, which the format defines (NaN -> code 0).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(scope="module")
def tk():
    reason = environment_skip_reason("triton", DEVICE)
    if reason is not None:
        pytest.skip(reason)
    from ademamix_cuda.triton_kernels import ademamix
    return ademamix


# ---------------------------------------------------------------------------------------------
# data


class States:
    """One call's tensors: params, grads source, states (8-bit codes + absmax, or float)."""

    def __init__(self, dtype, has_m1, state_dtype, seed, sizes=SIZES, quantized=QUANTIZED):
        gen = torch.Generator().manual_seed(seed)
        self.gen = gen
        self.sizes, self.quantized, self.has_m1 = sizes, quantized, has_m1
        self.params = [(1.0 + torch.rand(s, generator=gen)).mul_(_signs(s, gen)).to(dtype)
                       for s in sizes]
        self.m1s, self.m2s, self.nus, self.a1s, self.a2s, self.anus = [], [], [], [], [], []
        for s, q in zip(sizes, quantized):
            m1 = torch.randn(s, generator=gen) * 0.1
            m2 = torch.randn(s, generator=gen) * 0.1
            nu = torch.rand(s, generator=gen) * 0.01 + 1e-4
            if q:
                for x, signed, states, absmaxs in ((m1, True, self.m1s, self.a1s),
                                                   (m2, True, self.m2s, self.a2s),
                                                   (nu, False, self.nus, self.anus)):
                    bits = torch.randint(0, 1 << 16, s, generator=gen, dtype=torch.int64)
                    codes, absmax = quant.quantize_blockwise(x, signed, bits)
                    states.append(codes)
                    absmaxs.append(absmax)
            else:
                self.m1s.append(m1.to(state_dtype))
                self.m2s.append(m2.to(state_dtype))
                self.nus.append(nu.to(state_dtype))
                for absmaxs in (self.a1s, self.a2s, self.anus):
                    absmaxs.append(torch.empty(0))
        if not has_m1:
            self.m1s, self.a1s = [], []
        self.steps = [torch.zeros(1) for _ in sizes]

    def grads(self, k):
        gen = torch.Generator().manual_seed(1000 + k)
        return [(torch.randn(s, generator=gen) * 0.5).to(self.params[0].dtype)
                for s in self.sizes]

    def to(self, device):
        for name in ("params", "m1s", "m2s", "nus", "a1s", "a2s", "anus", "steps"):
            setattr(self, name, [x.to(device) for x in getattr(self, name)])
        return self

    def tensors(self):
        return [x for name in ("params", "m1s", "m2s", "nus", "a1s", "a2s", "anus", "steps")
                for x in getattr(self, name)]

    def clone(self):
        out = object.__new__(States)
        out.__dict__.update(self.__dict__)
        for name in ("params", "m1s", "m2s", "nus", "a1s", "a2s", "anus", "steps"):
            setattr(out, name, [x.clone() for x in getattr(self, name)])
        return out

    def absmax_kwargs(self):
        return dict(exp_avg_fast_absmaxs=self.a1s, exp_avg_slow_absmaxs=self.a2s,
                    exp_avg_sq_absmaxs=self.anus)


def _signs(shape, gen):
    return torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)


def bytes_of(x):
    x = x.detach().cpu().contiguous()
    return x.reshape(-1).view(torch.uint8) if x.numel() else x.reshape(-1)


def assert_bytes_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs " \
                                                      f"{b.dtype}{list(b.shape)}"
    ea, eb = bytes_of(a), bytes_of(b)
    if not torch.equal(ea, eb):
        diff = (a.detach().cpu().view(-1) != b.detach().cpu().view(-1))
        if a.is_floating_point():
            diff &= ~(a.detach().cpu().view(-1).isnan() & b.detach().cpu().view(-1).isnan())
        idx = diff.nonzero().flatten()
        raise AssertionError(f"{what}: {idx.numel()} of {a.numel()} elements differ, first at "
                             f"{idx[:5].tolist()}: {a.view(-1)[idx[:5]].tolist()} vs "
                             f"{b.view(-1)[idx[:5]].tolist()}")


# ---------------------------------------------------------------------------------------------
# the reference: the kernel's fp32 operations in its order, in torch


def _f32(v):
    return torch.tensor(v, dtype=torch.float32)


def _expm1_f32(x, tk):
    """csrc/ademamix.h expm1_f32 (triton _expm1) on a 0-dim fp32 tensor."""
    x = torch.maximum(x, _f32(-30.0))
    k = torch.floor(x * _f32(tk._LOG2E.value) + _f32(0.5))
    r = (x - k * _f32(tk._LN2_HI.value)) - k * _f32(tk._LN2_LO.value)
    q = _f32(tk._INV_FACT8.value) + r * _f32(tk._INV_FACT9.value)
    for c in (tk._INV_FACT7, tk._INV_FACT6, tk._INV_FACT5, tk._INV_FACT4, tk._INV_FACT3):
        q = _f32(c.value) + r * q
    q = _f32(0.5) + r * q
    em1 = r + (r * r) * q
    scale = ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    return scale * em1 + (scale - _f32(1.0))


def _sqrt(x):
    # Correctly rounded: in double, then rounded once to fp32 (double rounding is harmless for
    # sqrt and division from 53 to 24 bits). torch's fp32 CPU sqrt is not always correctly
    # rounded (one ulp off on this machine's vectorized path), the kernels' sqrt_rn is.
    return torch.sqrt(x.double()).float()


def _div(x, y):
    return (x.double() / y.double()).float()


def _step_scalars(t, beta1, tk):
    """The kernel's _schedules without warmups (fp32)."""
    t = _f32(t)
    one = _f32(1.0)
    inv_bc1 = one
    if beta1 != 0.0:
        inv_bc1 = _div(one, -_expm1_f32(t * _f32(math.log(beta1)), tk))
    inv_sqrt_bc2 = _div(one, _sqrt(-_expm1_f32(t * _f32(math.log(HYPER["beta2"])), tk)))
    return inv_bc1, inv_sqrt_bc2


def _to_param_dtype(p, dtype):
    """The kernel's store of fp32 p to a param of `dtype`: round to nearest even compiled; the
    interpreter's fp32 -> bf16 conversion truncates (drops the low 16 bits)."""
    if dtype == torch.bfloat16 and TRITON_INTERPRETED:
        return (p.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    return p.to(dtype)


def reference_step(st, grads, beta1, tk, sr_seed=SEED, param_sr=False):
    """One step of `st` in place (CPU tensors), as the kernel computes it."""
    t = int(st.steps[0].item()) + 1
    inv_bc1, inv_sqrt_bc2 = _step_scalars(t, beta1, tk)
    b1, omb1 = _f32(beta1), _f32(1.0 - beta1)
    b2, omb2 = _f32(HYPER["beta2"]), _f32(1.0 - HYPER["beta2"])
    b3, omb3 = _f32(HYPER["beta3"]), _f32(1.0 - HYPER["beta3"])
    alpha_t, eps = _f32(HYPER["alpha"]), _f32(HYPER["eps"])
    wd, lr = _f32(HYPER["weight_decay"]), _f32(HYPER["lr"])
    has_m1 = beta1 != 0.0
    for i, (q, g) in enumerate(zip(st.quantized, grads)):
        p = st.params[i].float()
        g = g.float()
        shape = p.shape
        if q:
            def load(codes, absmax, signed):
                return quant.dequantize_blockwise(codes, absmax, signed)
            m1 = load(st.m1s[i], st.a1s[i], True) if has_m1 else None
            m2 = load(st.m2s[i], st.a2s[i], True)
            nu = load(st.nus[i], st.anus[i], False)
        else:
            m1 = st.m1s[i].float() if has_m1 else None
            m2, nu = st.m2s[i].float(), st.nus[i].float()
        if has_m1:
            m1 = b1 * m1 + omb1 * g
        else:
            m1 = g
        m2 = b3 * m2 + omb3 * g
        nu = b2 * nu + (omb2 * g) * g
        denom = _sqrt(nu) * inv_sqrt_bc2 + eps
        update = _div(m1 * inv_bc1 + alpha_t * m2, denom) + wd * p
        p = p - lr * update
        if param_sr:
            st.params[i] = rounding.sr_to_bf16(p, sr_seed, i, t, "param")
        else:
            st.params[i] = _to_param_dtype(p, st.params[i].dtype)
        for name, absname, x, signed, which in (("m1s", "a1s", m1, True, "exp_avg_fast"),
                                                ("m2s", "a2s", m2, True, "exp_avg_slow"),
                                                ("nus", "anus", nu, False, "exp_avg_sq")):
            if name == "m1s" and not has_m1:
                continue
            states = getattr(st, name)
            if q:
                words = rounding.random_words(sr_seed, i, t, x.numel())
                codes, absmax = quant.quantize_blockwise(
                    x.view(shape), signed, rounding.bits_of(words, which, x.view(shape)))
                states[i], getattr(st, absname)[i] = codes, absmax
            elif states[i].dtype == torch.bfloat16:
                states[i] = rounding.sr_to_bf16(x, sr_seed, i, t, which)
            else:
                states[i] = x
    for s in st.steps:
        s.add_(1.0)


def triton_step(tk, st, grads, beta1, **kw):
    tk.ademamix_step_(st.params, grads, st.m1s, st.m2s, st.nus, st.steps, beta1=beta1, **HYPER,
                      **st.absmax_kwargs(), **kw)


# ---------------------------------------------------------------------------------------------
# exactness

CASES = [
    pytest.param(torch.float32, 0.9, torch.float32, False, id="fp32-m1"),
    pytest.param(torch.float32, 0.0, torch.float32, False, id="fp32-beta1_zero"),
    pytest.param(torch.bfloat16, 0.9, torch.bfloat16, False, id="bf16-m1-bf16states"),
    pytest.param(torch.bfloat16, 0.0, torch.float32, True, id="bf16-beta1_zero-param_sr"),
]


@pytest.mark.parametrize("dtype,beta1,state_dtype,param_sr", CASES)
def test_matches_reference_bytes(tk, dtype, beta1, state_dtype, param_sr):
    """N free-running steps: every byte of params, codes, absmax and float states equals the
    torch reference's."""
    st = States(dtype, beta1 != 0.0, state_dtype, seed=7)
    ref = st.clone()
    st.to(DEVICE)
    kw = dict(param_sr=param_sr)
    for k in range(N_STEPS):
        grads = st.grads(k)
        triton_step(tk, st, [g.to(DEVICE) for g in grads], beta1, **kw)
        reference_step(ref, grads, beta1, tk, **kw)
        for name in ("params", "m1s", "m2s", "nus", "a1s", "a2s", "anus", "steps"):
            for i, (a, b) in enumerate(zip(getattr(st, name), getattr(ref, name))):
                assert_bytes_equal(a.cpu(), b, f"step {k + 1} {name}[{i}]")
    # the states are really 8-bit and moving: absmax changed, codes use the range
    assert st.m2s[0].dtype == torch.uint8 and int(st.m2s[0].max()) > 128


def test_multi_chunk_and_misaligned_codes(tk):
    """A tensor of several chunks (absmax offsets of later chunks' rows), and 8-bit states that
    are views at an odd offset (the unaligned launch), against the reference."""
    n_big = 2 * tk.CHUNK_SIZE + 300
    st = States(torch.float32, True, torch.float32, seed=31, sizes=((n_big,), (700,)),
                quantized=(True, True))
    for name in ("m1s", "m2s", "nus"):  # tensor 1's codes at an odd address
        xs = getattr(st, name)
        buf = torch.zeros(xs[1].numel() + 1, dtype=torch.uint8)
        buf[1:] = xs[1]
        xs[1] = buf[1:]
    ref = st.clone()
    st.to(DEVICE)
    for k in range(2):
        grads = st.grads(k)
        triton_step(tk, st, [g.to(DEVICE) for g in grads], 0.9)
        reference_step(ref, grads, 0.9, tk)
        for name in ("params", "m1s", "m2s", "nus", "a1s", "a2s", "anus"):
            for i, (a, b) in enumerate(zip(getattr(st, name), getattr(ref, name))):
                assert_bytes_equal(a.cpu(), b, f"step {k + 1} {name}[{i}]")
    assert st.m2s[1].data_ptr() % 2 == 1  # still the views


def test_nan_block_and_zero_block(tk):
    """A NaN grad makes its block's absmax NaN (codes 0), an all-zero block keeps absmax 0,
    and both match the reference; the other blocks are untouched by them."""
    st = States(torch.float32, True, torch.float32, seed=11, sizes=((1024,),),
                quantized=(True,))
    for xs in (st.m1s, st.m2s, st.nus):
        xs[0][256:512] = 0  # block 1: zero states
    for xs in (st.a1s, st.a2s, st.anus):
        xs[0][1] = 0.0
    ref = st.clone()
    st.to(DEVICE)
    grads = st.grads(0)
    grads[0][3] = float("nan")  # block 0
    grads[0][256:512] = 0.0     # block 1 stays zero
    triton_step(tk, st, [g.to(DEVICE) for g in grads], 0.9)
    reference_step(ref, grads, 0.9, tk)
    for name in ("m1s", "m2s", "nus", "a1s", "a2s", "anus"):
        assert_bytes_equal(getattr(st, name)[0].cpu(), getattr(ref, name)[0], name)
    assert st.a2s[0][0].isnan() and int(st.m2s[0][:256].max()) == 0
    assert float(st.a2s[0][1]) == 0.0 and float(st.a2s[0][2]) > 0.0


def test_stepper_and_compiled_op(tk):
    """Stepper with absmax lists, and the custom op (as torch.compile calls it), give the same
    bytes as ademamix_step_."""
    st = States(torch.float32, True, torch.float32, seed=13)
    a, b, c = st.clone().to(DEVICE), st.clone().to(DEVICE), st.clone().to(DEVICE)
    stepper = tk.Stepper(b.params, b.m1s, b.m2s, b.nus, b.steps, b.a1s, b.a2s, b.anus)
    for k in range(2):
        grads = [g.to(DEVICE) for g in st.grads(k)]
        triton_step(tk, a, grads, 0.9)
        stepper.step(grads, beta1=0.9, **HYPER)
        args = tk._op_args(c.params, grads, c.m1s, c.m2s, c.nus, c.steps, HYPER["lr"], 0.9,
                           HYPER["beta2"], HYPER["beta3"], HYPER["alpha"], None, None,
                           HYPER["eps"], HYPER["weight_decay"], False, None, None, SEED, False,
                           c.a1s, c.a2s, c.anus)
        torch.ops.ademamix_triton.step_(*args)
    for x, y, z in zip(a.tensors(), b.tensors(), c.tensors()):
        assert_bytes_equal(y, x, "Stepper")
        assert_bytes_equal(z, x, "op")


def test_opcheck_with_8bit_states(tk):
    """The op's schema (the mutated absmax lists), fake and autograd registrations."""
    st = States(torch.float32, True, torch.float32, seed=37, sizes=((300,), (5,)),
                quantized=(True, False)).to(DEVICE)
    grads = [g.to(DEVICE) for g in st.grads(0)]
    args = tk._op_args(st.params, grads, st.m1s, st.m2s, st.nus, st.steps, HYPER["lr"], 0.9,
                       HYPER["beta2"], HYPER["beta3"], HYPER["alpha"], None, None, HYPER["eps"],
                       HYPER["weight_decay"], False, None, None, SEED, False, st.a1s, st.a2s,
                       st.anus)
    torch.library.opcheck(torch.ops.ademamix_triton.step_.default, args)


def test_no_8bit_tensor_uses_the_plain_kernel(tk):
    """Absmax lists with only empty entries (no uint8 state): the plain table, same bytes as a
    call without the lists."""
    st = States(torch.float32, True, torch.float32, seed=17, sizes=((300,), (40,)),
                quantized=(False, False)).to(DEVICE)
    other = st.clone()
    grads = [g.to(DEVICE) for g in st.grads(0)]
    triton_step(tk, st, grads, 0.9)
    tk.ademamix_step_(other.params, grads, other.m1s, other.m2s, other.nus, other.steps, beta1=0.9,
                      **HYPER)
    for x, y in zip(st.tensors(), other.tensors()):
        assert_bytes_equal(x, y, "with empty absmax lists")


# ---------------------------------------------------------------------------------------------
# bad input


def _call(tk, st, beta1=0.9, **overrides):
    kw = dict(st.absmax_kwargs())
    kw.update(overrides)
    grads = [torch.ones_like(p) for p in st.params]
    tk.ademamix_step_(st.params, grads, st.m1s, st.m2s, st.nus, st.steps, beta1=beta1,
                      **HYPER, **kw)


def _bad_cases():
    def codes_dtype(st):  # m1 codes of a quantized param as float32
        st.m1s[1] = st.m1s[1].float()
        return r"exp_avg_fasts\[1\].*uint8"

    def nu_dtype(st):
        st.nus[0] = st.nus[0].to(torch.int8)
        return r"exp_avg_sqs\[0\].*uint8"

    def absmax_shape(st):
        st.a2s[1] = st.a2s[1][:-1].clone()
        return r"exp_avg_slow_absmaxs\[1\].*shape \[20\]"

    def absmax_dtype(st):
        st.anus[2] = st.anus[2].double()
        return r"exp_avg_sq_absmaxs\[2\].*float32"

    def absmax_nonempty(st):
        st.a1s[3] = torch.ones(4, device=st.a1s[3].device)
        return r"exp_avg_fast_absmaxs\[3\].*4 elements.*empty"

    def absmax_missing(st):
        st.a1s, st.a2s, st.anus = [], [], []
        return r"exp_avg_slows\[0\] is uint8.*absmax"

    def absmax_list_short(st):
        st.anus = st.anus[:2]
        return r"2 exp_avg_sq_absmaxs for 4 params"

    def absmax_noncontiguous(st):
        st.a2s[0] = torch.zeros(32, device=st.a2s[0].device)[::2]
        return r"exp_avg_slow_absmaxs\[0\] must be contiguous"

    def absmax_shared(st):
        st.anus[0] = st.a2s[0]
        return r"exp_avg_slow_absmaxs\[0\] and exp_avg_sq_absmaxs\[0\] share memory"

    def float_state_dtype(st):
        st.m2s[3] = st.m2s[3].double()
        return r"float32 or bfloat16.*exp_avg_slows\[3\]"

    def mixed_float_states(st):  # one float state dtype per call
        st.m2s[3] = st.m2s[3].bfloat16()
        return r"exp_avg_(fasts|sqs)\[3\] must be torch.bfloat16"

    return [pytest.param(f, id=f.__name__) for f in (
        codes_dtype, nu_dtype, absmax_shape, absmax_dtype, absmax_nonempty, absmax_missing,
        absmax_list_short, absmax_noncontiguous, absmax_shared, float_state_dtype,
        mixed_float_states)]


@pytest.mark.parametrize("breakage", _bad_cases())
def test_bad_input_names_list_and_index(tk, breakage):
    st = States(torch.float32, True, torch.float32, seed=19).to(DEVICE)
    match = breakage(st)
    before = [x.clone() for x in st.tensors()]
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        _call(tk, st)
    for x, y in zip(before, st.tensors()):  # nothing written
        assert_bytes_equal(y, x, "after the refused call")


def test_bad_input_fast_absmax_without_m1(tk):
    st = States(torch.float32, False, torch.float32, seed=23).to(DEVICE)
    with pytest.raises(ValueError, match=r"1 exp_avg_fast_absmaxs for 4 params without m1"):
        _call(tk, st, beta1=0.0, exp_avg_fast_absmaxs=[torch.empty(0)])


# ---------------------------------------------------------------------------------------------
# against the op's CPU kernel


def _cpu_op_with_8bit():
    if not extension_built():
        pytest.skip("the extension ademamix_cuda._C is not built")
    import ademamix_cuda.backends  # noqa: F401
    try:
        op = torch.ops.ademamix.step_.default
    except (AttributeError, RuntimeError):
        pytest.skip("the extension's op ademamix::step_ is not loaded")
    names = {a.name for a in op._schema.arguments}
    if not {"exp_avg_fast_absmaxs", "exp_avg_slow_absmaxs", "exp_avg_sq_absmaxs"} <= names:
        pytest.skip("op without 8-bit states")
    return op


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="compares with the op's CPU kernel: runs "
                    "interpreted (CPU tensors)")
@pytest.mark.parametrize("dtype,beta1,state_dtype,param_sr,scaled", [
    pytest.param(torch.float32, 0.9, torch.float32, False, False, id="fp32-m1"),
    pytest.param(torch.float32, 0.0, torch.bfloat16, False, False,
                 id="fp32-beta1_zero-bf16states"),
    pytest.param(torch.bfloat16, 0.9, torch.float32, True, False, id="bf16-m1-param_sr"),
    pytest.param(torch.float32, 0.9, torch.float32, False, True,
                 id="fp32-m1-grad_scale-maximize"),
])
def test_matches_cpu_op_bytes(tk, dtype, beta1, state_dtype, param_sr, scaled):
    op = _cpu_op_with_8bit()
    st = States(dtype, beta1 != 0.0, state_dtype, seed=29)
    other = st.clone()
    kw = dict(param_sr=param_sr)
    hyper = dict(HYPER)
    if scaled:  # grads divided by a scale, maximize; the last step skipped by found_inf
        kw["grad_scale"] = torch.tensor(3.0)
        hyper["maximize"] = True
    for k in range(3):
        grads = st.grads(k)
        if scaled:
            kw["found_inf"] = torch.tensor(float(k == 2))
        tk.ademamix_step_(st.params, grads, st.m1s, st.m2s, st.nus, st.steps, beta1=beta1,
                          **hyper, **st.absmax_kwargs(), **kw)
        op(other.params, grads, other.m1s, other.m2s, other.nus, other.steps, beta1=beta1,
           **hyper, **other.absmax_kwargs(), **kw)
        for x, y in zip(st.tensors(), other.tensors()):
            assert_bytes_equal(x, y, f"step {k + 1}: triton vs the op's CPU kernel")
