"""``normsurgeon export``, ``verify`` and ``optimize`` end to end.

In this process (the ``cli`` fixture), apart from one ``export`` and one ``optimize`` in a
subprocess (``run_cli``). The ResNet-18 export and the unfolded MobileNetV2 file are made once per
module and only read by the tests (those that write copy them first).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest
import torch

import models
from tests.helpers import REPO, run_cli, sha256

pytestmark = pytest.mark.slow
EXAMPLE = REPO / "models" / "examples" / "resnet18.pt"


@pytest.fixture(scope="module")
def r18_export(tmp_path_factory: pytest.TempPathFactory):
    """The bundled ResNet-18 exported with --dynamic-batch by ``python -m normsurgeon`` (the export smoke
    run), and what it printed. The verify tests read the file."""
    out = tmp_path_factory.mktemp("r18") / "r18.onnx"
    result = run_cli("export", EXAMPLE, "-o", out, "--input-shape", "1,3,32,32", "--dynamic-batch", "--json")
    return out, result


def test_export_bundled_example_is_folded_and_verified(r18_export):
    out, result = r18_export
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["facts"]["op_histogram"]["BatchNormalization"] == 0
    assert report["facts"]["batch_sizes_verified"] == [1, 2]
    assert len(report["folded"]) == 20 and all(c["passed"] for c in report["checks"])
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param


@pytest.fixture
def r18_onnx(r18_export) -> Path:
    out, result = r18_export
    assert result.returncode == 0, result.stderr
    return out


def test_verify_passes_on_the_right_file_and_fails_on_a_wrong_one(r18_onnx, tmp_path, cli):
    good = cli("verify", EXAMPLE, r18_onnx, "--input-shape", "1,3,32,32")
    assert good.returncode == 0, good.stderr
    other = tmp_path / "other.pt"
    changed = models.build("resnet18")
    with torch.no_grad():
        changed.fc.bias.add_(1.0)
    torch.save(changed, other)
    bad = cli("verify", other, r18_onnx, "--input-shape", "1,3,32,32")
    assert bad.returncode == 6 and "FAIL" in bad.stdout


def test_verify_on_cuda_without_cuda_says_how_to_get_it(r18_onnx, cli):
    result = cli("verify", EXAMPLE, r18_onnx, "--input-shape", "1,3,32,32", "--provider", "cuda")
    if result.returncode == 0:
        pytest.skip("this machine has CUDAExecutionProvider: the refusal cannot be shown")
    assert result.returncode == 2 and "normsurgeon[gpu]" in result.stderr


def test_export_into_missing_directory_writes_nothing(tmp_path, cli):
    result = cli("export", EXAMPLE, "-o", tmp_path / "nope" / "m.onnx", "--input-shape", "1,3,32,32")
    assert result.returncode == 8 and "does not exist" in result.stderr
    assert not (tmp_path / "nope").exists()


def test_export_of_an_unexportable_model_names_the_cause(tmp_path, cli):
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
    sys.path.insert(0, str(tmp_path))
    try:
        import branchy
        torch.save(branchy.Branchy().eval(), tmp_path / "branchy.pt")
    finally:  # the command imports branchy itself, as a new process would
        sys.path.remove(str(tmp_path))
        sys.modules.pop("branchy", None)
    result = cli("export", "branchy.pt", "-o", "b.onnx", "--input-shape", "2,4", cwd=tmp_path)
    assert result.returncode == 7
    assert "data-dependent" in result.stderr and "--verbose" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.onnx").exists()


@pytest.fixture(scope="module")
def mbv2_unfolded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MobileNetV2 exported by torch.onnx without its optimizer: 22 BatchNormalization nodes. Read only."""
    path = tmp_path_factory.mktemp("mbv2") / "mbv2.onnx"
    model = models.build("mobilenetv2")
    torch.onnx.export(model, models.example_inputs("mobilenetv2", 1), str(path), dynamo=True, optimize=False)
    return path


@pytest.fixture
def unfolded_onnx(mbv2_unfolded, tmp_path) -> Path:
    """A copy of :func:`mbv2_unfolded` (and its external data file) in the test's own folder."""
    for file in mbv2_unfolded.parent.iterdir():
        shutil.copy(file, tmp_path / file.name)
    return tmp_path / mbv2_unfolded.name


def test_optimize_folds_torch_unfolded_export(unfolded_onnx, tmp_path):
    out = tmp_path / "mbv2.opt.onnx"
    before = sha256(unfolded_onnx)
    result = run_cli("optimize", unfolded_onnx, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["facts"]["ops_before"]["BatchNormalization"] == 22
    assert "BatchNormalization" not in report["facts"]["ops_after"] and report["check"]["passed"]
    assert out.exists() and sha256(unfolded_onnx) == before


def test_optimize_bad_inputs(unfolded_onnx, tmp_path, cli):
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(unfolded_onnx.read_bytes()[:100])
    cut = cli("optimize", truncated, "-o", tmp_path / "x.onnx")
    assert cut.returncode == 3 and not (tmp_path / "x.onnx").exists()
    before = sha256(unfolded_onnx)
    same = cli("optimize", unfolded_onnx, "-o", unfolded_onnx, "--force")
    assert same.returncode == 8 and sha256(unfolded_onnx) == before
    dynamic = tmp_path / "dyn.onnx"
    torch.onnx.export(models.build("mlp"), models.example_inputs("mlp", 2), str(dynamic), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    symbolic = cli("optimize", dynamic, "-o", tmp_path / "d.onnx")
    assert symbolic.returncode == 2 and "--input-shape" in symbolic.stderr
    assert cli("optimize", dynamic, "-o", tmp_path / "d.onnx", "--input-shape", "3,32").returncode == 0


def test_export_help_names_the_real_default_opset(cli):
    from normsurgeon.onnx.export import DEFAULT_OPSET

    result = cli("export", "--help")
    assert result.returncode == 0 and f"default {DEFAULT_OPSET}" in result.stdout
    for option in ("--no-fold", "--opset", "--dynamic-batch", "--provider", "--atol", "--rtol", "--json"):
        assert option in result.stdout
