"""``normsurgeon export``, ``verify`` and ``optimize`` end to end, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import models
from tests.helpers import REPO, run_cli, sha256

pytestmark = pytest.mark.slow
EXAMPLE = REPO / "models" / "examples" / "resnet18.pt"


def test_export_bundled_example_is_folded_and_verified(tmp_path):
    out = tmp_path / "r18.onnx"
    result = run_cli("export", EXAMPLE, "-o", out, "--input-shape", "1,3,32,32", "--dynamic-batch", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["facts"]["op_histogram"]["BatchNormalization"] == 0
    assert report["facts"]["batch_sizes_verified"] == [1, 2]
    assert len(report["folded"]) == 20 and all(c["passed"] for c in report["checks"])
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_verify_passes_on_the_right_file_and_fails_on_a_wrong_one(tmp_path):
    out = tmp_path / "r18.onnx"
    assert run_cli("export", EXAMPLE, "-o", out, "--input-shape", "1,3,32,32").returncode == 0
    good = run_cli("verify", EXAMPLE, out, "--input-shape", "1,3,32,32")
    assert good.returncode == 0, good.stderr
    other = tmp_path / "other.pt"
    changed = models.build("resnet18")
    with torch.no_grad():
        changed.fc.bias.add_(1.0)
    torch.save(changed, other)
    bad = run_cli("verify", other, out, "--input-shape", "1,3,32,32")
    assert bad.returncode == 6 and "FAIL" in bad.stdout


def test_verify_on_cuda_without_cuda_says_how_to_get_it(tmp_path):
    out = tmp_path / "r18.onnx"
    assert run_cli("export", EXAMPLE, "-o", out, "--input-shape", "1,3,32,32").returncode == 0
    result = run_cli("verify", EXAMPLE, out, "--input-shape", "1,3,32,32", "--provider", "cuda")
    if result.returncode == 0:
        pytest.skip("this machine has CUDAExecutionProvider: the refusal cannot be shown")
    assert result.returncode == 2 and "normsurgeon[gpu]" in result.stderr


def test_export_into_missing_directory_writes_nothing(tmp_path):
    result = run_cli("export", EXAMPLE, "-o", tmp_path / "nope" / "m.onnx", "--input-shape", "1,3,32,32")
    assert result.returncode == 8 and "does not exist" in result.stderr
    assert not (tmp_path / "nope").exists()


def test_export_of_an_unexportable_model_names_the_cause(tmp_path):
    (tmp_path / "branchy.py").write_text(
        "import torch\n\n"
        "class Branchy(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(4, 4)\n\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return self.lin(x)\n"
        "        return x\n"
    )
    script = "import torch, branchy; torch.save(branchy.Branchy().eval(), 'branchy.pt')"
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True)
    result = run_cli("export", "branchy.pt", "-o", "b.onnx", "--input-shape", "2,4", cwd=tmp_path)
    assert result.returncode == 7
    assert "data-dependent" in result.stderr and "--verbose" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.onnx").exists()


@pytest.fixture
def unfolded_onnx(tmp_path) -> Path:
    path = tmp_path / "mbv2.onnx"
    model = models.build("mobilenetv2")
    torch.onnx.export(model, models.example_inputs("mobilenetv2", 1), str(path), dynamo=True, optimize=False)
    return path


def test_optimize_folds_torch_unfolded_export(unfolded_onnx, tmp_path):
    out = tmp_path / "mbv2.opt.onnx"
    before = sha256(unfolded_onnx)
    result = run_cli("optimize", unfolded_onnx, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["facts"]["ops_before"]["BatchNormalization"] == 22
    assert "BatchNormalization" not in report["facts"]["ops_after"] and report["check"]["passed"]
    assert out.exists() and sha256(unfolded_onnx) == before


def test_optimize_bad_inputs(unfolded_onnx, tmp_path):
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(unfolded_onnx.read_bytes()[:100])
    cut = run_cli("optimize", truncated, "-o", tmp_path / "x.onnx")
    assert cut.returncode == 3 and not (tmp_path / "x.onnx").exists()
    before = sha256(unfolded_onnx)
    same = run_cli("optimize", unfolded_onnx, "-o", unfolded_onnx, "--force")
    assert same.returncode == 8 and sha256(unfolded_onnx) == before
    dynamic = tmp_path / "dyn.onnx"
    torch.onnx.export(models.build("mlp"), models.example_inputs("mlp", 2), str(dynamic), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    symbolic = run_cli("optimize", dynamic, "-o", tmp_path / "d.onnx")
    assert symbolic.returncode == 2 and "--input-shape" in symbolic.stderr
    assert run_cli("optimize", dynamic, "-o", tmp_path / "d.onnx", "--input-shape", "3,32").returncode == 0


def test_export_help_names_the_real_default_opset():
    from normsurgeon.onnx.export import DEFAULT_OPSET

    result = run_cli("export", "--help")
    assert result.returncode == 0 and f"default {DEFAULT_OPSET}" in result.stdout
    for option in ("--no-fold", "--opset", "--dynamic-batch", "--provider", "--atol", "--rtol", "--json"):
        assert option in result.stdout
