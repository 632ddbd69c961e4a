"""The numerical check: the float64 reference that tells rounding from a wrong result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.resnet import build_resnet
from normsurgeon import check
from normsurgeon.check import Float64Mode, rounding_noise


def _float64_copy_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


class CastsBackToItsWeightDtype(nn.Module):
    """Code found in real models (e.g. RMSNorm): ``x.to(self.weight.dtype)``, ``.float()``, new fp32 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.linear = nn.Linear(8, 5)
        self.register_buffer("offset", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).float().mean(dim=(2, 3))
        y = y.to(self.linear.weight.dtype) + torch.ones(8, dtype=torch.float32) / 3
        y = y * self.offset
        return self.linear(y).to(torch.float32)


def test_the_float64_run_computes_in_float64_through_the_models_own_casts_to_float32():
    torch.manual_seed(0)
    model, x = CastsBackToItsWeightDtype().eval(), torch.randn(2, 3, 6, 6)
    with torch.no_grad(), Float64Mode():
        out = model(x)
    d = {name: t.double() for name, t in model.state_dict().items()}
    y = nn.functional.conv2d(x.double(), d["conv.weight"], d["conv.bias"]).mean(dim=(2, 3))
    expected = nn.functional.linear((y + 1 / 3) * d["offset"], d["linear.weight"], d["linear.bias"])
    assert out.dtype == torch.float64  # the model's casts to float32 did not round
    torch.testing.assert_close(out, expected, atol=1e-14, rtol=1e-14)


def test_the_float64_run_leaves_the_model_untouched_and_in_place_ops_write_to_the_models_tensor():
    class CountsCalls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x):
            self.calls.add_(1)
            return self.linear(x)

    model = CountsCalls()
    weight_before = model.linear.weight.detach().clone()
    with torch.no_grad(), Float64Mode():
        model(torch.randn(1, 4))
    assert model.linear.weight.dtype == torch.float32 and torch.equal(model.linear.weight, weight_before)
    assert model.calls.dtype == torch.float32 and model.calls.item() == 1.0


def test_rounding_noise_is_the_float32_models_distance_from_float64_on_a_deep_resnet():
    model, x = build_resnet(50, width=8), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    noise = rounding_noise(model, (x,), out)
    expected = (out.double() - _float64_copy_outputs(model, x)).abs().max().item()
    assert noise == pytest.approx(expected, rel=1e-9)
    assert 0 < noise < 1e-3 * out.abs().max().item()
    assert next(model.parameters()).dtype == torch.float32


def test_rounding_noise_is_unknown_for_float64_models_and_models_that_cannot_run_in_float64():
    model = nn.Linear(3, 3).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    assert rounding_noise(model, (x,), model(x)) is None

    class Float32Only(nn.Module):
        def forward(self, x):
            y = x * 2
            assert y.dtype == torch.float32, "this model only runs in float32"
            return y

    x = torch.randn(2, 3)
    assert rounding_noise(Float32Only(), (x,), Float32Only()(x)) is None


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv2d(256, 256, 3, padding=1), torch.randn(1, 256, 4, 4)),
        (nn.Conv1d(300, 200, 3, bias=False, dilation=2), torch.randn(2, 300, 9)),
        (nn.Conv3d(64, 80, 3, stride=2), torch.randn(1, 64, 5, 5, 5)),
        (nn.Conv2d(64, 64, 3, padding="same", padding_mode="reflect"), torch.randn(1, 64, 6, 6)),
        (nn.Linear(512, 300), torch.randn(2, 5, 512)),
        (nn.Conv2d(64, 96, 3), torch.randn(64, 7, 7)),  # unbatched: the channels are dim 0
        (nn.Conv2d(256, 256, 3, groups=4), torch.randn(1, 256, 5, 5)),  # grouped: widened whole
    ],
    ids=["conv2d", "conv1d-dilated", "conv3d-strided", "conv2d-reflect", "linear-3d", "conv2d-unbatched",
         "conv2d-grouped"],
)
def test_large_layers_run_in_float64_blocks_that_give_the_whole_layers_result(layer, x, monkeypatch):
    monkeypatch.setattr(check, "_WEIGHT_BLOCK_ELEMENTS", 5000)  # many blocks, and a last one that is smaller
    with torch.no_grad(), Float64Mode():
        out = layer(x)
    expected = _float64_copy_outputs(layer, x)
    assert out.dtype == torch.float64 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=1e-13)
    assert layer.weight.dtype == torch.float32


def test_the_float64_run_never_widens_a_large_weight_whole():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat64(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    LargestFloat64.largest = max(LargestFloat64.largest, t.numel())
            return out

    model = nn.Sequential(nn.Conv2d(1024, 1024, 1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 2048))
    x = torch.randn(1, 1024, 1, 1)
    with torch.no_grad(), Float64Mode(), LargestFloat64():
        out = model(x)
    torch.testing.assert_close(out, _float64_copy_outputs(model, x), atol=1e-13, rtol=1e-13)
    assert LargestFloat64.largest <= check._WEIGHT_BLOCK_ELEMENTS < 1024 * 1024  # the weights: 8 and 16 MiB
