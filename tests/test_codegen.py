"""Static code-generation gates: what the compilers made of the kernels, checked without a GPU.

CUDA: the SASS and resource usage (cuobjdump) of every ademamix_step_kernel variant in the built
extension: registers for the occupancy the kernel is built for, no local memory, and 128-bit
global accesses in the vector path. Triton: _ademamix_kernel compiled for sm_90 in a subprocess
(conftest turns the interpreter on, and interpreted functions cannot be compiled): vector loads in
the PTX of the aligned variants (every param dtype, fp32 and bf16 states, param_sr, with and
without m1 and grad scaling), no contracted float multiply-add in it, no local memory in their
cubin, and registers that let 3 programs share an SM.

The parsers and checkers are pure functions of the tools' text, so the synthetic tests at the end
can feed them broken kernels and show that every gate fails when it should.
"""
import collections
import concurrent.futures
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Register file of sm_70 .. sm_90: 64K 32-bit registers per SM, allocated to a warp in units of
# 256 (8 per thread), at most 255 per thread.
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256
WARP_SIZE = 32
MAX_REGS_PER_THREAD = 255
# The occupancy the CUDA step kernel is designed for (its __launch_bounds__): 3 resident blocks,
# 2 for the variants with 8-bit states (read from csrc/ademamix_kernel.cu below).
MIN_BLOCKS_PER_SM = 3
# A vector access of the state arrays: 16 bytes (4 fp32) per thread.
VECTOR_BITS = 128

# The Variant's Param and State arguments (Itanium mangling, Bf16Bits by its name: bf16 written
# with stochastic rounding) -> storage bytes.
PARAM_BYTES = {"f": 4, "13__nv_bfloat16": 2, "6__half": 2, "Bf16Bits": 2}
STATE_BYTES = {"f": 4, "Bf16Bits": 2}
FP32 = "f"


# ---------------------------------------------------------------------------------------------
# facts from the sources and the register file


def header_constant(name, source="ademamix.h"):
    """An integer `constexpr` of csrc/<source>, so the gate follows the kernel's configuration."""
    text = (ROOT / "csrc" / source).read_text()
    m = re.search(rf"\bconstexpr\s+\w+\s+{name}\s*=\s*(\d+)\s*;", text)
    assert m, f"constexpr {name} not found in csrc/{source}"
    return int(m.group(1))


def max_registers_per_thread(block_size, blocks_per_sm):
    """Most registers a thread may use so that blocks_per_sm blocks of block_size fit on an SM."""
    warps = blocks_per_sm * -(-block_size // WARP_SIZE)
    per_warp = REGS_PER_SM // warps // REG_ALLOC_UNIT * REG_ALLOC_UNIT
    return min(per_warp // WARP_SIZE, MAX_REGS_PER_THREAD)


# ---------------------------------------------------------------------------------------------
# tools


def find_cuobjdump():
    """cuobjdump from PATH, $CUDA_HOME/bin, or the copy that ships inside triton's package."""
    candidates = [shutil.which("cuobjdump"),
                  Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    spec = importlib.util.find_spec("triton")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / "backends" / "nvidia" / "bin" / "cuobjdump"
                       for loc in spec.submodule_search_locations]
    return next((str(c) for c in candidates if c and os.access(c, os.X_OK)), None)


def cuobjdump(tool, *args):
    res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join([tool, *args])} failed:\n{res.stderr}"
    return res.stdout


# ---------------------------------------------------------------------------------------------
# parsers: cuobjdump text in, per-kernel findings out. Kernels are keyed by (arch, name); a lone
# cubin has no "arch =" line, so its arch is None.

_ARCH = re.compile(r"^\s*arch = (sm_\w+)")
_RES_FUNCTION = re.compile(r"^\s*Function ([^\s:]+):\s*$")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
_RES_FIELD = re.compile(r"\b([A-Z]+(?:\[\d+\])?):(\d+)")
# "/*0070*/   @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;": the opcode after an optional predicate
_SASS_INSN = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?\w+\s+)?([A-Z][A-Z0-9_.]*)")


def parse_res_usage(text):
    """`cuobjdump -res-usage` -> {(arch, name): {"REG": n, "STACK": n, "LOCAL": n, ...}}."""
    out, arch, key = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch, key = m.group(1), None
        elif m := _RES_FUNCTION.match(line):
            key = (arch, m.group(1))
        elif key is not None and (fields := _RES_FIELD.findall(line)):
            out[key] = {k: int(v) for k, v in fields}
            key = None
    return out


