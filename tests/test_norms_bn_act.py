"""BatchNorm with its activation inside (timm BatchNormAct2d / FrozenBatchNormAct2d), recognised by behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsurgeon.dataflow import Refusal
from normsurgeon.maths import batchnorm_scale_shift
from normsurgeon.norms import batchnorm_stats, is_batchnorm_like, split_batchnorm_act
from normsurgeon.passes.inspect import inspect_norms
from normsurgeon.report import SkipReason
from tests.helpers import give_realistic_stats

timm_layers = pytest.importorskip("timm.layers")
FrozenBatchNormAct2d = pytest.importorskip("timm.layers.norm_act").FrozenBatchNormAct2d


def _with_stats(module: nn.Module, channels: int = 8) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.running_mean.copy_(torch.randn(channels, generator=generator))
        module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        module.weight.copy_(torch.rand(channels, generator=generator) * 3 - 1.5)
        module.bias.copy_(torch.randn(channels, generator=generator))
    return module.eval()


def _bn_then(act: nn.Module, stats, x: torch.Tensor) -> torch.Tensor:
    s, t = batchnorm_scale_shift(stats.mean, stats.var, stats.eps, stats.weight, stats.bias)
    return act((x.double() * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)).float())


BN_ACTS = {
    "relu": lambda: timm_layers.BatchNormAct2d(8),
    "silu": lambda: timm_layers.BatchNormAct2d(8, act_layer=nn.SiLU),
    "eval-dropout-then-gelu": lambda: timm_layers.BatchNormAct2d(8, act_layer=nn.GELU, drop_layer=nn.Dropout),
    "frozen-relu": lambda: FrozenBatchNormAct2d(8),
}


@pytest.mark.parametrize("name", list(BN_ACTS))
def test_the_activation_is_the_modules_own_child_and_the_rest_is_batchnorm(name):
    module = _with_stats(BN_ACTS[name]())

    stats, act = split_batchnorm_act(module, (2, 8, 5, 5))

    assert act is module.act and is_batchnorm_like(module)
    assert stats.mean is module.running_mean and stats.weight is module.weight
    x = torch.randn(3, 8, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(_bn_then(act, stats, x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [
    nn.BatchNorm2d(8), timm_layers.BatchNormAct2d(8, apply_act=False),
], ids=["torch-batchnorm", "batchnorm-act-without-act"])
def test_a_batchnorm_without_activation_keeps_nothing(module):
    stats, act = split_batchnorm_act(_with_stats(module), (1, 8, 4, 4))

    assert isinstance(act, nn.Identity) and torch.equal(stats.var, module.running_var)


def test_plain_batchnorms_still_go_through_batchnorm_stats():
    module = _with_stats(nn.BatchNorm2d(8))

    assert split_batchnorm_act(module)[0] == batchnorm_stats(module)


class ResidualLookAlike(nn.Module):
    """BatchNorm tensors and an act child, but it computes x + act(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        for name, value in (("running_mean", 0.0), ("running_var", 1.0), ("weight", 1.0), ("bias", 0.0)):
            self.register_buffer(name, torch.full((8,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(x)


def _mixing_act() -> nn.Module:
    module = timm_layers.BatchNormAct2d(8)
    module.act = nn.Conv2d(8, 8, 1)  # act(BN(x)) holds, but the "act" mixes channels: no activation
    return module


@pytest.mark.parametrize("module, detail", [
    (ResidualLookAlike(), "does not compute BatchNorm followed by nothing or by its own children (ReLU)"),
    (_mixing_act(), "does not compute BatchNorm followed by nothing or by its own children (Identity, Conv2d)"),
], ids=["residual", "channel-mixing-child"])
def test_a_look_alike_is_refused_by_its_behaviour(module, detail):
    with pytest.raises(Refusal) as info:
        split_batchnorm_act(module.eval(), (1, 8, 4, 4))

    assert info.value.reason is SkipReason.UNKNOWN_BEHAVIOUR and detail in info.value.detail


def test_training_mode_is_refused():
    with pytest.raises(Refusal) as info:
        split_batchnorm_act(timm_layers.BatchNormAct2d(8).train(), (1, 8, 4, 4))

    assert info.value.reason is SkipReason.TRAINING_MODE


def test_a_module_with_batchnorm_buffers_and_nested_children_is_not_batchnorm_like():
    module = ResidualLookAlike()
    module.act = nn.Sequential(nn.Sequential(nn.ReLU()))

    assert not is_batchnorm_like(module)


def test_inspect_names_every_batchnorm_act_a_batchnorm_with_its_activation():
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.BatchNormAct2d(8, act_layer=nn.SiLU),
                          nn.Conv2d(8, 8, 1), timm_layers.BatchNormAct2d(8, apply_act=False))
    model.append(_with_stats(FrozenBatchNormAct2d(8)))
    give_realistic_stats(model, x)

    report = inspect_norms(model, (x,))

    rows = {row.path: row for row in report.norms}
    assert {p: (r.kind, r.evidence) for p, r in rows.items()} == {
        "1": ("batchnorm", "behaves as BatchNorm followed by its SiLU"),
        "3": ("batchnorm", "behaves as BatchNorm"),
        "4": ("frozen-batchnorm", "behaves as FrozenBatchNorm followed by its ReLU"),
    }
    assert rows["1"].normalized.endswith("then SiLU in the same module") and report.unrecognized == []
    assert not any(c.startswith("convert") for c in rows["1"].can)  # a new norm layer would drop the SiLU
    assert any(c.startswith("convert to frozen-batchnorm") for c in rows["3"].can)


@pytest.mark.slow
def test_efficientnet_b0_batchnorms_are_all_recognised():
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 64, 64)
    model = give_realistic_stats(timm.create_model("efficientnet_b0", pretrained=False), x)

    report = inspect_norms(model, (x,))

    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(report.norms) == batchnorms == 49 and report.unrecognized == []
    with_act = [row for row in report.norms if "followed by its SiLU" in row.evidence]
    assert len(with_act) == 33 and report.norms[0].path == "bn1" and report.norms[0] in with_act
