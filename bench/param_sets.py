"""The parameter sets the benchmark steps over, and how `--params` scales them.

"gpt"   the 292 tensors of a 24-layer d=1024 transformer (GPT-2 medium shapes, vocab 50304): 355M
        parameters of very uneven sizes, the case a multi-tensor kernel must balance.
"small" 4096 tensors of 64x256 (67M): many small tensors, where per-tensor overhead dominates.
"flat"  one tensor of 2^28 elements: no multi-tensor work at all, the bandwidth witness.
"""
import math

GPT_LAYERS = 24
GPT_WIDTH = 1024
GPT_VOCAB = 50304
GPT_CONTEXT = 1024
GPT_TENSORS = 292
GPT_PARAMS = 354_871_296

SMALL_TENSORS = 4096
SMALL_SHAPE = (64, 256)
# Below this count the "small" set keeps its tensor count and shrinks the tensors instead: the
# set exists to measure per-tensor overhead, which a handful of tensors would not show.
SMALL_MIN_TENSORS = 256

FLAT_NUMEL = 2**28

NAMES = ("gpt", "small", "flat")


def gpt_shapes(layers=GPT_LAYERS, d=GPT_WIDTH, vocab=GPT_VOCAB, context=GPT_CONTEXT):
    """Parameter shapes of a GPT-2-style decoder, in module order."""
    shapes = [(vocab, d), (context, d)]  # token and position embeddings
    for _ in range(layers):
        shapes += [
            (d,), (d,),                   # ln_1 weight, bias
            (3 * d, d), (3 * d,),         # attention qkv projection
            (d, d), (d,),                 # attention output projection
            (d,), (d,),                   # ln_2 weight, bias
            (4 * d, d), (4 * d,),         # mlp up projection
            (d, 4 * d), (d,),             # mlp down projection
        ]
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return shapes


def numel(shape):
    return math.prod(shape)


def _check_gpt():
    shapes = gpt_shapes()
    total = sum(numel(s) for s in shapes)
    assert len(shapes) == GPT_TENSORS, f"gpt set has {len(shapes)} tensors, expected {GPT_TENSORS}"
    assert total == GPT_PARAMS, f"gpt set has {total} parameters, expected {GPT_PARAMS}"


_check_gpt()


def full_size(name):
    """Parameter count of a set at full size."""
    return sum(numel(s) for s in shapes(name))


def shapes(name, params=None):
    """Tensor shapes of set `name`, scaled so the total is about `params` (None: full size).

    gpt keeps its 292 tensors and scales every tensor's leading dimension (at least 1), so the
    spread of sizes stays that of the model. small keeps 64x256 tensors and scales their count
    down to SMALL_MIN_TENSORS, then shrinks the rows. flat is one tensor of `params` elements.
    """
    if name == "gpt":
        base = gpt_shapes()
        if params is None:
            return base
        s = params / GPT_PARAMS
        return [(max(1, round(sh[0] * s)),) + tuple(sh[1:]) for sh in base]
    if name == "small":
        if params is None:
            return [SMALL_SHAPE] * SMALL_TENSORS
        count = round(params / numel(SMALL_SHAPE))
        if count >= SMALL_MIN_TENSORS:
            return [SMALL_SHAPE] * count
        rows = max(1, round(params / (SMALL_MIN_TENSORS * SMALL_SHAPE[1])))
        return [(rows, SMALL_SHAPE[1])] * SMALL_MIN_TENSORS
    if name == "flat":
        return [(FLAT_NUMEL if params is None else max(1, int(params)),)]
    raise ValueError(f"unknown parameter set {name!r}: choose from {', '.join(NAMES)}")


def describe(shape_list):
    """'292 tensors, 354.9M params'."""
    total = sum(numel(s) for s in shape_list)
    return f"{len(shape_list)} tensor{'s' if len(shape_list) != 1 else ''}, {total / 1e6:.1f}M params"


def parse_count(text):
    """'355M' / '4m' / '2.5e6' / '1G' / '65536' -> int."""
    t = str(text).strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise ValueError(f"not a parameter count: {text!r} (examples: 355M, 4M, 2.5e6)") from None
    if value < 1:
        raise ValueError(f"parameter count must be at least 1, got {text!r}")
    return int(value)
