"""Loading bitsandbytes AdEMAMix / AdEMAMix8bit state_dicts (ademamix_cuda.bnb_compat).

bitsandbytes is not needed: the bnb-layout state_dicts are built by hand here (random codes and
scales, the dynamic map built from its documented definition), and every converted value is
checked exactly against a dequantization written independently below (a loop over blocks).
"""
import copy
import math

import pytest
import torch

import ademamix_cuda
from ademamix_cuda.bnb_compat import QUANT_STATE_KEY, from_bitsandbytes, is_bitsandbytes_state_dict

B = 256  # bnb's block size for 8-bit optimizer states


def dynamic_map(signed):
    """bnb's dynamic 8-bit map, from its definition: for exponent i = 0..6 the midpoints of
    2**i (signed) or 2**(i+1) (unsigned) equal steps of [0.1, 1], scaled by 10**(i-6), the
    negatives too when signed, plus 0 and 1; 256 values in ascending order."""
    values = [0.0, 1.0]
    for i in range(7):
        k = 2 ** i if signed else 2 ** (i + 1)
        edges = [0.1 + 0.9 * j / k for j in range(k + 1)]
        mids = [(edges[j] + edges[j + 1]) / 2 * 10.0 ** (i - 6) for j in range(k)]
        values += mids
        if signed:
            values += [-m for m in mids]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


QMAP_SIGNED, QMAP_UNSIGNED = dynamic_map(True), dynamic_map(False)


def n_blocks(n, b=B):
    return (n + b - 1) // b


def state_8bit(shape, gen, step, blocksize=B):
    n = math.prod(shape)
    nb = n_blocks(n, blocksize)
    return {
        "step": step,
        "state1": torch.randint(0, 256, (2, *shape), dtype=torch.uint8, generator=gen),
        "state2": torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen),
        "qmap1": QMAP_SIGNED.clone(),
        "qmap2": QMAP_UNSIGNED.clone(),
        "absmax1": torch.rand((2, nb), generator=gen) + 0.05,
        "absmax2": torch.rand((nb,), generator=gen) * 1e-3 + 1e-5,
    }


def state_32bit(shape, gen, step):
    return {"step": step,
            "state1": torch.randn((2, *shape), generator=gen) * 1e-2,
            "state2": torch.rand(shape, generator=gen) * 1e-4 + 1e-8}


SHAPES = {0: (64, 80),   # 8-bit, 5120 elements (a multiple of 256)
          1: (4097,),    # 8-bit, not a multiple of 256
          2: (10,),      # under min_8bit_size: fp32 states
          3: (33, 130)}  # 8-bit, in the beta1 == 0 group
STEPS = {0: 37, 1: 37, 2: 37, 3: 11}


