"""A grouped ConvTranspose that gets its bias from the fold adds it after the conv in eager mode.

torch's CPU grouped ConvTranspose is ~2x slower with a bias (benchmarks/README.md, bias table),
which made a folded decoder slower than the original. These tests pin the behaviour: same
numbers, same parameters, one op when exported, loadable by normsurgeon.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from normsurgeon import export_onnx, fold_batchnorm
from normsurgeon.io.loading import load_model
from normsurgeon.modules import BiasAfterConvTranspose1d, BiasAfterConvTranspose2d, BiasAfterConvTranspose3d
from tests.helpers import give_realistic_stats

CASES = [
    (nn.ConvTranspose1d, nn.BatchNorm1d, BiasAfterConvTranspose1d, (2, 8, 7)),
    (nn.ConvTranspose2d, nn.BatchNorm2d, BiasAfterConvTranspose2d, (2, 8, 5, 5)),
    (nn.ConvTranspose3d, nn.BatchNorm3d, BiasAfterConvTranspose3d, (2, 8, 3, 3, 3)),
]


def _decoder(conv_cls, bn_cls, *, groups: int, bias: bool, x: torch.Tensor) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(conv_cls(8, 8, 3, stride=2, groups=groups, bias=bias), bn_cls(8), nn.ReLU())
    return give_realistic_stats(model, x)


@pytest.mark.parametrize("conv_cls, bn_cls, expected_cls, shape", CASES, ids=["1d", "2d", "3d"])
def test_a_grouped_conv_transpose_without_bias_adds_the_folded_shift_after_the_conv(conv_cls, bn_cls, expected_cls,
                                                                                      shape):
    x = torch.randn(shape)
    model = _decoder(conv_cls, bn_cls, groups=4, bias=False, x=x)
    with torch.no_grad():
        expected = model(x)
    report = fold_batchnorm(model, (x,))
    conv = model[0]
    assert type(conv) is expected_cls and isinstance(conv, conv_cls)
    assert set(conv.state_dict()) == {"weight", "bias"}
    assert any(expected_cls.__name__ in note for note in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(model(x), conv_cls.forward(conv, x).relu())  # the same function as the torch layer


@pytest.mark.parametrize("groups, bias", [(1, False), (4, True)], ids=["ungrouped", "had-a-bias"])
def test_other_conv_transposes_keep_their_class(groups, bias):
    x = torch.randn(2, 8, 5, 5)
    model = _decoder(nn.ConvTranspose2d, nn.BatchNorm2d, groups=groups, bias=bias, x=x)
    report = fold_batchnorm(model, (x,))
    assert type(model[0]) is nn.ConvTranspose2d and report.check.passed
    assert not any("BiasAfter" in note for note in report.notes)


def test_exported_it_is_one_conv_transpose_with_its_bias(tmp_path):
    x = torch.randn(2, 8, 5, 5)
    model = _decoder(nn.ConvTranspose2d, nn.BatchNorm2d, groups=4, bias=False, x=x)
    fold_batchnorm(model, (x,))
    report = export_onnx(model, (x,), tmp_path / "decoder.onnx")
    assert report.check.passed
    ops = [node.op_type for node in onnx.load(tmp_path / "decoder.onnx").graph.node]
    assert ops.count("ConvTranspose") == 1 and "Add" not in ops
    conv = next(n for n in onnx.load(tmp_path / "decoder.onnx").graph.node if n.op_type == "ConvTranspose")
    assert len(conv.input) == 3  # the bias is the op's third input


def test_the_folded_model_saves_and_loads_through_normsurgeons_safe_loader(tmp_path):
    x = torch.randn(2, 8, 5, 5)
    model = _decoder(nn.ConvTranspose2d, nn.BatchNorm2d, groups=4, bias=False, x=x)
    fold_batchnorm(model, (x,))
    torch.save(model, tmp_path / "folded.pt")
    loaded = load_model(tmp_path / "folded.pt").model
    assert type(loaded[0]) is BiasAfterConvTranspose2d
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_the_folded_model_can_still_be_scripted_and_traced():
    """TorchScript is deprecated but still deployed: the class the fold puts in must not break it."""
    x = torch.randn(2, 8, 5, 5)
    model = _decoder(nn.ConvTranspose2d, nn.BatchNorm2d, groups=4, bias=False, x=x)
    fold_batchnorm(model, (x,))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(torch.jit.script(model)(x), expected)
        assert torch.equal(torch.jit.trace(model, (x,))(x), expected)
