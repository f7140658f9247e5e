"""A tiny GPT-style byte-level language model and the text it learns, for `bench.convergence`.

The corpus ships with Python: `pydoc_data.topics`, the text `help()` shows for the language's
keywords and topics (about 465 KB of English prose and code examples in CPython 3.11; its size
and SHA-256 go into every result, since another Python version ships another text). Nothing is
downloaded. Bytes are the tokens (vocabulary 256), so no tokenizer is needed either.
"""
import hashlib
import math
import platform

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256
VAL_FRACTION = 0.1


def load_corpus():
    """(bytes of the corpus as a uint8 tensor, a description of where it came from)."""
    from pydoc_data import topics

    # Sorted keys: the dict's order is the generator's, not a promise.
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    data = text.encode("utf-8")
    info = dict(name="pydoc_data.topics (CPython's help() topics)",
                python=platform.python_version(), topics=len(topics.topics), bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest())
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), info


class Data:
    """The train split (first 90 %) sampled at random offsets, and fixed validation windows
    (last 10 %, evenly spaced, at most `val_windows`), the same for every run."""

    def __init__(self, corpus, context, val_windows):
        split = int(len(corpus) * (1 - VAL_FRACTION))
        self.train, val = corpus[:split].long(), corpus[split:].long()
        self.context = context
        starts = torch.arange(0, len(val) - context - 1, context)
        if len(starts) > val_windows:
            starts = starts[torch.linspace(0, len(starts) - 1, val_windows).long()]
        self.val = torch.stack([val[s:s + context + 1] for s in starts.tolist()])

    def train_batch(self, batch, generator):
        starts = torch.randint(0, len(self.train) - self.context - 1, (batch,),
                               generator=generator)
        return torch.stack([self.train[s:s + self.context + 1] for s in starts.tolist()])


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyGPT(nn.Module):
    """Pre-norm decoder: learned positions, causal attention, a 4x GELU MLP, tied embeddings."""

    def __init__(self, d, layers, heads, context):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not a multiple of heads {heads}")
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's init; the residual projections scaled down with depth.
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight",
                                                                      "down.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T

    def loss(self, seq):
        logits = self(seq[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))


def param_groups(model, weight_decay):
    """Weight decay on the matrices only (GPT-2 practice): norms and biases are not decayed."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def lr_at(step, steps, peak, warmup, final_fraction):
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to final_fraction * peak
    at the last step (`step` counts from 0)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