def bnb_state_dict(wrapped=True, seed=0):
    """What bnb.optim.AdEMAMix8bit(...).state_dict() holds for SHAPES (two param groups)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for pid, shape in SHAPES.items():
        raw = (state_32bit if pid == 2 else state_8bit)(shape, gen, STEPS[pid])
        if wrapped:  # recent bnb: everything but "step" nested for FSDP
            raw = {"step": raw.pop("step"), QUANT_STATE_KEY: raw}
        state[pid] = raw
    common = dict(eps=1e-8, weight_decay=1e-2, alpha=5.0)
    groups = [dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), t_alpha=100, t_beta3=200,
                   params=[0, 1, 2], **common),
              dict(lr=2e-3, betas=(0.0, 0.99, 0.995), t_alpha=None, t_beta3=None, params=[3],
                   initial_lr=2e-3, **common)]
    return {"state": state, "param_groups": groups}


def flat(raw):
    out = {k: v for k, v in raw.items() if k != QUANT_STATE_KEY}
    out.update(raw.get(QUANT_STATE_KEY, {}))
    return out


def reference_dequantize(raw, blocksize=B):
    """(m1, m2, nu) as bnb's kernel reads them, one block at a time: m1/nu block k scale
    absmax1[0]/absmax2 entry k; m2 block k the flat absmax1 slot (n + k*blocksize) // blocksize."""
    s = flat(raw)
    shape = s["state2"].shape
    n = s["state2"].numel()
    c1 = s["state1"].reshape(2, n)
    c2 = s["state2"].reshape(n)
    a1 = s["absmax1"].reshape(-1)
    m1, m2, nu = torch.empty(n), torch.empty(n), torch.empty(n)
    for k in range(n_blocks(n, blocksize)):
        lo, hi = k * blocksize, min((k + 1) * blocksize, n)
        m1[lo:hi] = s["qmap1"][c1[0, lo:hi].long()] * a1[k]
        m2[lo:hi] = s["qmap1"][c1[1, lo:hi].long()] * a1[(n + lo) // blocksize]
        nu[lo:hi] = s["qmap2"][c2[lo:hi].long()] * s["absmax2"][k]
    return m1.reshape(shape), m2.reshape(shape), nu.reshape(shape)


def expected_states(sd):
    out = {}
    beta1 = {pid: g["betas"][0] for g in sd["param_groups"] for pid in g["params"]}
    for pid, raw in sd["state"].items():
        s = flat(raw)
        if s["state1"].dtype == torch.uint8:
            m1, m2, nu = reference_dequantize(raw)
        else:
            m1, m2, nu = s["state1"][0], s["state1"][1], s["state2"]
        out[pid] = (None if beta1[pid] == 0.0 else m1, m2, nu)
    return out


def assert_states_equal(converted, expected):
    assert set(converted) == set(expected)
    for pid, (m1, m2, nu) in expected.items():
        got = converted[pid]
        assert set(got) == {"step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"}
        for key, want in (("exp_avg_fast", m1), ("exp_avg_slow", m2), ("exp_avg_sq", nu)):
            if want is None:
                assert got[key] is None, f"param {pid}: {key} should be None (beta1 == 0)"
                continue
            assert got[key].dtype == torch.float32 and got[key].shape == want.shape, (pid, key)
            assert torch.equal(got[key], want), f"param {pid}: {key} differs"


# ---------------------------------------------------------------- conversion values

@pytest.mark.parametrize("wrapped", [True, False], ids=["nested", "flat"])
def test_values_match_independent_dequantization(wrapped):
    sd = bnb_state_dict(wrapped=wrapped)
    before = copy.deepcopy(sd)
    out = from_bitsandbytes(sd)
    assert_states_equal(out["state"], expected_states(sd))
    for pid, s in out["state"].items():
        assert s["step"].dtype == torch.float32 and s["step"].shape == ()
        assert s["step"].item() == STEPS[pid]
    # the input is left as it was, and the output does not alias it
    for pid in sd["state"]:
        for k, v in flat(sd["state"][pid]).items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, flat(before["state"][pid])[k])
    out["state"][2]["exp_avg_slow"].add_(1.0)
    assert torch.equal(flat(sd["state"][2])["state1"][1], flat(before["state"][2])["state1"][1])


def test_nested_and_flat_layouts_agree():
    a = from_bitsandbytes(bnb_state_dict(wrapped=True, seed=3))
    b = from_bitsandbytes(bnb_state_dict(wrapped=False, seed=3))
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert (v is None and b["state"][pid][k] is None) or torch.equal(v, b["state"][pid][k])


def test_block_layout_when_numel_is_a_multiple_of_256():
    # m2 block k is scaled by absmax1[1][k], m1 block k by absmax1[0][k]: check single elements
    gen = torch.Generator().manual_seed(5)
    raw = state_8bit((3, 512), gen, step=4)  # 1536 elements = 6 blocks
    sd = {"state": {0: raw}, "param_groups": [dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0,
                                                    eps=1e-8, weight_decay=0.0, params=[0])]}
    s = from_bitsandbytes(sd)["state"][0]
    for j in (0, 255, 256, 700, 1535):
        k, (r, c) = j // B, divmod(j, 512)
        assert s["exp_avg_fast"][r, c] == QMAP_SIGNED[raw["state1"][0, r, c].long()] * raw["absmax1"][0, k]
        assert s["exp_avg_slow"][r, c] == QMAP_SIGNED[raw["state1"][1, r, c].long()] * raw["absmax1"][1, k]
        assert s["exp_avg_sq"][r, c] == QMAP_UNSIGNED[raw["state2"][r, c].long()] * raw["absmax2"][k]


