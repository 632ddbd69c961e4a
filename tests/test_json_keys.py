"""The top-level keys of each command's ``--json`` output, as README.md's table documents them.

One in-process run per command on tiny models. A key added, dropped or renamed fails here: scripts
read these keys, so a change must be deliberate and go into the README's table too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models

pytestmark = pytest.mark.slow

EVERY = {"pass", "passed", "changes", "skipped", "check", "checks", "facts", "notes"}
FOLDS = EVERY | {"folded", "output"}
WRITES = EVERY | {"output", "output_form"}
MLP_SHAPE = ("--input-shape", "4,32")
TOKENS = ("--input-shape", "2,16:int64")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models, data and ONNX file the runs read, written once (the runs write beside them)."""
    folder = tmp_path_factory.mktemp("json_keys")
    torch.save(models.build("mlp"), folder / "mlp.pt")
    torch.save(models.build("llama"), folder / "llama.pt")
    torch.save(models.build("postnorm_transformer"), folder / "post.pt")
    normed = models.build("mlp")
    torch.nn.utils.weight_norm(normed.fc1)  # the hook API: a module that still pickles
    torch.save(normed, folder / "normed.pt")
    generator = torch.Generator().manual_seed(0)
    torch.save([torch.randn(16, 32, generator=generator) for _ in range(3)], folder / "calib.pt")
    torch.onnx.export(models.build("mlp"), models.example_inputs("mlp", 2), str(folder / "mlp.onnx"),
                      dynamo=True, optimize=False)  # BatchNormalization nodes left for optimize to fold
    return folder


RUNS = {
    "fold": (["fold", "mlp.pt", *MLP_SHAPE], FOLDS),
    "fold --affine": (["fold", "mlp.pt", "--affine", *MLP_SHAPE], FOLDS),
    "export": (["export", "mlp.pt", "-o", "out.onnx", *MLP_SHAPE], FOLDS),
    "optimize": (["optimize", "mlp.onnx", "-o", "opt.onnx"], FOLDS),
    "convert": (["convert", "llama.pt", "--to", "native", *TOKENS], EVERY | {"output"}),
    "convert --approximate": (["convert", "post.pt", "--to", "rmsnorm", "--approximate", *TOKENS],
                              EVERY | {"output", "left_out"}),
    "inspect": (["inspect", "mlp.pt", *MLP_SHAPE], EVERY | {"model", "norms", "unrecognized"}),
    "recalibrate": (["recalibrate", "mlp.pt", "--data", "calib.pt"], WRITES),
    "weightnorm apply": (["weightnorm", "apply", "mlp.pt", *MLP_SHAPE], WRITES),
    "weightnorm remove": (["weightnorm", "remove", "normed.pt", *MLP_SHAPE], WRITES),
    "verify": (["verify", "mlp.pt", "mlp.onnx", "--input-shape", "2,32"], EVERY | {"onnx"}),
}


@pytest.mark.parametrize("command", list(RUNS))
def test_top_level_keys(command: str, files: Path, cli) -> None:
    args, keys = RUNS[command]
    writes = args[0] not in ("inspect", "verify")
    result = cli(*args, "--json", *(["--force"] if writes else []), cwd=files)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == keys
    assert all(set(c) >= {"label", "atol", "rtol", "informational"} for c in payload["checks"])


def test_fold_lists_what_it_folded(files: Path, cli) -> None:
    payload = json.loads(cli("fold", "mlp.pt", *MLP_SHAPE, "--json", "--force", cwd=files).stdout)
    assert [f["norm"] for f in payload["folded"]] == ["bn1", "bn2"] and payload["skipped"] == []
    assert payload["check"]["passed"] and not payload["check"]["informational"]
