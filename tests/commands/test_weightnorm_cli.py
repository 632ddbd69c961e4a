"""``normsurgeon weightnorm apply|remove`` end to end, as a user runs it: in this process (``cli``), and
once each in a subprocess."""

from __future__ import annotations

import json

import pytest
import torch

import models
from models.hifigan import Generator
from normsurgeon.passes.weight_norm import apply_weight_norm
from tests.helpers import run_cli, sha256

pytestmark = pytest.mark.slow
MEL = models.example_inputs("hifigan", 2)


def _out(model: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def test_remove_on_a_bare_state_dict_writes_plain_keys(tmp_path, cli):
    source = models.build("hifigan")
    checkpoint = tmp_path / "generator.pt"
    torch.save(source.state_dict(), checkpoint)
    before = sha256(checkpoint)
    result = cli("weightnorm", "remove", checkpoint, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["output_form"] == "state_dict" and len(report["changes"]) == 20
    plain = Generator().eval()
    plain.load_state_dict(torch.load(tmp_path / "generator.plain.pt"), strict=True)
    torch.testing.assert_close(_out(plain, *MEL), _out(source, *MEL), rtol=1e-5, atol=1e-6)
    assert sha256(checkpoint) == before


def test_remove_on_a_state_dict_with_factory_writes_a_plain_picklable_module(tmp_path):
    (tmp_path / "vocoder.py").write_text(
        "from models.hifigan import build_hifigan\n\n\ndef build():\n    return build_hifigan(seed=3)\n"
    )
    source = models.build("hifigan")
    torch.save(source.state_dict(), tmp_path / "ckpt.pt")
    out = tmp_path / "plain.pt"
    result = run_cli("weightnorm", "remove", "ckpt.pt", "--factory", "vocoder:build", "--input-shape", "1,8,16",
                     "-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "check: without weight norm vs with" in result.stdout and "pass" in result.stdout
    model = torch.load(out, weights_only=False)
    assert type(model) is Generator and not any(hasattr(m, "parametrizations") for m in model.modules())
    torch.testing.assert_close(_out(model, *MEL), _out(source, *MEL), rtol=1e-5, atol=1e-6)


def test_remove_on_a_pickled_hook_api_model(tmp_path, cli):
    source = models.build("hifigan_legacy")
    path = tmp_path / "legacy.pt"
    torch.save(source, path)
    result = cli("weightnorm", "remove", path, "--input-shape", "1,8,16", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["check"]["passed"]
    model = torch.load(tmp_path / "legacy.plain.pt", weights_only=False)
    assert not any(hasattr(m, "weight_g") for m in model.modules())
    torch.testing.assert_close(_out(model, *MEL), _out(source, *MEL), rtol=1e-5, atol=1e-6)


def test_apply_writes_a_state_dict_that_loads_as_the_report_says(tmp_path):
    source = models.build("mlp")
    path = tmp_path / "mlp.pt"
    torch.save(source, path)
    result = run_cli("weightnorm", "apply", path, "--input-shape", "4,32")
    assert result.returncode == 0, result.stderr
    assert "load_state_dict" in result.stdout and "state_dict" in result.stdout
    state_dict = torch.load(tmp_path / "mlp.weightnorm.pt")
    assert "fc1.parametrizations.weight.original0" in state_dict
    model = models.build("mlp")
    apply_weight_norm(model)  # build the architecture, apply weight norm, load the state_dict
    model.load_state_dict(state_dict, strict=True)
    x = models.example_inputs("mlp", 4)
    torch.testing.assert_close(_out(model, *x), _out(source, *x), rtol=1e-5, atol=1e-6)


def test_unsupported_layer_type_is_a_one_line_error_and_nothing_is_written(tmp_path, cli):
    path = tmp_path / "mlp.pt"
    torch.save(models.build("mlp"), path)
    before = sha256(path)
    result = cli("weightnorm", "apply", path, "--layer-type", "Embedding")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: weight norm is not supported on Embedding")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"] and sha256(path) == before


def test_timm_name_with_weights_goes_through_apply_then_remove(tmp_path, cli):
    """``timm:NAME --weights FILE`` as for the other commands; apply's state_dict, weight norm removed, loads into
    the architecture timm builds and computes what the weights did."""
    from safetensors.torch import save_file

    from normsurgeon.io.timm_models import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False).eval()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    spec = ("timm:resnet10t", "--weights", tmp_path / "w.safetensors")

    applied = cli("weightnorm", "apply", *spec, "--layer-type", "conv2d", "-o", tmp_path / "wn.pt", "--json")
    nothing = cli("weightnorm", "remove", *spec, "-o", tmp_path / "unused.pt")
    removed = cli("weightnorm", "remove", tmp_path / "wn.pt", "--json")

    assert applied.returncode == 0, applied.stderr
    assert any(n.startswith("timm:resnet10t built by timm") for n in json.loads(applied.stdout)["notes"])
    assert nothing.returncode == 5 and "has no weight-normed layer" in nothing.stderr
    assert not (tmp_path / "unused.pt").exists()
    assert removed.returncode == 0, removed.stderr
    plain = timm.create_model("resnet10t", pretrained=False).eval()
    plain.load_state_dict(torch.load(tmp_path / "wn.plain.pt"), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_out(plain, x), _out(source, x), rtol=1e-4, atol=1e-5)


def test_remove_with_config_builds_the_architecture_instead_of_rewriting_bare_keys(tmp_path, cli):
    """--config says MODEL is that architecture's weights: they must fit it, not be rewritten as a bare state_dict."""
    from safetensors.torch import save_file
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               vocab_size=50, architectures=["BertModel"]).save_pretrained(tmp_path / "config")
    save_file(models.build("hifigan").state_dict(), tmp_path / "generator.safetensors")

    result = cli("weightnorm", "remove", tmp_path / "generator.safetensors", "--config", tmp_path / "config")

    assert result.returncode == 3 and "missing" in result.stderr, result.stderr
    assert not (tmp_path / "generator.plain.safetensors").exists() and not (tmp_path / "generator.plain.pt").exists()
