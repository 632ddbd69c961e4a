"""Small models and helpers shared by the export and verify tests."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
NO_CUDA_REASON = (
    "onnxruntime has no CUDAExecutionProvider here: providers are "
    + ", ".join(ort.get_available_providers())
)


class ConvBN(nn.Module):
    """Conv → BatchNorm → ReLU → pool → Linear, with trained-looking BN statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def conv_bn(seed: int = 0) -> ConvBN:
    """A deterministic eval-mode ConvBN whose BN was calibrated and given a random affine."""
    torch.manual_seed(seed)
    model = ConvBN().train()
    with torch.no_grad():
        for step in range(3):
            model(torch.randn(8, 3, 8, 8) * (1.5 + step) + 0.5)
        model.bn.weight.uniform_(-1.5, 1.5)
        model.bn.bias.normal_(0, 0.3)
    return model.eval()


def image(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


def files_in(directory: Path) -> list[str]:
    """Every entry of ``directory`` (temp files included), sorted."""
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def convbn() -> ConvBN:
    return conv_bn()


@pytest.fixture(scope="module")
def exported_convbn(tmp_path_factory: pytest.TempPathFactory) -> tuple[ConvBN, Path]:
    """ConvBN and its plain (unfolded, static-shape) torch.onnx export, shared by a module's tests."""
    model = conv_bn()
    path = tmp_path_factory.mktemp("exported") / "convbn.onnx"
    torch.onnx.export(model, image(), dynamo=True, verbose=False).save(path)
    return model, path


@pytest.fixture(autouse=True, scope="session")
def _share_the_exporters_op_registry():
    """Build torch.onnx's ATen→ONNX registry once per opset instead of once per export (~3 s each).

    The exporter only reads the registry (it is mutated only for ``custom_translation_table``,
    which normsurgeon never passes), so sharing it changes no result, only the suite's run time.
    """
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:  # another torch layout: run unshared
        yield
        return
    original = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return
    cache: dict = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original.__func__(cls, *args, **kwargs)
        return cache[key]

    ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original

class Nested(nn.Module):
    """Several inputs (one int), a keyword that is None and a float baked in; nested dict/tuple outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, ids, mask=None, scale=2.0):
        h = self.lin(x) * scale + self.embed(ids)
        return {"hidden": h, "pair": (h.sum(-1), ids + 1)}
