"""``export --dynamic`` is a plain flag and ``--dynamic-axis`` names axes (issue 15 follow-up).

``--dynamic`` used to take an optional value, so ``export --dynamic DIR`` read DIR as that value and
then reported a missing MODEL. In this process (the ``cli`` fixture), on a tiny BERT directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

import normsurgeon  # noqa: F401  (declares torchvision's ops before transformers imports it)
from tests.hf_models import pretrained_dirs
from tests.onnx.conftest import files_in


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    get: Callable[[str], tuple[Path, nn.Module]] = pretrained_dirs(tmp_path_factory)
    return get("bert")[0]


@pytest.mark.slow
def test_dynamic_before_the_model_is_a_flag_not_a_value(bert_dir, cli, tmp_path):
    path = tmp_path / "bert.onnx"

    result = cli("export", "--dynamic", bert_dir, "-o", path, "--json")

    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)["facts"]
    assert facts["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "sequence"}
    assert path.is_file()


@pytest.mark.parametrize("spec, message", [
    ("input_ids", "error: bad --dynamic-axis 'input_ids': expected NAME:AXIS=SYMBOL[,AXIS=SYMBOL] once per input"),
    ("input_ids:one=seq", "error: bad --dynamic-axis 'input_ids:one=seq': expected NAME:AXIS=SYMBOL"),
])
def test_a_bad_dynamic_axis_is_a_one_line_usage_error(spec, message, bert_dir, cli, tmp_path):
    result = cli("export", bert_dir, "--dynamic-axis", spec, "-o", tmp_path / "b.onnx")

    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert files_in(tmp_path) == []


def test_dynamic_takes_no_value(bert_dir, cli, tmp_path):
    """A NAME:AXIS=SYMBOL after --dynamic is read as MODEL and named as a missing file, not as axes."""
    result = cli("export", bert_dir, "-o", tmp_path / "b.onnx", "--dynamic", "input_ids:1=sequence")

    assert result.returncode == 2
    assert "input_ids:1=sequence" in result.stderr
