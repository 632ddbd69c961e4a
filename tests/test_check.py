"""The numerical check: the float64 reference that tells rounding from a wrong result."""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from models.resnet import build_resnet
from normsurgeon import check
from normsurgeon.check import Float64Mode, compare_outputs, rounding_noise
from normsurgeon.report import OutputDiff


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
    model = nn.Sequential(nn.Conv2d(1024, 1024, 1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 2048))
    x = torch.randn(1, 1024, 1, 1)
    with torch.no_grad(), Float64Mode(), LargestFloat64() as probe:
        out = model(x)
    torch.testing.assert_close(out, _float64_copy_outputs(model, x), atol=1e-13, rtol=1e-13)
    assert probe.largest <= check._WEIGHT_BLOCK_ELEMENTS < 1024 * 1024  # the weights: 8 and 16 MiB


def test_an_embedding_looks_up_its_rows_before_widening_them_and_a_large_table_is_never_widened_whole():
    table = nn.Embedding(8192, 256, padding_idx=0)  # 2M elements: 16 MiB in float64
    ids = torch.tensor([[0, 5, 8191], [17, 5, 3]])
    weight_before = table.weight.detach().clone()
    with torch.no_grad(), Float64Mode(), LargestFloat64() as probe:
        out = table(ids)
        aten = torch.embedding(table.weight, ids)
    expected = table.weight.detach().double()[ids]
    assert out.dtype == aten.dtype == torch.float64
    assert torch.equal(out, expected) and torch.equal(aten, expected)  # a lookup is exact in any dtype
    assert probe.largest == ids.numel() * 256
    assert torch.equal(table.weight, weight_before)


def test_an_embedding_with_max_norm_still_renormalizes_in_float64():
    table = nn.Embedding(50, 8, max_norm=1.0)
    ids = torch.tensor([1, 2, 2, 49])
    with torch.no_grad():
        expected = copy.deepcopy(table).double()(ids)  # renormalizes the copy's rows, in float64
    with torch.no_grad(), Float64Mode():
        out = table(ids)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-15, rtol=1e-15)


class LargestFloat64(TorchDispatchMode):
    """The number of elements of the largest float64 tensor any op creates while the mode is on."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel())
        return out


class PeakLiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage that ops run under the mode held alive at once.

    Every new storage an op returns is counted until the last tensor (or view) that holds it is
    collected. Measured where it is allocated, not through the process's RSS, so it is exact and
    unaffected by the allocator's caching or other tests; memory a kernel uses inside itself is not seen.
    """

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.holders: dict[int, tuple[int, list[weakref.ref]]] = {}  # storage address -> (bytes, its tensors)
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._hold(t)
        self.peak = max(self.peak, self.live())
        return out

    def _hold(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address in self.inputs or storage.nbytes() == 0:
            return
        size, refs = self.holders.get(address, (0, []))
        if not any(ref() is not None for ref in refs):  # a new storage (perhaps at a freed one's address)
            size, refs = storage.nbytes(), []
        self.holders[address] = (size, [*refs, weakref.ref(t)])

    def live(self) -> int:
        return sum(size for size, refs in self.holders.values() if any(ref() is not None for ref in refs))


def _whole_tensor_diff(name, ref, new, atol, rtol):
    """The comparison of two same-shaped outputs as it was before chunking (float64 copies of whole
    outputs, boolean-indexed masks): the oracle."""
    nan = float("nan")
    if not ref.is_floating_point() and not ref.is_complex():
        equal = bool(torch.equal(ref.cpu(), new.cpu().to(ref.dtype)))
        mismatches = 0.0 if equal else 1.0
        return OutputDiff(name, mismatches, mismatches, 1.0 if equal else 0.0, equal, "" if equal else "values differ")
    a = ref.detach().cpu().double()
    b = new.detach().cpu().double()
    finite_ref = torch.isfinite(a)
    code = check._nonfinite_code
    if not torch.equal(finite_ref, torch.isfinite(b)) or not torch.equal(code(a[~finite_ref]), code(b[~finite_ref])):
        return OutputDiff(name, float("inf"), float("inf"), nan, False, "NaN/inf in different places")
    a, b = a[finite_ref], b[finite_ref]
    if a.numel() == 0:
        return OutputDiff(name, 0.0, 0.0, 1.0, True)
    max_abs = (a - b).abs().max().item()
    scale = a.abs().max().item()
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-30).item()
    if scale == 0 and b.abs().max().item() == 0:
        cosine = 1.0
    passed = max_abs <= atol + rtol * scale
    return OutputDiff(name, max_abs, max_rel, cosine, passed)


