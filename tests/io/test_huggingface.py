"""Hugging Face save_pretrained directories and safetensors files as MODEL (issue 15): loaded offline,
without running repository code, matching the model that was saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from normsurgeon.errors import LoadError, UnsafePickleError, UsageError
from normsurgeon.io.loading import load_model

transformers = pytest.importorskip("transformers")

TEXT = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64}


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    ids = (torch.randint(0, 64, (2, 8)),)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT, num_key_value_heads=2)).eval(), ids
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(**TEXT)).eval(), ids
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(config).eval(), ids
    if name == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
        return transformers.ResNetModel(config).eval(), (torch.randn(2, 3, 32, 32),)
    raise KeyError(name)


def first_output(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module, tuple]]:
    folders = {}
    for name in ("llama", "bert", "gpt2", "resnet"):
        model, inputs = build(name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        folders[name] = (folder, model, inputs)
    return folders


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2", "resnet"])
@pytest.mark.parametrize("given", ["folder", "config.json", "model.safetensors"])
def test_a_save_pretrained_directory_loads_as_the_model_that_was_saved(name: str, given: str, saved: dict) -> None:
    folder, model, inputs = saved[name]
    path = folder if given == "folder" else folder / given

    loaded = load_model(path)

    assert loaded.form == "pretrained_dir" and loaded.source == folder
    assert type(loaded.model) is type(model) and not loaded.model.training
    torch.testing.assert_close(first_output(loaded.model, inputs), first_output(model, inputs), rtol=0, atol=0)


def test_sharded_safetensors_load(tmp_path: Path) -> None:
    model, inputs = build("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()

    loaded = load_model(tmp_path).model

    torch.testing.assert_close(first_output(loaded, inputs), first_output(model, inputs), rtol=0, atol=0)


def test_pytorch_model_bin_is_checked_tensor_only_before_transformers_reads_it(tmp_path: Path) -> None:
    model, inputs = build("bert")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    loaded = load_model(tmp_path).model
    torch.testing.assert_close(first_output(loaded, inputs), first_output(model, inputs), rtol=0, atol=0)

    marker = tmp_path / "PWNED"
    torch.save({"x": _Payload(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError):
        load_model(tmp_path)
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_config_asking_for_custom_code_is_refused(saved: dict, tmp_path: Path) -> None:
    folder, _, _ = saved["bert"]
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(UnsafePickleError) as info:
        load_model(tmp_path)

    assert "custom code" in str(info.value) and "\n" not in str(info.value)


def test_an_unknown_architecture_is_named(saved: dict, tmp_path: Path) -> None:
    folder, _, _ = saved["bert"]
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["NoSuchModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(LoadError) as info:
        load_model(tmp_path)

    assert "NoSuchModel" in str(info.value)


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def build_two_layers() -> nn.Module:
    return TwoLayers().eval()


def test_a_safetensors_file_with_a_factory(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = TwoLayers().eval()
    save_file(model.state_dict(), tmp_path / "weights.safetensors")

    loaded = load_model(tmp_path / "weights.safetensors", factory=f"{__name__}:build_two_layers")

    assert loaded.form == "state_dict+factory"
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    with pytest.raises(UsageError) as info:
        load_model(tmp_path / "weights.safetensors")
    assert "--factory" in str(info.value)


@pytest.mark.parametrize("name", ["llama", "bert", "resnet"])
def test_cli_on_a_directory_needs_no_other_flag(name: str, saved: dict, tmp_path: Path) -> None:
    """Inputs come from the config (token ids, pixel values) and the output lands beside the folder."""
    from click.testing import CliRunner

    import normsurgeon.cli

    folder, _, _ = saved[name]
    out = tmp_path / "out.pt"
    runner = CliRunner()
    inspected = runner.invoke(normsurgeon.cli.main, ["inspect", str(folder)], env={"COLUMNS": "200"})
    folded = runner.invoke(normsurgeon.cli.main, ["fold", str(folder), "-o", str(out), "--json"])

    assert inspected.exit_code == 0, inspected.stderr
    assert folded.exit_code == 0, folded.stderr
    notes = json.loads(folded.stdout)["notes"]
    assert any("inferred from the model's config" in n for n in notes) and out.exists()


def test_default_output_of_a_directory_is_a_file_beside_it(saved: dict) -> None:
    from normsurgeon.io.saving import default_output_path

    folder, _, _ = saved["bert"]
    assert default_output_path(folder / "config.json", "folded") == folder.with_name(folder.name + ".folded.pt")
    assert default_output_path(folder, "opt", ".onnx") == folder.with_name(folder.name + ".opt.onnx")


@pytest.mark.slow
def test_a_causal_lm_directory_exports_its_no_cache_forward_without_flags(saved: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import normsurgeon.cli

    folder, _, _ = saved["llama"]
    result = CliRunner().invoke(normsurgeon.cli.main, ["export", str(folder), "-o", str(tmp_path / "llama.onnx"),
                                                       "--json"])

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert any("use_cache=False" in n for n in report["notes"]) and report["passed"]


def _fold_cli(*args: object):
    from click.testing import CliRunner

    import normsurgeon.cli

    return CliRunner().invoke(normsurgeon.cli.main, ["fold", *map(str, args), "--json"])


def test_fold_affine_writes_a_directory_that_from_pretrained_reloads_the_same(saved: dict, tmp_path: Path) -> None:
    folder, model, inputs = saved["llama"]
    out = tmp_path / "folded"

    result = _fold_cli(folder, "--affine", "-o", out)

    assert result.exit_code == 0, result.stderr
    assert (out / "config.json").exists() and not list(tmp_path.glob(".folded*"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()  # independently of normsurgeon
    torch.testing.assert_close(first_output(reloaded, inputs), first_output(model, inputs), rtol=1e-4, atol=1e-5)
    assert json.loads(result.stdout)["checks"][-1]["label"] == "save_pretrained reloaded vs written"


def test_a_fold_that_would_reload_wrong_is_not_written_as_a_directory(tmp_path: Path) -> None:
    """transformers builds ResNet's convs without a bias: the folded BN's shift would be dropped on reload."""
    from tests.helpers import give_realistic_stats

    model, inputs = build("resnet")
    folder = tmp_path / "trained"
    give_realistic_stats(model, *inputs).save_pretrained(folder)
    given = tmp_path / "folded"

    refused = _fold_cli(folder, "-o", given)

    assert refused.exit_code == 8 and "reloads different" in refused.stderr and not given.exists()
    fallback = _fold_cli(folder)
    assert fallback.exit_code == 0, fallback.stderr
    assert (tmp_path / "trained.folded.pt").exists() and not (tmp_path / "trained.folded").exists()
    assert any("instead of a save_pretrained directory" in n for n in json.loads(fallback.stdout)["notes"])


# --------------------------------------------------------------------------- a .safetensors file with --config


def _weights_and_config(saved: dict, name: str, tmp_path: Path, **changes: object) -> tuple[Path, Path]:
    """The model.safetensors of ``saved[name]`` alone in one folder, its config.json (with ``changes``) in another."""
    folder = saved[name][0]
    weights, config_dir = tmp_path / "weights" / f"{name}.safetensors", tmp_path / "config"
    weights.parent.mkdir()
    config_dir.mkdir()
    weights.write_bytes((folder / "model.safetensors").read_bytes())
    config = {**json.loads((folder / "config.json").read_text()), **changes}
    (config_dir / "config.json").write_text(json.dumps(config))
    return weights, config_dir


@pytest.mark.parametrize("name", ["gpt2", "resnet"])
@pytest.mark.parametrize("given", ["folder", "config.json"])
def test_a_safetensors_file_with_a_config_loads_as_the_model_that_was_saved(name: str, given: str, saved: dict,
                                                                           tmp_path: Path) -> None:
    """GPT-2's lm_head is tied to its embedding: save_pretrained leaves it out of the file, and that is no miss."""
    _, model, inputs = saved[name]
    weights, config_dir = _weights_and_config(saved, name, tmp_path)
    config = config_dir if given == "folder" else config_dir / "config.json"

    loaded = load_model(weights, config=config)

    assert loaded.form == "safetensors+config" and loaded.source == weights
    assert type(loaded.model) is type(model) and not loaded.model.training
    assert any(type(model).__name__ in n and str(weights) in n for n in loaded.notes)
    torch.testing.assert_close(first_output(loaded.model, inputs), first_output(model, inputs), rtol=0, atol=0)


