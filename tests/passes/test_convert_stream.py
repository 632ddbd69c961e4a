"""The residual-stream walk of LayerNorm -> RMSNorm on hand-written blocks: which ops it looks through, which
readers it refuses, and the centring maths (float64, chunked). Equivalence: atol = rtol = 1e-5 on fresh inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.errors import UsageError
from normsurgeon.passes import convert_centring
from normsurgeon.passes.convert import convert_norms

D, VOCAB, TOKENS = 16, 20, 6


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """timm's drop-path: the identity in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (torch.rand(x.shape[0], 1, 1) > 0.1) / 0.9


class Rotary(nn.Module):
    """Reads the hidden states for their dtype only, as transformers' rotary embeddings do."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.cos(positions[..., None] * torch.arange(1, 5)).to(x.dtype)


class Peek(nn.Module):
    """Reads the hidden states' values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1)


class ParallelBlock(nn.Module):
    """x + attn-ish(ln(x)) + scale * mlp(ln(x)), with eval F.dropout, drop-path and OPT's reshape on the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.proj, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.scale, self.drop_path = LayerScale(), DropPath()

    def forward(self, x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, D)
        h = self.ln(x)
        attn = self.out(torch.tanh(self.proj(h)) * cos.reshape(-1, 4).repeat(1, D // 4))
        mlp = self.scale(self.fc2(F.gelu(self.fc1(h))))
        return (x + F.dropout(attn, 0.1, training=False) + self.drop_path(mlp)).view(shape)


class Toy(nn.Module):
    def __init__(self, *, peek: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(TOKENS, D))
        self.rotary = Rotary()
        self.blocks = nn.ModuleList([ParallelBlock(), ParallelBlock()])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, 3)
        self.peek = Peek() if peek else None

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.embed(ids) * 2.0 + self.pos
        cos = self.rotary(x, torch.arange(ids.shape[1], dtype=torch.float32))
        seen = self.peek(x) if self.peek is not None else None
        for block in self.blocks:
            x = block(x, cos.expand(ids.shape[0], -1, -1))
        logits = self.head(self.ln_f(x))
        return (logits,) if seen is None else (logits, seen)


def _toy(**options) -> nn.Module:
    torch.manual_seed(0)
    model = Toy(**options).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.3)
    return model


def _ids(seed: int, batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(seed)),)


def test_parallel_blocks_layer_scale_dropout_drop_path_and_reshapes_convert_exactly():
    model = _toy()
    original = copy.deepcopy(model)
    report = convert_norms(model, _ids(0), to="rmsnorm")
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert {c.module for c in report.changed("converted")} == {"blocks.0.ln", "blocks.1.ln", "ln_f"}
    assert {c.module for c in report.changed("centred")} == {"embed", "pos", "blocks.0.out", "blocks.0.fc2",
                                                             "blocks.1.out", "blocks.1.fc2"}
    assert {c.module: c.into for c in report.changed("folded")} == {"blocks.0.scale": "blocks.0.fc2",
                                                                    "blocks.1.scale": "blocks.1.fc2"}
    assert torch.equal(model.blocks[0].scale.gamma, torch.ones(D))
    torch.testing.assert_close(model(*_ids(1, 3)), original(*_ids(1, 3)), rtol=1e-5, atol=1e-5)


def test_a_module_reading_the_stream_values_is_refused_by_name():
    model = _toy(peek=True)
    report = convert_norms(model, _ids(0), to="rmsnorm", approximate=True)
    (note,) = [n for n in report.notes if "cannot be exact by centring" in n]
    assert "also read by peek (Peek), which would see the centred values" in note
    assert not report.changed("centred")


class SideRead(nn.Module):
    """A branch written through a layer scale and also read, unscaled, by another LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.ln, self.fc, self.scale = nn.Embedding(VOCAB, D), nn.LayerNorm(D), nn.Linear(D, D), LayerScale()
        self.side, self.ln_f, self.head = nn.LayerNorm(D), nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        written = self.fc(self.ln(x))
        return self.head(self.ln_f(x + self.scale(written))) + self.head(self.side(written))


def test_a_layer_scaled_value_another_layernorm_reads_is_refused():
    report = convert_norms(SideRead().eval(), _ids(0), to="rmsnorm", approximate=True)
    assert {item.module for item in report.left_out} == {"ln", "side", "ln_f"}
    assert all("layer scale" in item.detail for item in report.left_out)


def test_tied_embedding_refusal_names_untie_and_untie_converts_exactly():
    model = _toy()
    model.head = nn.Linear(D, VOCAB, bias=False)
    model.head.weight = model.embed.weight
    with pytest.raises(UsageError, match=r"embed shares its weight with head .*untie=True \(CLI: --untie\)"):
        convert_norms(copy.deepcopy(model), _ids(0), to="rmsnorm")
    original = copy.deepcopy(model)
    report = convert_norms(model, _ids(0), to="rmsnorm", untie=True)
    assert model.head.weight is not model.embed.weight
    assert any(n.startswith("embed untied (weight from head)") for n in report.notes)
    torch.testing.assert_close(model(*_ids(1, 3)), original(*_ids(1, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, dim", [((5, 7), 0), ((5, 7), 1), ((4, 3, 2, 2), 0), ((1, 1, 9), 2), ((9,), 0)],
                         ids=["linear", "embedding", "conv", "token", "bias"])
def test_centre_scales_then_removes_the_mean_along_dim_in_chunks(shape, dim, monkeypatch):
    monkeypatch.setattr(convert_centring, "_CHUNK_ELEMENTS", 5)  # several chunks
    tensor = torch.randn(shape, dtype=torch.float64)
    scale = torch.rand(shape[dim], dtype=torch.float64) + 0.5
    expected = tensor * scale.reshape([-1 if d == dim else 1 for d in range(len(shape))])
    expected = expected - expected.mean(dim, keepdim=True)
    convert_centring.centre_(tensor, dim, scale)
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-15)
    assert tensor.mean(dim).abs().max() < 1e-15