def parse_sass(text):
    """`cuobjdump -sass` -> {(arch, name): Counter of opcodes with their modifiers}."""
    out, arch, key = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch, key = m.group(1), None
        elif m := _SASS_FUNCTION.match(line):
            key = (arch, m.group(1))
            out[key] = collections.Counter()
        elif key is not None and (m := _SASS_INSN.match(line)):
            out[key][m.group(1)] += 1
    return out


def sass_access_bits(opcode):
    """Width of a SASS memory access: LDG.E.128.CONSTANT -> 128, LDG.E.U16 -> 16, LDG.E -> 32.

    Only a modifier that is a bare number or [US]8/[US]16 is a width, so cache hints such as
    .LTC128B do not count.
    """
    for mod in opcode.split(".")[1:]:
        if m := re.fullmatch(r"[US]?(8|16|32|64|128|256)", mod):
            return int(m.group(1))
    return 32


@dataclasses.dataclass
class KernelFindings:
    regs: int
    stack: int
    local: int
    local_insns: int  # LDL/STL: spills or a stack frame
    loads: collections.Counter  # global load width in bits -> count
    stores: collections.Counter


def kernel_findings(resources, sass):
    """Joins the two parses; a kernel missing from either output gets no entry."""
    out = {}
    for key in resources.keys() & sass.keys():
        res, ops = resources[key], sass[key]
        by_base = collections.defaultdict(collections.Counter)
        for opcode, n in ops.items():
            by_base[opcode.split(".")[0]][sass_access_bits(opcode)] += n
        out[key] = KernelFindings(
            regs=res["REG"], stack=res["STACK"], local=res["LOCAL"],
            local_insns=sum(by_base["LDL"].values()) + sum(by_base["STL"].values()),
            loads=by_base["LDG"], stores=by_base["STG"])
    return out


def wide(counter, bits=VECTOR_BITS):
    return sum(n for width, n in counter.items() if width >= bits)


def local_memory_failures(what, f):
    if f.stack or f.local or f.local_insns:
        return [f"{what}: local memory (STACK:{f.stack} LOCAL:{f.local}, "
                f"{f.local_insns} LDL/STL instructions): registers spill or arrays live on a stack"]
    return []


# ---------------------------------------------------------------------------------------------
# the CUDA step kernels

# ademamix_step_kernel<Variant<Param, State, HasM1, Quant>>: the Param and State arguments and
# the bools (Lb0E / Lb1E). Bf16Bits is mangled NS_8Bf16BitsE, or as a back-reference (S<n>_) when Param is
# Bf16Bits too.
_STEP_VARIANT = re.compile(
    r"ademamix_step_kernelI.*?VariantI(f|13__nv_bfloat16|6__half|NS_8Bf16BitsE)"
    r"(f|NS_8Bf16BitsE|S\d*_)((?:Lb[01]E)+)")


def _storage(token):
    return "Bf16Bits" if token == "NS_8Bf16BitsE" or token.startswith("S") else token


def decode_step_variant(name):
    """Mangled kernel name -> (param, state, (HasM1, Quant)) or None."""
    m = _STEP_VARIANT.search(name)
    if m is None:
        return None
    return (_storage(m.group(1)), _storage(m.group(2)),
            tuple(int(b) for b in re.findall(r"Lb([01])E", m.group(3))))


def step_variants(findings):
    """{(arch, param, state, flags): findings} of the step kernels, and the names that did not
    decode."""
    variants, undecoded = {}, []
    for (arch, name), f in findings.items():
        if "ademamix_step_kernel" not in name:
            continue
        v = decode_step_variant(name)
        if v is None:
            undecoded.append(name)
        else:
            variants[(arch, *v)] = f
    return variants, undecoded