def test_legacy_blocks_of_2048_are_inferred():
    gen = torch.Generator().manual_seed(6)
    raw = state_8bit((5000,), gen, step=9, blocksize=2048)
    sd = {"state": {0: raw}, "param_groups": [dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0,
                                                    eps=1e-8, weight_decay=0.0, params=[0])]}
    s = from_bitsandbytes(sd)["state"][0]
    m1, m2, nu = reference_dequantize(raw, blocksize=2048)
    assert torch.equal(s["exp_avg_fast"], m1) and torch.equal(s["exp_avg_slow"], m2)
    assert torch.equal(s["exp_avg_sq"], nu)
    with pytest.raises(ValueError, match="do not fit"):
        from_bitsandbytes(sd, blocksize=256)  # an explicit block size is enforced


def test_param_groups_are_mapped():
    out = from_bitsandbytes(dict(bnb_state_dict(), param_groups=[
        dict(g, optim_bits=8, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
             max_unorm=0.0, skip_zeros=False, is_paged=False)
        for g in bnb_state_dict()["param_groups"]]))
    g0, g1 = out["param_groups"]
    assert g0["params"] == [0, 1, 2] and g1["params"] == [3]
    assert g0["alpha_warmup"] == 100 and g0["beta3_warmup"] == 200
    assert g1["alpha_warmup"] is None and g1["beta3_warmup"] is None
    assert g0["betas"] == (0.9, 0.999, 0.9999) and g1["betas"] == (0.0, 0.99, 0.995)
    assert (g0["lr"], g1["lr"], g0["alpha"], g0["eps"], g0["weight_decay"]) == (1e-3, 2e-3, 5.0, 1e-8, 1e-2)
    assert g1["initial_lr"] == 2e-3  # a key that is not bnb's is kept
    for g in (g0, g1):
        for key in ("t_alpha", "t_beta3", "optim_bits", "min_8bit_size", "percentile_clipping",
                    "block_wise", "max_unorm", "skip_zeros", "is_paged"):
            assert key not in g


def test_detection():
    assert is_bitsandbytes_state_dict(bnb_state_dict(wrapped=True))
    assert is_bitsandbytes_state_dict(bnb_state_dict(wrapped=False))
    fresh = {"state": {}, "param_groups": bnb_state_dict()["param_groups"]}
    assert is_bitsandbytes_state_dict(fresh)  # no step taken yet: told by the group keys
    p = torch.nn.Parameter(torch.randn(4))
    ours = ademamix_cuda.AdEMAMix([p], backend="foreach")
    assert not is_bitsandbytes_state_dict(ours.state_dict())
    p.grad = torch.randn(4)
    ours.step()
    assert not is_bitsandbytes_state_dict(ours.state_dict())
    assert not is_bitsandbytes_state_dict(from_bitsandbytes(bnb_state_dict()))
    for other in (None, [], {"state": {}}, {"param_groups": []}, "x"):
        assert not is_bitsandbytes_state_dict(other)


# ---------------------------------------------------------------- loading into AdEMAMix

