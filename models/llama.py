"""A Llama-style decoder with a hand-written RMSNorm, as in ``transformers``' LlamaRMSNorm.

Pre-norm blocks, SwiGLU MLP, rotary position embeddings, causal attention, no biases.
``LlamaRMSNorm`` is deliberately not ``nn.RMSNorm``: converters must recognise it by its
behaviour (weight · x / rms(x), computed in float32), not by its class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.calibrate import prepare, seeded
from models.inputs import tokens

VOCAB = 100


class LlamaRMSNorm(nn.Module):
    """RMSNorm over the last dim, in float32, scaled by ``weight`` (transformers' version)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    """Causal multi-head attention with rotary embeddings; q/k/v/o Linear without bias."""

    def __init__(self, d_model: int, n_heads: int, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self._heads(self.q_proj(x)), self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), all Linear without bias."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(d_model)
        self.self_attn = LlamaAttention(d_model, n_heads)
        self.post_attention_layernorm = LlamaRMSNorm(d_model)
        self.mlp = LlamaMLP(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Token embedding, decoder layers, final RMSNorm, untied lm_head (no bias)."""

    def __init__(
        self, d_model: int = 32, n_heads: int = 4, d_ff: int = 64, n_layers: int = 2
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, d_model)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(d_model, n_heads, d_ff) for _ in range(n_layers)
        )
        self.norm = LlamaRMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def llama_inputs(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    """A (batch, 16) int64 tensor of token ids in [0, 100)."""
    return tokens(batch, generator, length=16, vocab=VOCAB)


def build_llama(*, seed: int = 0) -> Llama:
    """A deterministic eval-mode Llama-style decoder with random RMSNorm weights."""
    with seeded(seed):
        model = Llama()
    return prepare(model, lambda g: llama_inputs(4, g), seed=seed)