def check_step_kernels(findings, max_regs, max_regs_quant):
    """Every gate on the CUDA step kernels; returns the failures (empty when all hold).
    max_regs_quant: the register bound of the variants with 8-bit states."""
    variants, undecoded = step_variants(findings)
    failures = [f"cannot decode the Variant of kernel {n}" for n in undecoded]
    if not variants:
        return failures + ["no ademamix_step_kernel in the extension"]
    for arch in sorted({a for a, *_ in variants}, key=str):
        have = {(p, st, flags) for a, p, st, flags in variants if a == arch}
        missing = set(itertools.product(PARAM_BYTES, STATE_BYTES,
                                        itertools.product((0, 1), (0, 1)))) - have
        failures += [f"{arch}: no step kernel for Param={p} State={st} HasM1={m1} Quant={q}"
                     for p, st, (m1, q) in sorted(missing)]

    for (arch, param, state, flags), f in sorted(variants.items(), key=str):
        what = f"{arch} Variant<{param}, {state}, {', '.join(map(str, flags))}>"
        quant = len(flags) > 1 and flags[1] == 1
        bound = max_regs_quant if quant else max_regs
        if f.regs > bound:
            failures.append(f"{what}: {f.regs} registers > {bound}, fewer blocks than the "
                            f"kernel's __launch_bounds__ fit on an SM")
        failures += local_memory_failures(what, f)
        if quant:
            # The 8-bit path: a lane's 8 codes of each state in one 64-bit access, beyond what
            # the variant without 8-bit states (the same path for the other tensors) has.
            plain = variants.get((arch, param, state, (flags[0], 0)))
            n_codes = 2 + flags[0]
            if plain is None:
                failures.append(f"{what}: no variant without 8-bit states to compare with")
            elif (f.loads[64] - plain.loads[64] < n_codes
                  or f.stores[64] - plain.stores[64] < n_codes):
                failures.append(f"{what}: {f.loads[64] - plain.loads[64]} 64-bit loads and "
                                f"{f.stores[64] - plain.stores[64]} stores beyond the plain "
                                f"variant's, expected >= {n_codes} each (the 8-byte code access)")
        # Per vector group of 4 elements: one 16-byte access per fp32 array (each state: m2, nu,
        # and m1 when HasM1; params and grads when fp32), one 8-byte access per 2-byte array. A
        # scalar vector path has none.
        n_states = 2 + flags[0]
        fp32_param, fp32_state = PARAM_BYTES[param] == 4, STATE_BYTES[state] == 4
        want_loads = n_states * fp32_state + 2 * fp32_param
        want_stores = n_states * fp32_state + fp32_param
        if wide(f.loads) < want_loads:
            failures.append(f"{what}: {wide(f.loads)} 128-bit global loads, expected at least "
                            f"{want_loads} (vector path lost?) {dict(f.loads)}")
        if wide(f.stores) < want_stores:
            failures.append(f"{what}: {wide(f.stores)} 128-bit global stores, expected at least "
                            f"{want_stores} (vector path lost?) {dict(f.stores)}")
        if not (fp32_param and fp32_state):
            # The kernel's own bookkeeping (its records, the chunk counter) may use 64-bit
            # accesses as well, identically in every variant: the excess over the fp32 kernel
            # with the same flags is the traffic of the 2-byte arrays.
            base = variants.get((arch, FP32, FP32, flags))
            if base is None:
                failures.append(f"{what}: no fp32 kernel with the same flags to compare with")
                continue
            need_loads = 2 * (not fp32_param) + n_states * (not fp32_state)
            need_stores = (not fp32_param) + n_states * (not fp32_state)
            extra_loads = f.loads[64] - base.loads[64]
            extra_stores = f.stores[64] - base.stores[64]
            if extra_loads < need_loads or extra_stores < need_stores:
                failures.append(f"{what}: {extra_loads} 64-bit loads and {extra_stores} 64-bit "
                                f"stores beyond the fp32 kernel's, expected >= {need_loads} and "
                                f">= {need_stores} (the 2-byte params, grads and states)")
    return failures


def step_kernel_table(findings):
    """One line per step kernel, for the log of a failing run."""
    variants, _ = step_variants(findings)
    return "\n".join(
        f"{arch} {param:>15} {state:>8} flags={''.join(map(str, flags))} REG:{f.regs} "
        f"LDG128:{wide(f.loads)} STG128:{wide(f.stores)} LDG64:{f.loads[64]} STG64:{f.stores[64]}"
        for (arch, param, state, flags), f in sorted(variants.items(), key=str))


def extension_path():
    spec = importlib.util.find_spec("ademamix_cuda._C")
    return None if spec is None else spec.origin


def test_cuda_step_kernels_sass():
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin, triton/backends/nvidia/bin)")
    ext = extension_path()
    if ext is None:
        pytest.skip("the CUDA extension ademamix_cuda._C is not built")
    findings = kernel_findings(parse_res_usage(cuobjdump(tool, "-res-usage", ext)),
                               parse_sass(cuobjdump(tool, "-sass", ext)))
    max_regs = max_registers_per_thread(header_constant("kBlockSize"), MIN_BLOCKS_PER_SM)
    max_regs_quant = max_registers_per_thread(
        header_constant("kBlockSize"), header_constant("kMinBlocksPerSmQuant", "ademamix_kernel.cu"))
    failures = check_step_kernels(findings, max_regs, max_regs_quant)
    assert not failures, (f"{ext}:\n" + "\n".join(failures)
                          + "\n\nall step kernels:\n" + step_kernel_table(findings))


