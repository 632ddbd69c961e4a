"""``normsurgeon inspect``: the click command (CliRunner) and, once registered, the real CLI in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import models
import normsurgeon.cli  # noqa: F401  (imports the commands package in the right order)
from normsurgeon.commands.inspect import inspect
from tests.helpers import run_cli, sha256

registered = pytest.mark.skipif("inspect" not in normsurgeon.cli.main.commands,
                                reason="`inspect` is not registered in normsurgeon/commands/__init__.py yet")


@pytest.fixture(scope="module")
def transformers_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inspect")
    files = {}
    for name in ("prenorm_transformer", "postnorm_transformer"):
        files[name] = folder / f"{name}.pt"
        torch.save(models.build(name), files[name])
    return files


def _invoke(*args: object):
    return CliRunner().invoke(inspect, [str(a) for a in args], terminal_width=250, env={"COLUMNS": "250"})


@pytest.mark.parametrize("name,block_placement", [("prenorm_transformer", "pre-norm"), ("postnorm_transformer", "post-norm")])
def test_json_has_one_entry_per_norm_with_its_placement(transformers_files, name, block_placement):
    path = transformers_files[name]
    before, listing = sha256(path), sorted(path.parent.iterdir())
    result = _invoke(path, "--input-shape", "2,16:int64", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert len(payload["norms"]) == 5
    blocks = [n for n in payload["norms"] if n["path"].startswith("blocks.")]
    assert {n["placement"] for n in blocks} == {block_placement} and {n["kind"] for n in blocks} == {"layernorm"}
    assert sha256(path) == before and sorted(path.parent.iterdir()) == listing  # inspect writes nothing


def test_human_table_names_norms_options_and_hazards(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    torch.save(model, tmp_path / "net.pt")
    result = _invoke(tmp_path / "net.pt", "--input-shape", "1,3,8,8")
    assert result.exit_code == 0, result.output
    for text in ("norms", "after conv", "what normsurgeon can do", "fold: running statistics were never updated",
                 "convert to frozen-batchnorm", "hazards", "in training mode", "scale-invariant"):
        assert text in result.output


def test_human_output_lists_weight_standardized_convs_with_what_baking_does(tmp_path, cli):
    timm = pytest.importorskip("timm")
    model = nn.Sequential(timm.layers.StdConv2d(3, 4, 3), nn.ReLU(), timm.layers.StdConv2dSame(4, 4, 3, stride=2))
    torch.save(model.eval(), tmp_path / "ws.pt")

    result = cli("inspect", tmp_path / "ws.pt", "--input-shape", "1,3,9,9")

    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\nweight-standardized convs")[-1]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")]
    assert [row[:2] for row in rows] == [["0", "StdConv2d"], ["2", "StdConv2dSame"]], table
    assert rows[0][2].startswith("bake into a plain Conv2d (exact)") and rows[1][2].startswith("cannot be baked: ")
    as_json = json.loads(cli("inspect", tmp_path / "ws.pt", "--input-shape", "1,3,9,9", "--json").stdout)
    assert [(r["path"], r["class"]) for r in as_json["weight_standardized"]] == [("0", "StdConv2d"),
                                                                               ("2", "StdConv2dSame")]


@registered
@pytest.mark.slow
def test_cli_subprocess_inspect_json(transformers_files):
    result = run_cli("inspect", transformers_files["prenorm_transformer"], "--input-shape", "1,16:int64", "--json")
    assert result.returncode == 0, result.stderr
    placements = {n["path"]: n["placement"] for n in json.loads(result.stdout)["norms"]}
    assert placements["blocks.0.ln1"] == "pre-norm" and placements["ln_f"] == "final-norm"