def make_params(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {pid: torch.nn.Parameter(torch.randn(shape, generator=gen)) for pid, shape in SHAPES.items()}


@pytest.mark.parametrize("wrapped", [True, False], ids=["nested", "flat"])
def test_loads_into_ademamix_and_steps(wrapped):
    sd = bnb_state_dict(wrapped=wrapped)
    converted = from_bitsandbytes(sd)
    params = make_params()
    opt = ademamix_cuda.AdEMAMix([{"params": [params[0], params[1], params[2]]},
                                  {"params": [params[3]], "betas": (0.0, 0.99, 0.995)}],
                                 backend="foreach")
    opt.load_state_dict(converted)
    expected = expected_states(sd)
    g0, g1 = opt.param_groups
    assert (g0["alpha_warmup"], g0["beta3_warmup"], g0["lr"]) == (100, 200, 1e-3)
    assert (g1["alpha_warmup"], g1["beta3_warmup"], g1["lr"]) == (None, None, 2e-3)
    for pid, p in params.items():
        st = opt.state[p]
        assert st["step"].item() == STEPS[pid]
        m1, m2, nu = expected[pid]
        assert (st["exp_avg_fast"] is None) if m1 is None else torch.equal(st["exp_avg_fast"], m1)
        assert torch.equal(st["exp_avg_slow"], m2) and torch.equal(st["exp_avg_sq"], nu)

    before = {pid: p.detach().clone() for pid, p in params.items()}
    gen = torch.Generator().manual_seed(2)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt.step()
    for pid, p in params.items():
        st = opt.state[p]
        assert st["step"].item() == STEPS[pid] + 1
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), before[pid])
        for key in ("exp_avg_slow", "exp_avg_sq"):
            assert torch.isfinite(st[key]).all()
    # the step used the loaded moments: check param 2 (fp32 states) against the update rule
    p, g, m1, m2, nu = (before[2], params[2].grad, *expected[2])
    t, (b1, b2, b3), lr, wd, eps = STEPS[2] + 1, (0.9, 0.999, 0.9999), 1e-3, 1e-2, 1e-8
    alpha_t = 5.0 * t / 100
    b3_t = ademamix_cuda.schedules.beta3_at(t, b1, b3, 200)
    m1n = b1 * m1.double() + (1 - b1) * g.double()
    m2n = b3_t * m2.double() + (1 - b3_t) * g.double()
    nun = b2 * nu.double() + (1 - b2) * g.double() ** 2
    upd = (m1n / (1 - b1 ** t) + alpha_t * m2n) / ((nun / (1 - b2 ** t)).sqrt() + eps)
    want = p.double() - lr * (upd + wd * p.double())
    torch.testing.assert_close(params[2].detach().double(), want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad input

def one_param_sd(raw, **group):
    g = dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8, weight_decay=0.0,
             t_alpha=None, t_beta3=None, params=[0])
    g.update(group)
    return {"state": {0: raw}, "param_groups": [g]}


def good_8bit():
    return state_8bit((4096 + 300,), torch.Generator().manual_seed(8), step=3)


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


