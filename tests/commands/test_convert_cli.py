"""``normsurgeon convert``: the click command and the CLI in this process (CliRunner), and once the real
CLI in a subprocess.

Bad input (an unknown kind, an inexact conversion without --approximate, a look-alike norm) gives a
clear error, a non-zero exit and no output file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import models
import normsurgeon.cli  # noqa: F401  (imports the commands package in the right order)
from normsurgeon.commands.convert import convert
from tests.helpers import run_cli

registered = pytest.mark.skipif("convert" not in normsurgeon.cli.main.commands,
                                reason="`convert` is not registered in normsurgeon/commands/__init__.py yet")
LOOKALIKE = '''
import torch
from torch import nn


class RMSNorm(nn.Module):
    """Named like a norm, with weight and eps, but divides by the mean absolute value."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.eps)
'''


def _invoke(*args: object):
    return CliRunner().invoke(convert, [str(a) for a in args], terminal_width=250, env={"COLUMNS": "250"})


def _saved(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.pt"
    torch.save(models.build(name), path)
    return path


def test_llama_to_native_writes_a_checked_model(tmp_path):
    source = _saved(tmp_path, "llama")
    result = _invoke(source, "--to", "native", "--input-shape", "2,16:int64", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and len([c for c in report["changes"] if c["action"] == "converted"]) == 5
    converted = torch.load(tmp_path / "llama.converted.pt", weights_only=False)
    assert isinstance(converted.norm, nn.RMSNorm)
    ids = models.example_inputs("llama", 3)
    with torch.no_grad():
        torch.testing.assert_close(converted(*ids), models.build("llama")(*ids), rtol=1e-5, atol=1e-5)


def test_prenorm_to_rmsnorm_human_report(tmp_path):
    result = _invoke(_saved(tmp_path, "prenorm_transformer"), "--to", "rmsnorm", "--input-shape", "2,16:int64",
                     "-o", tmp_path / "out.pt")
    assert result.exit_code == 0, result.output
    assert "centred" in result.output and "nn.RMSNorm" in result.output and "pass" in result.output


def test_unknown_kind_lists_the_valid_ones_and_writes_nothing(tmp_path):
    source = _saved(tmp_path, "llama")
    result = _invoke(source, "--to", "rms", "--input-shape", "1,16:int64")
    assert result.exit_code == 2
    assert "unknown --to kind 'rms'; valid kinds: batchnorm," in result.output and "native" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.pt"]


def test_inexact_conversion_needs_approximate_and_writes_nothing(tmp_path):
    source = _saved(tmp_path, "mlp")
    result = _invoke(source, "--to", "groupnorm", "--input-shape", "4,32")
    assert result.exit_code == 2
    assert "not exact" in result.output and "--approximate" in result.output and "differ by up to" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]
    approx = _invoke(source, "--to", "groupnorm", "--input-shape", "4,32", "--approximate", "--json")
    assert approx.exit_code == 0, approx.output
    report = json.loads(approx.output)
    assert report["facts"]["needs_fine_tuning"] and any("fine-tuning" in n for n in report["notes"])


def _lookalike_model(tmp_path: Path) -> Path:
    (tmp_path / "lookalike.py").write_text(LOOKALIKE)
    sys.path.insert(0, str(tmp_path))
    try:
        import lookalike
        model = nn.Sequential(nn.Linear(4, 8), lookalike.RMSNorm(8)).eval()
        torch.save(model, tmp_path / "fake.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lookalike", None)
    return tmp_path / "fake.pt"


def test_a_look_alike_norm_is_a_clear_error(tmp_path, forget_new_modules):
    source = _lookalike_model(tmp_path)
    result = _invoke(source, "--to", "native", "--input-shape", "2,4", "--import-path", tmp_path)
    assert result.exit_code == 5
    assert "nothing was converted to native" in result.output and "computes no known norm formula" in result.output
    assert not (tmp_path / "fake.converted.pt").exists()


@registered
def test_cli_errors_are_one_line_on_stderr_and_write_nothing(tmp_path, cli):
    source = _saved(tmp_path, "postnorm_transformer")
    refused = cli("convert", source, "--to", "rmsnorm", "--input-shape", "1,16:int64")
    assert refused.returncode == 2 and "post-norm" in refused.stderr and "--approximate" in refused.stderr
    unknown = cli("convert", source, "--to", "foo", "--input-shape", "1,16:int64")
    assert unknown.returncode == 2 and "valid kinds" in unknown.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["postnorm_transformer.pt"]


@registered
@pytest.mark.slow
def test_cli_subprocess_success(tmp_path):
    done = run_cli("convert", _saved(tmp_path, "llama"), "--to", "native", "--input-shape", "1,16:int64", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["check"]["passed"] and (tmp_path / "llama.converted.pt").exists()


@pytest.fixture(scope="module")
def tied_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 LM (hidden 32, 2 layers, lm_head tied to the input embedding) saved with torch.save."""
    from tests.hf_models import causal_lm

    path = tmp_path_factory.mktemp("gpt2") / "gpt2.pt"
    torch.save(causal_lm("gpt2", tie=True), path)
    return path


@registered
def test_untie_lets_a_tied_gpt2_convert_every_layernorm(tied_gpt2, cli, tmp_path):
    source = tmp_path / "gpt2.pt"
    source.write_bytes(tied_gpt2.read_bytes())

    refused = cli("convert", source, "--to", "rmsnorm", "--input-shape", "2,16:int64")
    assert refused.returncode == 2, refused.stderr
    assert "(CLI: --untie)" in refused.stderr and "lm_head" in refused.stderr, refused.stderr
    assert not (tmp_path / "gpt2.converted.pt").exists()

    done = cli("convert", source, "--to", "rmsnorm", "--untie", "--input-shape", "2,16:int64", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["check"]["passed"]
    converted = torch.load(tmp_path / "gpt2.converted.pt", weights_only=False)
    kinds = {type(m).__name__ for m in converted.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))}
    assert kinds == {"RMSNorm"} and len([c for c in report["changes"] if c["action"] == "converted"]) == 5
    assert converted.lm_head.weight is not converted.get_input_embeddings().weight
