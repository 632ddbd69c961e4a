"""``normsurgeon recalibrate`` end to end, as a user runs it: in this process (``cli``), and once in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from models.mlp import mlp_inputs
from tests.helpers import run_cli, sha256

pytestmark = pytest.mark.slow


@pytest.fixture
def corrupted_mlp(tmp_path: Path) -> Path:
    model = models.build("mlp")
    with torch.no_grad():
        model.bn1.running_mean.add_(3.0)
        model.bn1.running_var.mul_(10.0)
    path = tmp_path / "mlp.pt"
    torch.save(model, path)
    return path


def test_recalibrate_with_a_pt_data_file_writes_the_recalibrated_model(tmp_path, corrupted_mlp):
    generator = torch.Generator().manual_seed(0)
    data = tmp_path / "calib.pt"
    torch.save([mlp_inputs(64, generator)[0] for _ in range(5)], data)
    result = run_cli("recalibrate", corrupted_mlp, "--data", data, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and [c["module"] for c in report["changes"]] == ["bn1", "bn2"]
    assert "informational" in report["check"]["label"]
    model = torch.load(tmp_path / "mlp.recalibrated.pt", weights_only=False)
    assert abs(model.bn1.running_mean.mean().item() - models.build("mlp").bn1.running_mean.mean().item()) < 0.5
    assert not model.training and model.bn1.momentum == 0.1


def test_data_shape_mismatch_is_a_clear_error_and_nothing_is_written(tmp_path, corrupted_mlp, cli):
    data = tmp_path / "wrong.pt"
    torch.save(torch.randn(8, 5), data)
    before = sha256(corrupted_mlp)
    result = cli("recalibrate", corrupted_mlp, "--data", data)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "batch of shape (8, 5)" in result.stderr and "Linear expects (..., 32)" in result.stderr
    assert not (tmp_path / "mlp.recalibrated.pt").exists() and sha256(corrupted_mlp) == before


def test_empty_data_folder_is_a_clear_error_and_nothing_is_written(tmp_path, corrupted_mlp, cli):
    folder = tmp_path / "calib"
    folder.mkdir()
    result = cli("recalibrate", corrupted_mlp, "--data", folder)
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0 and "holds no data files" in result.stderr
    assert not (tmp_path / "mlp.recalibrated.pt").exists()


def test_recalibrate_on_a_save_pretrained_directory_writes_a_directory_that_reloads(tmp_path, cli):
    """Recalibration changes only BN statistics, which save_pretrained keeps: the output is a folder, reloaded in
    the command and here by transformers itself, holding the pooled statistics of the calibration batches."""
    np = pytest.importorskip("numpy")
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import pretrained_model

    model = pretrained_model("resnet")
    with torch.no_grad():  # statistics a recalibration must replace
        model.embedder.embedder.normalization.running_mean.add_(3.0)
    folder = tmp_path / "resnet"
    model.save_pretrained(folder)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "calib.npz", pixel_values=images.numpy())

    result = cli("recalibrate", folder, "--data", tmp_path / "calib.npz", "--batch-size", "8", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    out = tmp_path / "resnet.recalibrated"
    assert report["output"] == str(out) and report["output_form"] == "save_pretrained"
    assert report["checks"][-1]["label"] == "save_pretrained reloaded vs written" and report["passed"]
    reloaded = transformers.ResNetModel.from_pretrained(out).eval()
    with torch.no_grad():  # the first BN sees the stem conv's output; the last batch of 8 is held out
        stem = model.embedder.embedder.convolution(images[:24])
    expected = stem.mean(dim=(0, 2, 3))
    torch.testing.assert_close(reloaded.embedder.embedder.normalization.running_mean, expected, rtol=1e-4, atol=1e-5)