def test_cli_on_a_safetensors_file_with_a_config_infers_its_inputs(saved: dict, tmp_path: Path, cli) -> None:
    weights, config_dir = _weights_and_config(saved, "bert", tmp_path)

    result = cli("inspect", weights, "--config", config_dir, "--json")

    assert result.returncode == 0, result.stderr
    assert any("inferred from the model's config" in n for n in json.loads(result.stdout)["notes"])


@pytest.mark.parametrize("case, code, says", [
    ("not safetensors", 2, "--config goes with a .safetensors MODEL"),
    ("no config", 2, "no config.json there"),
    ("with factory", 2, "give --factory or --config, not both"),
    ("unknown architecture", 3, "names architectures ['NoSuchModel']"),
    ("other architecture", 3, "(BertModel): missing keys embeddings.LayerNorm.bias"),
    ("other shapes", 3, "size mismatch for model.embed_tokens.weight"),
])
def test_a_config_that_does_not_fit_is_one_clear_line(case: str, code: int, says: str, saved: dict,
                                                      tmp_path: Path, cli) -> None:
    changes = {"unknown architecture": {"architectures": ["NoSuchModel"]},
               "other shapes": {"vocab_size": 80}}.get(case, {})
    weights, config_dir = _weights_and_config(saved, "llama", tmp_path, **changes)
    if case == "not safetensors":
        weights = weights.with_suffix(".pt")
        torch.save(saved["llama"][1].state_dict(), weights)
    args: list[object] = [weights, "--config", config_dir]
    if case == "no config":
        args[-1] = tmp_path
    elif case == "with factory":
        args += ["--factory", f"{__name__}:build_two_layers"]
    elif case == "other architecture":
        args[-1] = saved["bert"][0]

    result = cli("inspect", *args)

    assert result.returncode == code, result.stderr
    assert says in result.stderr and result.stderr.strip().count("\n") == 0


# --------------------------------------------------------------------------- inferred inputs of an audio codec


def test_inspect_an_encodec_directory_infers_channels_first_audio(tmp_path: Path, cli) -> None:
    """EnCodec's forward wants input_values of (batch, audio_channels, length): one second at its sampling rate."""
    from normsurgeon.io.inputs import inputs_from_config
    from tests.hf_models import encodec_model

    model = encodec_model()
    model.save_pretrained(tmp_path / "encodec")
    inferred = inputs_from_config(model)
    assert inferred is not None and inferred.kwargs["input_values"].shape == (1, 1, 8000)

    result = cli("inspect", tmp_path / "encodec", "--json")

    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any("inferred from the model's config: one second of 8000 Hz audio" in n and "1x1x8000" in n
               for n in notes), notes