BAD_CASES = {
    "absmax2 too short": (lambda r: dict(r, absmax2=r["absmax2"][:-1]), {}, "do not fit"),
    "absmax1 one row": (lambda r: dict(r, absmax1=r["absmax1"][0]), {}, "do not fit"),
    "absmax1 of blocks of 512": (lambda r: dict(r, absmax1=torch.rand(2, 9) + 0.1,
                                                absmax2=torch.rand(9) + 0.1), {}, "do not fit"),
    "codes int8": (lambda r: dict(r, state1=r["state1"].to(torch.int8)), {}, "must be uint8"),
    "codes float": (lambda r: dict(r, state2=r["state2"].float()), {}, "must be uint8"),
    "missing qmap1": (lambda r: without(r, "qmap1"), {}, r"lacks \['qmap1'\]"),
    "missing qmap2": (lambda r: without(r, "qmap2"), {}, r"lacks \['qmap2'\]"),
    "missing absmax1": (lambda r: without(r, "absmax1"), {}, r"lacks \['absmax1'\]"),
    "short qmap": (lambda r: dict(r, qmap1=r["qmap1"][:128]), {}, "256 values"),
    "unknown optim_bits": (lambda r: r, {"optim_bits": 4}, "unknown optim_bits"),
    "state1 without leading 2": (lambda r: dict(r, state1=r["state1"][0]), {}, r"leading 2|\[2, \*param"),
    "state1 leading 3": (lambda r: dict(r, state1=torch.cat([r["state1"], r["state1"][:1]])), {},
                         r"\[2, \*param"),
    "missing step": (lambda r: without(r, "step"), {}, "lacks 'step'"),
    "missing state2": (lambda r: without(r, "state2"), {}, r"lacks \['state2'\]"),
    "non-blockwise": (lambda r: dict(r, max1=torch.ones(1)), {}, "non-blockwise"),
    "two betas": (lambda r: r, {"betas": (0.9, 0.999)}, "betas must be"),
    "block_wise False": (lambda r: r, {"block_wise": False}, "block_wise=False"),
    "negative step": (lambda r: dict(r, step=-1), {}, "non-negative"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises(case):
    edit, group, message = BAD_CASES[case]
    sd = one_param_sd(edit(good_8bit()), **group)
    with pytest.raises(ValueError, match=message):
        from_bitsandbytes(sd)


def test_bad_32bit_state_raises():
    gen = torch.Generator().manual_seed(9)
    raw = state_32bit((7, 3), gen, step=2)
    with pytest.raises(ValueError, match=r"\[2, \*param"):  # AdEMAMix32bit-like: no m2 stored
        from_bitsandbytes(one_param_sd(dict(raw, state1=raw["state1"][0])))
    with pytest.raises(ValueError, match="float tensor"):
        from_bitsandbytes(one_param_sd(dict(raw, state1=raw["state1"].to(torch.int32))))


def test_bad_structure_raises():
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        from_bitsandbytes({"state": {}})
    with pytest.raises(ValueError, match="in no param group"):
        from_bitsandbytes(one_param_sd(good_8bit(), params=[1]))
    with pytest.raises(ValueError, match="lacks"):
        from_bitsandbytes({"state": {}, "param_groups": [{"params": [0], "lr": 1e-3}]})
    with pytest.raises(ValueError, match="already has ademamix_cuda keys"):
        from_bitsandbytes(from_bitsandbytes(bnb_state_dict()))
    with pytest.raises(ValueError, match="more than one param group"):
        sd = bnb_state_dict()
        sd["param_groups"][1]["params"] = [3, 0]
        from_bitsandbytes(sd)
    with pytest.raises(ValueError, match="blocksize"):
        from_bitsandbytes(bnb_state_dict(), blocksize=0)


# ---------------------------------------------------------------- with the real bitsandbytes

def _bnb():
    try:
        import bitsandbytes
    except Exception:  # not installed, or fails to load its native library
        return None
    return bitsandbytes


@pytest.mark.skipif(_bnb() is None, reason="bitsandbytes not importable")
@pytest.mark.parametrize("cls_name", ["AdEMAMix8bit", "AdEMAMix"])
def test_round_trip_with_bitsandbytes(cls_name):
    bnb = _bnb()
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' AdEMAMix needs a CUDA device")
    torch.manual_seed(0)
    shapes = [(64, 80), (4097,), (10,)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    opt = getattr(bnb.optim, cls_name)(params, lr=1e-3, t_alpha=50, t_beta3=50)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()
    sd = opt.state_dict()
    assert is_bitsandbytes_state_dict(sd)
    converted = from_bitsandbytes(sd)
    for pid, p in enumerate(params):
        raw = flat(sd["state"][pid])
        got = converted["state"][pid]
        assert got["step"].item() == 3
        if raw["state1"].dtype == torch.uint8:
            deq = bnb.functional.dequantize_blockwise
            m1 = deq(raw["state1"][0].contiguous(), absmax=raw["absmax1"][0].contiguous(),
                     code=raw["qmap1"], blocksize=B)
            nu = deq(raw["state2"], absmax=raw["absmax2"], code=raw["qmap2"], blocksize=B)
            torch.testing.assert_close(got["exp_avg_fast"], m1)
            torch.testing.assert_close(got["exp_avg_sq"], nu)
            m1_ref, m2_ref, nu_ref = reference_dequantize({k: v.cpu() for k, v in raw.items()
                                                           if isinstance(v, torch.Tensor)})
            assert torch.equal(got["exp_avg_slow"].cpu(), m2_ref)
        else:
            assert torch.equal(got["exp_avg_fast"], raw["state1"][0].float())
            assert torch.equal(got["exp_avg_slow"], raw["state1"][1].float())
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = ademamix_cuda.AdEMAMix(ours_params, backend="foreach")
    ours.load_state_dict(converted)
    for p in ours_params:
        p.grad = torch.randn_like(p) * 1e-2
    ours.step()
    assert all(torch.isfinite(p).all() for p in ours_params)