def _pair(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference output and a candidate of the given kind, 1000 elements (many chunks in the tests)."""
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    ref = torch.randn(10, 100, generator=g)
    new = ref + 1e-5 * torch.randn(10, 100, generator=g)
    nan, inf = float("nan"), float("inf")
    if kind == "close":
        return ref, new
    if kind == "far":
        return ref, new + torch.randn(10, 100, generator=g)
    if kind in ("nan-inf-same", "nan-inf-in-the-last-chunk"):
        spots = [(9, 99), (9, 98)] if kind == "nan-inf-in-the-last-chunk" else [(0, 3), (4, 50), (9, 99)]
        for (i, j), value in zip(spots, (nan, inf, -inf)):
            ref[i, j] = new[i, j] = value
        return ref, new
    if kind == "nan-where-finite":
        new[7, 7] = nan
        return ref, new
    if kind == "nan-vs-inf":
        ref[2, 2], new[2, 2] = nan, inf
        return ref, new
    if kind == "plus-vs-minus-inf":
        ref[5, 0], new[5, 0] = inf, -inf
        return ref, new
    if kind == "all-nan":
        return torch.full((10, 100), nan), torch.full((10, 100), nan)
    if kind == "zeros":
        return torch.zeros(10, 100), torch.zeros(10, 100)
    if kind == "zero-ref-nonzero-new":
        return torch.zeros(10, 100), new
    if kind == "fp16":
        return ref.half(), new.half()
    if kind == "bf16-vs-fp32":
        return ref.bfloat16(), new
    if kind == "float64":
        return ref.double(), new.double()
    if kind == "non-contiguous":
        return ref.t(), new.t().contiguous()
    if kind == "empty":
        return torch.empty(0, 100), torch.empty(0, 100)
    if kind == "int-equal":
        ids = torch.randint(0, 50, (10, 100), generator=g)
        return ids, ids.clone()
    if kind == "int-differ":
        ids = torch.randint(0, 50, (10, 100), generator=g)
        other = ids.clone()
        other[9, 99] += 1
        return ids, other
    if kind == "bool":
        return ref > 0, new > 0
    raise AssertionError(kind)


_KINDS = ["close", "far", "nan-inf-same", "nan-inf-in-the-last-chunk", "nan-where-finite", "nan-vs-inf",
          "plus-vs-minus-inf", "all-nan", "zeros", "zero-ref-nonzero-new", "fp16", "bf16-vs-fp32", "float64",
          "non-contiguous", "empty", "int-equal", "int-differ", "bool"]


@pytest.mark.parametrize("chunk", [7, 1 << 18], ids=["many-chunks", "one-chunk"])
@pytest.mark.parametrize("kind", _KINDS)
def test_the_chunked_comparison_gives_what_the_whole_tensor_comparison_gave(kind, chunk, monkeypatch):
    monkeypatch.setattr(check, "_CHUNK_ELEMENTS", chunk)
    ref, new = _pair(kind)
    got, expected = check._diff("y", ref, new, 1e-5, 1e-4), _whole_tensor_diff("y", ref, new, 1e-5, 1e-4)
    assert (got.name, got.passed, got.detail) == (expected.name, expected.passed, expected.detail)
    for field in ("max_abs_diff", "max_rel_diff"):  # maxima are exact in any order
        assert _same_float(getattr(got, field), getattr(expected, field)), field
    assert _same_float(got.cosine, expected.cosine, rel=1e-12)


def test_an_output_missing_or_of_another_shape_fails_with_the_reason():
    ref = torch.randn(3, 4)
    missing, reshaped = check._diff("y", ref, None, 1e-5, 1e-4), check._diff("y", ref, ref.reshape(4, 3), 1e-5, 1e-4)
    assert (missing.passed, missing.detail) == (False, "missing from the new model's outputs")
    assert (reshaped.passed, reshaped.detail) == (False, "shape (4, 3) != (3, 4)")


def _same_float(a: float, b: float, rel: float = 0.0) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=0)


def test_the_comparison_never_reads_its_input_into_float64_whole_nor_writes_to_it():
    n = 1 << 22  # 4M float32 elements, 16 MiB an output
    ref = torch.randn(n)
    new = ref + 1e-6 * torch.randn(n)
    new[[3, n // 2, n - 1]] = ref[[3, n // 2, n - 1]] = float("nan")  # the masked path, in three chunks
    before = (ref.clone(), new.clone())
    one_output = ref.numel() * ref.element_size()
    with PeakLiveBytes(ref, new) as chunked:
        result = compare_outputs(ref, new)
    with PeakLiveBytes(ref, new) as whole:  # the probe sees what the old comparison held: ~57 bytes an element
        _whole_tensor_diff("output", ref, new, 1e-5, 1e-4)
    assert result.passed and whole.peak > 10 * one_output
    assert chunked.peak <= 6 * check._CHUNK_ELEMENTS * 8 < one_output  # a few float64 chunks, whatever n is
    for tensor, copy_before in zip((ref, new), before):
        torch.testing.assert_close(tensor, copy_before, equal_nan=True, atol=0, rtol=0)


def test_the_rounding_noise_distance_is_taken_in_chunks_and_a_nan_anywhere_makes_it_nan(monkeypatch):
    monkeypatch.setattr(check, "_CHUNK_ELEMENTS", 7)
    ref, new = _pair("close")
    assert check._max_abs_difference(ref, new) == (ref.double() - new.double()).abs().max().item()
    new[9, 99] = float("nan")  # in the last chunk, after the largest difference
    assert math.isnan(check._max_abs_difference(ref, new))
