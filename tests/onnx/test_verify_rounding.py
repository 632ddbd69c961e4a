"""verify_onnx on a deep CNN whose float32 rounding exceeds the default tolerance: judged as the fold's check is.

The subject is a plain stack of 31 Conv3x3+Tanh layers (16 channels, weights of gain 2.5, so each
layer amplifies a small change, as the depth of ResNet-152 does) on one 8x8 image. Measured
(torch 2.13 CPU, onnxruntime 1.32, seeds 0-5): onnxruntime differs from torch by 5-18x the default
float32 tolerance (1e-5 + 1e-4 * max|output|) and by 0.8-2.4x the model's own float32 rounding
noise (torch float32 against the same model in float64). Seed 2, used here: onnxruntime 7.4e-4 from
torch, 6.7x the tolerance (1.1e-4); noise 6.8e-4. One conv's weight scaled by 1.01 (layer 16) moves the output
by 0.21, 300x that noise. Export and verification take ~2 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from normsurgeon.check import NOISE_FACTOR
from normsurgeon.onnx import verify
from normsurgeon.onnx.export import export_onnx
from normsurgeon.onnx.verify import verify_onnx
from tests.onnx.conftest import image

DEPTH, CHANNELS, GAIN, SEED = 30, 16, 2.5, 2


def deep_stack() -> nn.Sequential:
    """Conv3x3+Tanh, DEPTH+1 times, with weights that amplify a change layer by layer."""
    generator = torch.Generator().manual_seed(SEED)
    layers: list[nn.Module] = [nn.Conv2d(3, CHANNELS, 3, padding=1), nn.Tanh()]
    for _ in range(DEPTH):
        layers += [nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.Tanh()]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * GAIN
                                  / conv.weight[0].numel() ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    return model.eval()


def one_image() -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)),)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """The deep stack, its export (normsurgeon's, default tolerances) and the export's report."""
    model = deep_stack()
    path = tmp_path_factory.mktemp("deep") / "deep.onnx"
    return model, path, export_onnx(model, one_image(), path)


def default_tolerance_of(model: nn.Module) -> float:
    with torch.no_grad():
        return 1e-5 + 1e-4 * model(*one_image()).abs().max().item()


def test_correct_export_passes_as_rounding_with_a_note(exported):
    model, _, report = exported
    assert report.passed
    (check,) = report.checks  # nothing to fold: the only check is onnxruntime's
    assert check.max_abs_diff > 2 * default_tolerance_of(model)  # the default tolerance alone would fail it
    assert check.label == f"onnxruntime cpu vs torch (batch 1) (atol raised to {NOISE_FACTOR}x the rounding noise)"
    (note,) = [n for n in report.notes if "rounding" in n]
    assert note.startswith("onnxruntime cpu vs torch (batch 1): the default tolerance was exceeded (")
    assert f"({check.max_abs_diff:.3g})" in note
    assert "float32 rounding noise is" in note and note.endswith("accepted as rounding")


def test_one_weight_changed_by_one_percent_still_fails(exported, tmp_path: Path):
    model, path, _ = exported
    proto = onnx.load(path)
    convs = [t for t in proto.graph.initializer if len(t.dims) == 4 and t.dims[0] == t.dims[1] == CHANNELS]
    assert len(convs) == DEPTH
    weight = convs[DEPTH // 2]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(proto, wrong)
    report = verify_onnx(model, wrong, one_image())
    assert not report.passed
    assert report.check.label == "onnxruntime cpu vs torch (batch 1)"  # the default tolerance's check stands
    assert report.check.max_abs_diff > 0.01
    assert not report.notes


@pytest.mark.parametrize("tolerances", [{"atol": 1e-5}, {"rtol": 1e-4}], ids=["atol", "rtol"])
def test_tolerances_the_caller_gives_are_kept(exported, tolerances, monkeypatch: pytest.MonkeyPatch):
    model, path, _ = exported
    monkeypatch.setattr(verify, "rounding_noise", _never)
    report = verify_onnx(model, path, one_image(), **tolerances)
    assert not report.passed
    assert (report.check.atol, report.check.rtol) == (1e-5, 1e-4)
    assert not report.notes


def test_cli_honours_an_explicit_atol(exported, cli, tmp_path: Path):
    model, path, _ = exported
    torch.save(model, tmp_path / "deep.pt")
    torch.save(one_image(), tmp_path / "image.pt")
    args = ("verify", tmp_path / "deep.pt", path, "--inputs", tmp_path / "image.pt", "--json")
    default, strict = cli(*args), cli(*args, "--atol", "1e-5")
    assert default.returncode == 0 and any("accepted as rounding" in n for n in json.loads(default.stdout)["notes"])
    assert strict.returncode != 0 and not json.loads(strict.stdout)["passed"]


def test_float64_run_once_per_input_set_and_only_for_a_failed_check(exported, exported_convbn, monkeypatch):
    model, path, _ = exported
    calls = []
    real = verify.rounding_noise
    monkeypatch.setattr(verify, "rounding_noise", lambda *args: calls.append(args) or real(*args))
    assert verify_onnx(model, path, one_image(), extra_inputs=[one_image()]).passed
    assert len(calls) == 2
    calls.clear()
    small, small_path = exported_convbn
    assert verify_onnx(small, small_path, image()).passed
    assert not calls


def _never(*args: object) -> None:
    raise AssertionError("no float64 run when the caller gave the tolerances")
