"""timm:NAME with --weights as MODEL (issue 15): built by timm, weights from a file, inputs from pretrained_cfg."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import normsurgeon.cli
from normsurgeon.errors import LoadError, UnsafePickleError
from normsurgeon.io.loading import load_model
from normsurgeon.io.timm_models import import_timm

from tests.helpers import give_realistic_stats


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from safetensors.torch import save_file

    timm = import_timm()
    torch.manual_seed(0)
    model = give_realistic_stats(timm.create_model("efficientnet_b0", pretrained=False), torch.randn(2, 3, 64, 64))
    folder = tmp_path_factory.mktemp("timm")
    save_file(model.state_dict(), folder / "w.safetensors")
    return folder / "w.safetensors", model


def test_timm_name_with_safetensors_weights_is_the_saved_model(efficientnet) -> None:
    weights, model = efficientnet

    loaded = load_model("timm:efficientnet_b0", weights=weights)

    assert loaded.form == "timm" and not loaded.model.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fold", "export"])
def test_cli_on_a_timm_name_needs_no_input_flag(command: str, efficientnet, tmp_path: Path) -> None:
    weights, _ = efficientnet
    out = tmp_path / ("out.onnx" if command == "export" else "out.pt")

    result = CliRunner().invoke(normsurgeon.cli.main, [command, "timm:efficientnet_b0", "--weights", str(weights),
                                                       "-o", str(out), "--json"])

    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any("pretrained_cfg" in n for n in notes) and out.exists()


def test_an_unknown_timm_name_suggests_close_ones() -> None:
    with pytest.raises(LoadError) as info:
        load_model("timm:efficientnet_b00")
    assert "efficientnet_b0" in str(info.value)


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(LoadError) as info:
        load_model("timm:efficientnet_b0", weights=tmp_path / "w.pth")
    assert "timm:efficientnet_b0" in str(info.value) and "missing keys" in str(info.value)


def test_weights_are_read_tensors_only(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    torch.save({"conv_stem.weight": Payload()}, tmp_path / "w.pth")
    with pytest.raises(UnsafePickleError):
        load_model("timm:efficientnet_b0", weights=tmp_path / "w.pth")
    assert not marker.exists()