# ---------------------------------------------------------------------------------------------
# the Triton kernel

# Compiles _ademamix_kernel the way a launch specialises it: pointers 16-byte aligned (torch
# storages and the 64-byte table rows), Python floats as fp32, the seed words as int32, the block
# of the variant (SR_BLOCK_SIZE for the ones that round stochastically), the launch's options
# (warps, register cap, no fp fusion unless the variant asks for it). Writes <tag>.ptx,
# <tag>.cubin and argv[3] (the launch configuration, JSON) into argv[1].
_TRITON_COMPILE = r"""
import json, sys
from pathlib import Path
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from ademamix_cuda.triton_kernels import ademamix as mod

out, variants = Path(sys.argv[1]), json.loads(sys.argv[2])
pointers = {"table_ptr": "*i64", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
            "found_inf_ptr": "*fp32"}
ints = {"seed_lo": "i32", "seed_hi": "i32"}
blocks = {}
for tag, v in variants.items():
    sr = v["flags"]["BF16_STATES"] or v["flags"]["PARAM_SR"]
    quant = v.get("kernel") == "8bit"
    fn = mod._ademamix_8bit_kernel if quant else mod._ademamix_kernel
    blocks[tag] = mod.SR_BLOCK_SIZE if sr or quant else mod.BLOCK_SIZE
    constexprs = dict(v["flags"], P_DTYPE=getattr(tl, v["dtype"]), BLOCK=blocks[tag])
    if quant:
        constexprs["QTILE"] = mod.QUANT_BLOCK_SIZE
        blocks[tag] = mod.QUANT_BLOCK_SIZE
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, ints.get(a, "fp32"))
                 for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in pointers}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    programs = mod.MIN_PROGRAMS_PER_SM_QUANT if quant else mod.MIN_PROGRAMS_PER_SM
    options = dict(mod._update_options(programs), enable_fp_fusion=v.get("fp_fusion", False))
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    (out / f"{tag}.ptx").write_text(k.asm["ptx"])
    (out / f"{tag}.cubin").write_bytes(k.asm["cubin"])
(out / sys.argv[3]).write_text(json.dumps({"blocks": blocks, "num_warps": mod.NUM_WARPS,
                                            "triton": triton.__version__}))
"""

_TRITON_FLAGS = dict(HAS_M1=True, MAXIMIZE=False, LR_IS_TENSOR=False, HAS_GRAD_SCALE=False,
                     HAS_FOUND_INF=False)
PARAM_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Storage variants: (param dtype, bf16 states, param_sr). bf16 states and param_sr round
# stochastically.
TRITON_STORAGE = ([(dtype, False, False) for dtype in PARAM_DTYPE_BYTES]
                  + [("float32", True, False), ("bfloat16", True, False), ("bfloat16", True, True),
                     ("bfloat16", False, True)])


def _storage_tag(dtype, bf16_states, param_sr):
    return _SHORT[dtype] + "_bf16states" * bf16_states + "_psr" * param_sr


def _triton_variant(dtype, bf16_states, param_sr, **flags):
    return dict(dtype=dtype, flags=dict(_TRITON_FLAGS, **flags, BF16_STATES=bf16_states,
                                        PARAM_SR=param_sr, ALIGNED=True))


# Every storage x HAS_M1 x HAS_GRAD_SCALE, aligned, the other flags off; and per storage the
# variant with every flag on. ptxas' register choice is not monotone in the code (a bf16 kernel
# spilled at 80 registers where a 72-register cap fits), so each variant is compiled, not inferred.
TRITON_VARIANTS = {
    f"{_storage_tag(*storage)}_m1{m1}_gs{gs}_aligned": _triton_variant(
        *storage, HAS_M1=bool(m1), HAS_GRAD_SCALE=bool(gs))
    for storage, m1, gs in itertools.product(TRITON_STORAGE, (0, 1), (0, 1))
}
TRITON_VARIANTS.update({
    f"{_storage_tag(*storage)}_allflags_aligned": _triton_variant(
        *storage, **{k: True for k in _TRITON_FLAGS})
    for storage in TRITON_STORAGE
})
# The 8-bit kernel (its rows with 8-bit states, and float rows beside them): per storage of the
# params and of the float rows, with and without m1, and with every flag on.
TRITON_VARIANTS.update({
    f"q8_{_storage_tag(*storage)}_m1{m1}_aligned": dict(
        _triton_variant(*storage, HAS_M1=bool(m1)), kernel="8bit")
    for storage in (("float32", False, False), ("bfloat16", False, False),
                    ("bfloat16", True, True), ("float16", False, False))
    for m1 in (0, 1)
})
TRITON_VARIANTS["q8_fp32_allflags_aligned"] = dict(
    _triton_variant("float32", False, False, **{k: True for k in _TRITON_FLAGS}), kernel="8bit")
