"""``fold --strict`` (exit 5 when a BatchNorm is left, for CI) and ``--no-reparameterize``, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import give_realistic_stats

SHAPE = "2,3,8,8"


def _save(tmp_path: Path, name: str, model: nn.Module) -> Path:
    path = tmp_path / f"{name}.pt"
    torch.save(give_realistic_stats(model, torch.randn(2, 3, 8, 8)), path)
    return path


class RepBlock(nn.Module):
    """RepVGG's block: conv+BN + identity BN summed; the identity BN folds nowhere, but merges into one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3))
        self.identity = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kxk(x) + self.identity(x)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("strict")
    return {
        "clean": _save(tmp_path, "clean", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())),
        # the BN reads a ReLU and is the model's output: nothing to fold it into
        "stuck": _save(tmp_path, "stuck", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))),
        "branches": _save(tmp_path, "branches", nn.Sequential(RepBlock(), nn.ReLU())),
    }


def test_strict_passes_a_fully_folded_model(cli, models, tmp_path) -> None:
    result = cli("fold", models["clean"], "--input-shape", SHAPE, "--strict", "-o", tmp_path / "out.pt")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.pt").exists()


def test_strict_refuses_a_model_with_a_batchnorm_left_and_writes_nothing(cli, models, tmp_path) -> None:
    out = tmp_path / "out.pt"
    result = cli("fold", models["stuck"], "--input-shape", SHAPE, "--strict", "-o", out)
    assert result.returncode == 5 and not out.exists()
    assert result.stderr.startswith("error: --strict: 1 BatchNorm(s) left unfolded: 2 (no neighbouring conv/linear")
    assert "--to-affine" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # the same model without --strict: written, exit 0; with --to-affine nothing is left
    assert cli("fold", models["stuck"], "--input-shape", SHAPE, "-o", out).returncode == 0
    affine = cli("fold", models["stuck"], "--input-shape", SHAPE, "--strict", "--to-affine", "-o", out, "--force")
    assert affine.returncode == 0, affine.stderr


def test_strict_counts_what_reparameterize_would_have_merged(cli, models, tmp_path) -> None:
    merged = cli("fold", models["branches"], "--input-shape", SHAPE, "--strict", "--json", "-o", tmp_path / "a.pt")
    assert merged.returncode == 0, merged.stderr
    report = json.loads(merged.stdout)
    assert report["pass"] == "fold" and [c["action"] for c in report["changes"]] == ["reparameterized"]
    assert [c["label"] for c in report["checks"]] == ["reparameterized vs original", "folded vs original"]

    kept = cli("fold", models["branches"], "--input-shape", SHAPE, "--strict", "--no-reparameterize",
               "-o", tmp_path / "b.pt")
    assert kept.returncode == 5 and "1 BatchNorm(s) left unfolded: 0.identity (" in kept.stderr
