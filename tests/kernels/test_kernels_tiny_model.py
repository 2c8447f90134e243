"""A tiny Llama-style model trained a few steps: forced Triton (interpreter) vs the PyTorch path.

A stand-in for the model-level acceptance check until the training core wires pretrain_kernels in: the
same kernels, composed the way a decoder block uses them (RMSNorm -> QKV -> rotary -> GQA attention,
a windowed layer and a dense one), must give the same losses step by step.
"""

import torch
from torch import nn

import pretrain_kernels as pk


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, window):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, dim // heads, window
        self.norm1, self.norm2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.SiLU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        qkv = self.qkv(pk.rms_norm(x, self.norm1, 1e-5))
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (B, Hq, S, D)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = pk.apply_rotary(q, k, cos, sin)
        y = pk.causal_attention(q, k, v, window=self.window)  # (B, Hq, S, D)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, -1))
        return x + self.mlp(pk.rms_norm(x, self.norm2, 1e-5))


class TinyLM(nn.Module):
    def __init__(self, vocab=64, dim=64, heads=4, kv_heads=2, seq_len=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, kv_heads, window=8), Block(dim, heads, kv_heads, window=None)])
        self.norm = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        d = dim // heads
        angles = torch.outer(torch.arange(seq_len).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        self.register_buffer("cos", torch.cat((angles, angles), -1).cos())
        self.register_buffer("sin", torch.cat((angles, angles), -1).sin())

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos[: tokens.shape[1]], self.sin[: tokens.shape[1]])
        return self.head(pk.rms_norm(x, self.norm, 1e-5))


def _train(backend, steps=3):
    pk.set_backend(backend)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (steps, 2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for batch in data:
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_triton_training_matches_reference():
    reference = _train("reference")
    triton = _train("triton")
    assert reference[-1] < reference[0]  # it does learn
    for step, (a, b) in enumerate(zip(triton, reference)):
        assert abs(a - b) / abs(b) < 1e-5, (step, triton, reference)