TRITON_ALIGNED = list(TRITON_VARIANTS)
# Resident programs per SM the aligned variants must allow (as MIN_BLOCKS_PER_SM for CUDA).
TRITON_MIN_PROGRAMS_PER_SM = 3
TRITON_MIN_PROGRAMS_PER_SM_QUANT = 2  # the 8-bit kernel's, as the CUDA kernel's 8-bit variants
# the negative controls: without the alignment promise the compiler may not vectorize; with fp
# fusion it contracts multiply-adds
TRITON_VARIANTS["fp32_unaligned"] = dict(dtype="float32", flags=dict(
    _TRITON_FLAGS, BF16_STATES=False, PARAM_SR=False, ALIGNED=False))
TRITON_VARIANTS["fp32_fp_fusion"] = dict(TRITON_VARIANTS["fp32_m11_gs0_aligned"], fp_fusion=True)

# "ld.global.v4.b32", "@%p1 st.global.L1::evict_last.b16", ...
_PTX_GLOBAL = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
# a contracted multiply-add of floats ("fma.rn.f32"; integer address math is mad.lo)
_PTX_FLOAT_FMA = re.compile(r"\bfma\.rn(?:\.ftz)?(?:\.sat)?\.f(?:16|32|64)")


def ptx_global_access_bits(ptx, vector_only=False):
    """{"ld": Counter(bits), "st": Counter(bits)} of the global accesses in PTX text, a vector
    access (.v2, .v4) counting the bits of the whole vector. vector_only: only those (a scalar
    .b64 is a table entry, not 4 bf16 elements)."""
    out = {"ld": collections.Counter(), "st": collections.Counter()}
    for op, mods in _PTX_GLOBAL.findall(ptx):
        vec, bits = 1, None
        for mod in mods.split(".")[1:]:
            if m := re.fullmatch(r"v(\d)", mod):
                vec = int(m.group(1))
            elif m := re.fullmatch(r"[bsuf](\d+)", mod):
                bits = int(m.group(1))
        if bits is not None and (vec > 1 or not vector_only):
            out[op][vec * bits] += 1
    return out


def triton_expected_vectors(param_bytes, state_bytes, has_m1, elems_per_thread):
    """(loads, stores): Counters of the vector widths in bits the arrays' per-thread runs of
    elems_per_thread contiguous elements allow (at most 128), once each at least; a run of 32 bits
    or less is no vector."""
    def width(elem_bytes):
        return min(VECTOR_BITS, 8 * elem_bytes * elems_per_thread)

    states = [width(state_bytes)] * (2 + has_m1)
    param = width(param_bytes)
    loads = collections.Counter(w for w in states + [param, param] if w > 32)
    stores = collections.Counter(w for w in states + [param] if w > 32)
    return loads, stores


def covers(got, want):
    """Whether the accesses `got` hold, for every access of `want`, one at least as wide (both
    Counters of bits): at every width, at least as many accesses that wide or wider."""
    return all(sum(n for b, n in got.items() if b >= w) >= sum(n for b, n in want.items() if b >= w)
               for w in want)


def check_triton_kernel(what, ptx, findings, want_loads, want_stores):
    bits = ptx_global_access_bits(ptx, vector_only=True)
    failures = []
    for op, want, name in (("ld", want_loads, "loads"), ("st", want_stores, "stores")):
        if not covers(bits[op], want):
            failures.append(f"{what}: vector global {name} in the PTX {dict(bits[op])} (bits: "
                            f"count), expected at least {dict(want)}")
    if fmas := _PTX_FLOAT_FMA.findall(ptx):
        failures.append(f"{what}: {len(fmas)} contracted float multiply-adds ({fmas[0]}) in the "
                        f"PTX: launched without fp fusion, every backend rounds each product")
    return failures + local_memory_failures(what, findings)


