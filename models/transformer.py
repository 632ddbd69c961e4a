"""Small transformer encoders with nn.LayerNorm, pre-norm (GPT-2-like) and post-norm (BERT-like).

Pre-norm: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))`` and a final LayerNorm before the
head; every LN feeds only Linear layers, so its affine folds into them and LN→RMSNorm
conversion by centring the residual stream applies. Post-norm: ``x = ln1(x + attn(x));
x = ln2(x + mlp(x))`` with an embedding LayerNorm; its LNs also feed the residual path,
so their affines cannot be folded into the consumers alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.calibrate import prepare, seeded
from models.inputs import tokens

VOCAB = 100
MAX_LEN = 64


class SelfAttention(nn.Module):
    """Multi-head self-attention with plain Linear q/k/v/o projections."""

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        q, k = self._heads(self.q_proj(x)), self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Linear→GELU→Linear."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PreNormBlock(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=True)
        return x + self.mlp(self.ln2(x))


class PostNormBlock(nn.Module):
    """ln1(x + attn(x)), then ln2(x + mlp(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_ff)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class _Encoder(nn.Module):
    """Token + learned position embeddings, a stack of blocks, a Linear head over the vocab."""

    def __init__(self, blocks: list[nn.Module], d_model: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, d_model)
        self.pos_emb = nn.Embedding(MAX_LEN, d_model)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(d_model, VOCAB)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.tok_emb(ids) + self.pos_emb(pos)


class PreNormTransformer(_Encoder):
    """GPT-2-like: pre-norm blocks with causal attention, final LayerNorm, head."""

    def __init__(
        self, d_model: int = 32, n_heads: int = 4, d_ff: int = 64, n_layers: int = 2
    ) -> None:
        super().__init__([PreNormBlock(d_model, n_heads, d_ff) for _ in range(n_layers)], d_model)
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class PostNormTransformer(_Encoder):
    """BERT-like: embedding LayerNorm, post-norm blocks with bidirectional attention, head."""

    def __init__(
        self, d_model: int = 32, n_heads: int = 4, d_ff: int = 64, n_layers: int = 2
    ) -> None:
        super().__init__([PostNormBlock(d_model, n_heads, d_ff) for _ in range(n_layers)], d_model)
        self.ln_emb = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.ln_emb(self.embed(ids))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def token_inputs(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    """A (batch, 16) int64 tensor of token ids in [0, 100)."""
    return tokens(batch, generator, length=16, vocab=VOCAB)


def build_prenorm_transformer(*, seed: int = 0) -> PreNormTransformer:
    """A deterministic eval-mode pre-norm transformer with random LayerNorm affines."""
    with seeded(seed):
        model = PreNormTransformer()
    return prepare(model, lambda g: token_inputs(4, g), seed=seed)


def build_postnorm_transformer(*, seed: int = 0) -> PostNormTransformer:
    """A deterministic eval-mode post-norm transformer with random LayerNorm affines."""
    with seeded(seed):
        model = PostNormTransformer()
    return prepare(model, lambda g: token_inputs(4, g), seed=seed)
