"""Optimizer parameter groups: every parameter once, no decay on norms and biases, scale invariance."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import models
import normsurgeon
from normsurgeon.passes.param_groups import param_groups


@functools.lru_cache(maxsize=None)
def _cached(name: str) -> nn.Module:
    return models.build(name)


def _build(name: str) -> nn.Module:
    """A fresh copy of a reference model (building one calibrates it, which takes a while)."""
    return copy.deepcopy(_cached(name)) if name in ("resnet18", "postnorm_transformer") else models.build(name)


def _group_of(pg) -> dict[str, str]:
    return {name: group for group, names in pg.names.items() for name in names}


def _assert_each_parameter_once(model: nn.Module, pg) -> None:
    ids = [id(p) for g in pg.groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", ["resnet18", "postnorm_transformer", "llama", "hifigan", "hifigan_legacy", "mlp"])
def test_every_parameter_once_and_no_decay_on_norms_and_biases(name):
    model = _build(name)
    pg = param_groups(model, 0.05, example_inputs=models.example_inputs(name, 2))
    _assert_each_parameter_once(model, pg)
    groups = _group_of(pg)
    decay = {g["name"]: g["weight_decay"] for g in pg.groups}
    assert decay["decay"] == 0.05 and decay["no_decay"] == 0.0
    for param_name, group in groups.items():
        if param_name.endswith("bias") or any(k in param_name for k in ("bn", "ln", "norm", "original0", "weight_g")):
            assert group == "no_decay", param_name
    torch.optim.AdamW(pg.groups, lr=1e-3)  # ready for torch.optim as it is


def test_tied_parameters_appear_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    pg = param_groups(model, 0.1, example_inputs=(torch.tensor([[1, 2, 3]]),))
    _assert_each_parameter_once(model, pg)
    assert sum(len(g["params"]) for g in pg.groups) == 1


def test_scale_invariant_convs_before_batchnorm_in_a_resnet():
    model = _build("resnet18")
    pg = param_groups(model, 0.05, example_inputs=models.example_inputs("resnet18", 2))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(pg.scale_invariant) == sorted(convs) and len(convs) == 20
    assert "fc" not in pg.scale_invariant  # the head feeds the output, not a norm
    changes = {c.module: c for c in pg.report.changes}
    assert "straight into layers.0.bn1 (BatchNorm2d)" in changes["layers.0.conv1.weight"].detail
    assert _group_of(pg)["layers.0.conv1.weight"] == "decay"
    assert any("lr_eff ∝ lr/‖w‖²" in n for n in pg.report.notes)


def test_exempt_scale_invariant_moves_them_to_no_decay():
    model = _build("resnet18")
    pg = param_groups(model, 0.05, example_inputs=models.example_inputs("resnet18", 2), exempt_scale_invariant=True)
    groups = _group_of(pg)
    assert all(groups[f"{path}.weight"] == "no_decay" for path in pg.scale_invariant)
    assert groups["fc.weight"] == "decay"


def test_postnorm_transformer_linears_feed_a_residual_sum_so_are_not_scale_invariant():
    """ln(x + attn(x)): scaling o_proj changes the sum's mix with x, so LN does not undo it."""
    model = _build("postnorm_transformer")
    pg = param_groups(model, 0.05, example_inputs=models.example_inputs("postnorm_transformer", 2))
    assert pg.scale_invariant == []
    groups = _group_of(pg)
    assert groups["blocks.0.ln1.weight"] == groups["ln_emb.bias"] == "no_decay"
    assert groups["blocks.0.attn.o_proj.weight"] == "decay"


class LinearLayerNormBlock(nn.Module):
    """A transformer block whose projections go straight into norms (QK-norm, post-projection LN)."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(d // heads), nn.LayerNorm(d // heads)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d, bias=True)  # a bias before LayerNorm: not scale-invariant
        self.ln = nn.LayerNorm(2 * d)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.out_ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, -1)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.heads, -1)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, -1).transpose(1, 2)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.out_ln(self.down(torch.relu(self.ln(self.up(h)))))


def test_scale_invariant_linears_before_layernorm_and_rmsnorm_in_a_transformer_block():
    model = LinearLayerNormBlock()
    pg = param_groups(model, 0.1, example_inputs=(torch.randn(2, 5, 16),))
    assert sorted(pg.scale_invariant) == ["down", "k_proj", "q_proj"]


@pytest.mark.slow
def test_qk_norm_projections_of_a_transformers_qwen3_are_scale_invariant():
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = Qwen3Model(config).eval()
    pg = param_groups(model, 0.1, example_inputs=(torch.randint(0, 64, (2, 7)),))
    assert pg.scale_invariant == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"]
    groups = _group_of(pg)
    assert groups["layers.0.self_attn.q_norm.weight"] == groups["norm.weight"] == "no_decay"  # hand-written RMSNorm
    _assert_each_parameter_once(model, pg)


def test_without_example_inputs_it_says_scale_invariance_is_unknown():
    pg = param_groups(_build("resnet18"), 0.05)
    assert pg.scale_invariant == []
    assert pg.report.facts["scale-invariant layers"] == "unknown (no example inputs)"
    assert any("pass example_inputs" in n for n in pg.report.notes)


def test_weight_norm_gain_is_a_norm_parameter_and_direction_is_scale_invariant():
    model = models.build("hifigan")
    pg = param_groups(model, 0.05, norm_decay=0.01)
    groups = _group_of(pg)
    assert groups["conv_pre.parametrizations.weight.original0"] == "norm"
    assert groups["conv_pre.parametrizations.weight.original1"] == "decay"
    assert "conv_pre" in pg.scale_invariant
    assert {g["name"]: g["weight_decay"] for g in pg.groups}["norm"] == 0.01
    assert pg.to_dict()["groups"][0]["params"]  # names, JSON-ready


def test_the_result_goes_straight_into_a_torch_optimizer() -> None:
    """As with timm's helper: AdamW(param_groups(model, 0.05)) runs a step, with each group's decay."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    groups = normsurgeon.param_groups(model, 0.05)  # the public name, exactly as the issue writes it
    optimizer = torch.optim.AdamW(groups)
    before = model[3].weight.detach().clone()

    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()

    assert len(optimizer.param_groups) == len(groups)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == sorted(g["weight_decay"] for g in groups)
    assert not torch.equal(model[3].weight, before)
