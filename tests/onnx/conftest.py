"""Small models and helpers shared by the export and verify tests (torch.onnx's shared registry: tests/conftest.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

from normsurgeon.report import Report
from tests.helpers import give_realistic_stats

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
    return give_realistic_stats(ConvBN(), torch.randn(8, 3, 8, 8), seed=seed)


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


class Nested(nn.Module):
    """Several inputs (one int), a keyword that is None and a float baked in; nested dict/tuple outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, ids, mask=None, scale=2.0):
        h = self.lin(x) * scale + self.embed(ids)
        return {"hidden": h, "pair": (h.sum(-1), ids + 1)}


Exports = Callable[[str], tuple[nn.Module, Path, Report]]


@pytest.fixture(scope="session")
def with_past_exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """``get(name)``: a tiny causal LM (tests/hf_models.py ``causal_lm``), its with-past export and the export's
    report, made on first use (each export takes seconds; several test files verify the same files)."""
    from normsurgeon.onnx.with_past import export_with_past
    from tests.hf_models import causal_lm

    return _made_on_first_use(tmp_path_factory, causal_lm, export_with_past, "{name}.onnx")


@pytest.fixture(scope="session")
def seq2seq_exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """``get(name)``: a tiny encoder-decoder (tests/hf_models.py ``pretrained_model``: t5, whisper), its with-past
    export folder and the export's report, made on first use."""
    from normsurgeon.onnx.with_past_seq2seq import export_seq2seq_with_past
    from tests.hf_models import pretrained_model

    return _made_on_first_use(tmp_path_factory, pretrained_model, export_seq2seq_with_past, "{name}-onnx")


def _made_on_first_use(tmp_path_factory: pytest.TempPathFactory, build: Callable[[str], nn.Module],
                       export: Callable[[nn.Module, Path], Report], output: str) -> Exports:
    @functools.cache
    def get(name: str) -> tuple[nn.Module, Path, Report]:
        model = build(name)
        path = tmp_path_factory.mktemp("exports") / output.format(name=name)
        return model, path, export(model, path)

    return get