@pytest.fixture(scope="module")
def triton_builds(tmp_path_factory):
    """{tag: (ptx, KernelFindings)} and the launch configuration, from compiling subprocesses
    (one per core, up to two: each compile is one core's work for about a second)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin, triton/backends/nvidia/bin)")
    out = tmp_path_factory.mktemp("triton_codegen")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # a real compile, not a cached artifact
    tags = list(TRITON_VARIANTS)
    shares = [tags[k::2] for k in range(min(2, os.cpu_count() or 1))]
    procs = [subprocess.Popen([sys.executable, "-c", _TRITON_COMPILE, str(out),
                               json.dumps({t: TRITON_VARIANTS[t] for t in share}), f"meta{k}.json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, share in enumerate(shares)]
    meta = {"blocks": {}}
    for k, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"compiling the Triton kernel for sm_90 failed:\n{err}"
        part = json.loads((out / f"meta{k}.json").read_text())
        meta = dict(part, blocks={**meta["blocks"], **part["blocks"]})

    def disassemble(tag):  # ~0.8 s of one core per cubin, in cuobjdump's own process
        cubin = str(out / f"{tag}.cubin")
        return kernel_findings(parse_res_usage(cuobjdump(tool, "-res-usage", cubin)),
                               parse_sass(cuobjdump(tool, "-sass", cubin)))

    builds = {}
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for tag, findings in zip(tags, pool.map(disassemble, tags)):
            name = ("_ademamix_8bit_kernel" if TRITON_VARIANTS[tag].get("kernel") == "8bit"
                    else "_ademamix_kernel")
            assert list(findings) == [(None, name)], f"{tag}: kernels {list(findings)}"
            builds[tag] = ((out / f"{tag}.ptx").read_text(), findings[(None, name)])
    return builds, meta


def _expected_vectors(meta, tag):
    v = TRITON_VARIANTS[tag]
    elems_per_thread = meta["blocks"][tag] // (WARP_SIZE * meta["num_warps"])
    # 8-bit codes: a thread's run of 1-byte codes is no vector (32 bits); its params and grads are
    state_bytes = 1 if v.get("kernel") == "8bit" else 2 if v["flags"]["BF16_STATES"] else 4
    return triton_expected_vectors(PARAM_DTYPE_BYTES[v["dtype"]], state_bytes,
                                   v["flags"]["HAS_M1"], elems_per_thread)


@pytest.mark.parametrize("tag", TRITON_ALIGNED)
def test_triton_aligned_vector_loads_no_local_memory(triton_builds, tag):
    builds, meta = triton_builds
    ptx, findings = builds[tag]
    failures = check_triton_kernel(f"triton {meta['triton']} {tag}", ptx, findings,
                                   *_expected_vectors(meta, tag))
    assert not failures, "\n".join(failures) + f"\n(REG:{findings.regs})"


@pytest.mark.parametrize("tag", TRITON_ALIGNED)
def test_triton_aligned_registers_fit_occupancy(triton_builds, tag):
    # ptxas may also stay spill-free by going past the occupancy bound (94 registers: 2 programs
    # of 8 warps per SM instead of 3), which costs the bytes in flight the kernel lives on. The
    # launch caps the registers (maxnreg): this holds the cap to the bound, and the local-memory
    # gate above shows that ptxas fits under it without spilling.
    builds, meta = triton_builds
    _, findings = builds[tag]
    programs = (TRITON_MIN_PROGRAMS_PER_SM_QUANT if TRITON_VARIANTS[tag].get("kernel") == "8bit"
                else TRITON_MIN_PROGRAMS_PER_SM)
    max_regs = max_registers_per_thread(WARP_SIZE * meta["num_warps"], programs)
    assert findings.regs <= max_regs, (
        f"triton {meta['triton']} {tag}: {findings.regs} registers > {max_regs}, fewer than "
        f"{programs} programs of {meta['num_warps']} warps fit on an SM")


def test_triton_unaligned_has_no_vector_loads(triton_builds):
    # Negative control: the same kernel without the alignment hint gets scalar loads, so the vector
    # loads seen above come from the hint and the PTX check can tell the difference.
    builds, meta = triton_builds
    ptx, findings = builds["fp32_unaligned"]
    bits = ptx_global_access_bits(ptx)
    assert bits["ld"] and wide(bits["ld"]) == 0, f"unaligned fp32 loads: {dict(bits['ld'])}"
    assert check_triton_kernel("fp32_unaligned", ptx, findings,
                               *_expected_vectors(meta, "fp32_unaligned"))
    # scalar accesses, but no spills either
    failures = local_memory_failures(f"triton {meta['triton']} fp32_unaligned", findings)
    assert not failures, "\n".join(failures) + f"\n(REG:{findings.regs})"


def test_triton_fp_fusion_is_caught(triton_builds):
    # Negative control: the same kernel compiled with fp fusion contracts multiply-adds, and the
    # check above reports them, so the fusion-free PTX it passes is the launch option's doing.
    builds, meta = triton_builds
    ptx, findings = builds["fp32_fp_fusion"]
    failures = check_triton_kernel("fp32_fp_fusion", ptx, findings,
                                   *_expected_vectors(meta, "fp32_fp_fusion"))
    assert any("multiply-adds" in f for f in failures), failures


# ---------------------------------------------------------------------------------------------
# the gates fail: synthetic cuobjdump text of healthy and broken step kernels


def _mangled(param, state, flags):
    bits = "NS_8Bf16BitsE"
    p = bits if param == "Bf16Bits" else param
    st = state if state == FP32 else ("S3_" if param == "Bf16Bits" else bits)
    return ("_ZN8ademamix51_GLOBAL__N__00000000_18_ademamix_kernel_cu_0000000020ademamix_step_"
            f"kernelINS_7VariantI{p}{st}{''.join(f'Lb{b}E' for b in flags)}"
            "EEEEvNS_10LaunchPlanENS_11HyperParamsENS_10ScalarPtrsE")


def _healthy_kernels(max_regs, max_regs_quant):
    """{name: (resources, [SASS instructions])} shaped like the real sm_90 output."""
    kernels = {}
    for param, state, has_m1, q in itertools.product(PARAM_BYTES, STATE_BYTES, (0, 1), (0, 1)):
        vec_param = "128" if PARAM_BYTES[param] == 4 else "64"
        vec_state = "128" if STATE_BYTES[state] == 4 else "64"
        n_states = 2 + has_m1
        insns = (["LDG.E.64.CONSTANT R52, desc[UR4][R6.64+0x30]",
                  "LDG.E.CONSTANT R3, desc[UR4][R6.64]"]
                 + [f"LDG.E.{vec_param} R8, desc[UR4][R2.64]"] * 2
                 + [f"LDG.E.{vec_state} R12, desc[UR4][R4.64]"] * n_states
                 + [f"STG.E.{vec_param} desc[UR4][R2.64], R8"]
                 + [f"STG.E.{vec_state} desc[UR4][R4.64], R12"] * n_states
                 + ["LDG.E.64 R20, desc[UR4][R4.64]"] * (n_states * q)
                 + ["STG.E.64 desc[UR4][R4.64], R20"] * (n_states * q)
                 + ["@!P0 LDG.E R9, desc[UR4][R2.64]",
                    "ATOMG.E.ADD.STRONG.GPU PT, R0, desc[UR4][R2.64], R5",
                    "STG.E desc[UR4][R2.64], RZ", "EXIT"])
        res = {"REG": max_regs_quant if q else max_regs, "STACK": 0, "SHARED": 0, "LOCAL": 0}
        kernels[_mangled(param, state, (has_m1, q))] = (res, insns)
    return kernels


def _render(kernels):
    """The kernels as (cuobjdump -res-usage, cuobjdump -sass) text of one sm_90 ELF."""
    head = "\nFatbin elf code:\n================\narch = sm_90\ncode version = [1,8]\n"
    res = [head, "\nResource usage:\n Common:\n  GLOBAL:0\n"]
    sass = [head, "\n\tcode for sm_90\n"]
    for name, (fields, insns) in kernels.items():
        res.append(f" Function {name}:\n  "
                   + " ".join(f"{k}:{v}" for k, v in fields.items()) + "\n")
        sass.append(f"\n\t\tFunction : {name}\n\t.headerflags\t@\"EF_CUDA_SM90\"\n")
        sass += [f"        /*{16 * i:04x}*/                   {insn} ;   /* 0x0000 */\n"
                 f"                                                  /* 0x0000 */\n"
                 for i, insn in enumerate(insns)]
    return "".join(res), "".join(sass)


def _names(kernels, param, has_m1, state=FP32, quant=0):
    return [n for n in kernels if (v := decode_step_variant(n))[:2] == (param, state)
            and v[2] == (has_m1, quant)]


def _first(kernels, param, has_m1, state=FP32, quant=0):
    return _names(kernels, param, has_m1, state, quant)[0]


def _scalar_vector_path(kernels, max_regs):
    name = _first(kernels, FP32, 1)
    res, insns = kernels[name]
    kernels[name] = (res, [i.replace(".128 ", " ") for i in insns])


def _spill(kernels, max_regs):
    name = _first(kernels, "13__nv_bfloat16", 0)
    res, insns = kernels[name]
    kernels[name] = (res, insns[:3] + ["STL [R1+0x4], R8", "LDL.LU R8, [R1+0x4]"] + insns[3:])


def _stack_frame(kernels, max_regs):
    kernels[_first(kernels, "6__half", 1)][0]["STACK"] = 16


def _too_many_registers(kernels, max_regs):
    kernels[_first(kernels, FP32, 0)][0]["REG"] = max_regs + 1


def _scalar_two_byte_params(kernels, max_regs):
    name = _first(kernels, "6__half", 0)
    res, insns = kernels[name]
    kernels[name] = (res, [i.replace("G.E.64 ", "G.E.U16 ") for i in insns])


def _scalar_bf16_states(kernels, max_regs):
    name = _first(kernels, FP32, 1, state="Bf16Bits")
    res, insns = kernels[name]
    kernels[name] = (res, [i.replace("G.E.64 ", "G.E.U16 ") for i in insns])


def _scalar_codes(kernels, max_regs):
    name = _first(kernels, FP32, 1, quant=1)
    res, insns = kernels[name]
    kernels[name] = (res, [i.replace("G.E.64 R20", "G.E.U8 R20").replace("G.E.64 desc", "G.E.U8 desc")
                           for i in insns])


def _too_many_registers_8bit(kernels, max_regs):
    name = _first(kernels, "13__nv_bfloat16", 1, quant=1)
    kernels[name][0]["REG"] += 8


def _lost_variant(kernels, max_regs):
    for name in _names(kernels, "13__nv_bfloat16", 1):
        del kernels[name]


def _lost_sr_variant(kernels, max_regs):
    for name in _names(kernels, "Bf16Bits", 0, state="Bf16Bits"):
        del kernels[name]


@pytest.mark.parametrize("breakage, expected", [
    pytest.param(_scalar_vector_path, "128-bit global loads", id="scalar_vector_path"),
    pytest.param(_spill, "local memory", id="spill"),
    pytest.param(_stack_frame, "local memory", id="stack_frame"),
    pytest.param(_too_many_registers, "registers >", id="too_many_registers"),
    pytest.param(_scalar_two_byte_params, "64-bit loads", id="scalar_two_byte_params"),
    pytest.param(_scalar_bf16_states, "64-bit loads", id="scalar_bf16_states"),
    pytest.param(_scalar_codes, "8-byte code access", id="scalar_codes"),
    pytest.param(_too_many_registers_8bit, "registers >", id="too_many_registers_8bit"),
    pytest.param(_lost_variant, "no step kernel for Param=13__nv_bfloat16 State=f HasM1=1",
                 id="lost_variant"),
    pytest.param(_lost_sr_variant, "no step kernel for Param=Bf16Bits State=Bf16Bits HasM1=0",
                 id="lost_sr_variant"),
])
def test_sass_checker_catches_broken_kernels(breakage, expected):
    max_regs = max_registers_per_thread(header_constant("kBlockSize"), MIN_BLOCKS_PER_SM)
    max_regs_quant = max_registers_per_thread(header_constant("kBlockSize"), 2)
    kernels = _healthy_kernels(max_regs, max_regs_quant)
    res, sass = _render(kernels)
    healthy = kernel_findings(parse_res_usage(res), parse_sass(sass))
    # the synthetic healthy build passes, with its registers exactly at the bounds
    assert (len(healthy) == len(kernels)
            and check_step_kernels(healthy, max_regs, max_regs_quant) == [])
    breakage(kernels, max_regs)
    res, sass = _render(kernels)
    failures = check_step_kernels(kernel_findings(parse_res_usage(res), parse_sass(sass)),
                                  max_regs, max_regs_quant)
    assert any(expected in msg for msg in failures), failures


def test_register_bound_from_the_register_file():
    # Worked examples: 3 blocks of 256 threads are 24 warps sharing 64K registers, 2730 a warp,
    # 2560 after rounding down to the 256-register unit: 80 a thread. 4 blocks: 2048 a warp, 64.
    # One block of 64 threads could use more than the ISA allows: 255.
    assert max_registers_per_thread(256, 3) == 80
    assert max_registers_per_thread(256, 4) == 64
    assert max_registers_per_thread(64, 1) == MAX_REGS_PER_THREAD
