"""``normsurgeon inspect|fold|export DIR`` with no other flag on save_pretrained directories (issue 15).

Nine architectures (tests/hf_models.py: hidden 32, 2 layers, random weights): inputs come from the
config, outputs land beside the directory, generative models export their no-cache forward. A module
apart from test_dynamic_export.py, so pytest's loadscope can run the two on different workers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from tests.hf_models import PRETRAINED, pretrained_dirs


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, nn.Module]]:
    return pretrained_dirs(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRETRAINED)
def test_a_save_pretrained_directory_inspects_folds_and_exports_with_no_other_flag(name, pretrained, cli):
    folder, _ = pretrained(name)

    for command in ("inspect", "fold", "export"):
        result = cli(command, folder)
        assert result.returncode == 0, (command, result.stderr)
    assert (folder.parent / f"{name}.onnx").is_file()
    assert "onnxruntime cpu vs torch (batch 1)" in result.stdout and "inferred from the model's config" in result.stdout
    assert "error" not in result.stderr.lower()
