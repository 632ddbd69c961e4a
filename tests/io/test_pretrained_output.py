"""convert and weightnorm on a save_pretrained directory (issue 15): a directory is written only where
``from_pretrained`` reloads it as the same model, checked in the command and again here independently;
otherwise ``-o DIR`` is refused (exit 8, nothing written) and the default is a ``.pt`` beside the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from normsurgeon.io.pretrained_output import lost_in_reload

transformers = pytest.importorskip("transformers")

TEXT = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64}
IDS = (torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)),)
AUDIO = (torch.randn(2, 1600, generator=torch.Generator().manual_seed(1)),)
RELOADED = "save_pretrained reloaded vs written"


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT, num_key_value_heads=2))
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(**TEXT))
    if name == "wav2vec2":  # weight-norms its positional conv when it is built
        config = transformers.Wav2Vec2Config(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
        return transformers.Wav2Vec2Model(config)
    raise KeyError(name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    folders = {}
    for name in ("llama", "bert", "wav2vec2"):
        model = _build(name).eval()
        folder = tmp_path_factory.mktemp("models") / name
        model.save_pretrained(folder)
        folders[name] = (folder, model)
    return folders


def _first(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def _report(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _assert_refused(result, out: Path) -> None:
    assert result.returncode == 8 and "reloads different" in result.stderr and not out.exists()
    error = result.stderr.strip().splitlines()[-1]  # the lines above: transformers' progress bar loading MODEL
    assert error.startswith(f"error: not writing {out}: ") and error.endswith(f"-o {out.with_suffix('.pt')} or export "
                                                                               "it to .onnx")


# ------------------------------------------------------------------ what a reload must keep


def test_a_reload_with_the_same_classes_and_tensors_loses_nothing() -> None:
    written = nn.Sequential(nn.Linear(2, 2))
    reloaded = nn.Sequential(nn.Linear(2, 2))
    reloaded.load_state_dict(written.state_dict())
    assert lost_in_reload(written, reloaded) is None


@pytest.mark.parametrize(("written", "reloaded", "says"), [
    (nn.Sequential(nn.Linear(2, 2), nn.Identity()), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
     "rebuilds BatchNorm1d where the written model has Identity at 1"),
    (nn.Sequential(nn.LayerNorm(2, elementwise_affine=False)), nn.Sequential(nn.LayerNorm(2)),
     "2 tensors are initialised afresh (e.g. 0.weight)"),
    (nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2, bias=False)),
     "1 written tensors are not loaded (e.g. 0.bias)"),
])
def test_what_a_reload_loses_is_named(written: nn.Module, reloaded: nn.Module, says: str) -> None:
    assert says in lost_in_reload(written, reloaded)


def test_tensors_that_reload_with_other_values_are_named() -> None:
    written, reloaded = nn.Linear(2, 2), nn.Linear(2, 2)
    reloaded.load_state_dict(written.state_dict())
    with torch.no_grad():
        reloaded.bias[0] += 1
    assert lost_in_reload(written, reloaded) == "1 tensors reload with other values (e.g. bias)"


# ------------------------------------------------------------------ convert


def test_convert_with_nothing_to_change_writes_a_directory_that_reloads_the_same(saved: dict, tmp_path: Path,
                                                                                cli) -> None:
    folder, model = saved["bert"]
    out = tmp_path / "converted"

    report = _report(cli("convert", folder, "--to", "layernorm", "-o", out, "--json"))

    assert report["output"] == str(out) and report["checks"][-1]["label"] == RELOADED
    reloaded = transformers.BertModel.from_pretrained(out).eval()  # independently of normsurgeon
    torch.testing.assert_close(_first(reloaded, IDS), _first(model, IDS), rtol=0, atol=0)


def test_convert_to_native_is_not_written_as_a_directory_the_class_would_rebuild(saved: dict, tmp_path: Path,
                                                                                 cli) -> None:
    """LlamaForCausalLM builds LlamaRMSNorm: a directory would reload the hand-written norms, not torch's."""
    folder, model = saved["llama"]
    given = tmp_path / "native"

    _assert_refused(cli("convert", folder, "--to", "native", "-o", given), given)
    work = tmp_path / "work"
    work.mkdir()
    (work / "llama").symlink_to(folder, target_is_directory=True)
    report = _report(cli("convert", work / "llama", "--to", "native", "--json"))

    written = work / "llama.converted.pt"
    assert report["output"] == str(written) and not (work / "llama.converted").exists()
    assert any("instead of a save_pretrained directory" in n and "LlamaRMSNorm" in n for n in report["notes"])
    converted = torch.load(written, weights_only=False)
    assert type(converted.model.norm) is nn.RMSNorm
    torch.testing.assert_close(_first(converted, IDS), _first(model, IDS), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ fold --affine on BERT


def test_fold_affine_on_bert_writes_a_directory_that_reloads_the_same(saved: dict, tmp_path: Path, cli) -> None:
    """BERT's post-norm LayerNorms each feed the residual stream too, so no affine folds: the same model."""
    folder, model = saved["bert"]
    out = tmp_path / "folded"

    report = _report(cli("fold", folder, "--affine", "-o", out, "--json"))

    assert report["checks"][-1]["label"] == RELOADED and (out / "config.json").exists()
    reloaded = transformers.BertModel.from_pretrained(out).eval()
    torch.testing.assert_close(_first(reloaded, IDS), _first(model, IDS), rtol=0, atol=0)


def test_writing_and_reloading_a_directory_prints_no_transformers_progress_bar(saved: dict, tmp_path: Path,
                                                                             cli) -> None:
    """save_pretrained draws "Writing model shards" and from_pretrained "Loading weights" on stderr by default."""
    folder, _ = saved["llama"]
    out = tmp_path / "folded"

    result = cli("fold", folder, "--affine", "-o", out)

    assert result.returncode == 0 and (out / "config.json").exists()
    assert "Writing model shards" not in result.stderr and "Loading weights" not in result.stderr, result.stderr


# ------------------------------------------------------------------ weightnorm


def test_weightnorm_remove_on_a_class_that_weight_norms_itself_is_written_as_a_module(saved: dict, tmp_path: Path,
                                                                                     cli) -> None:
    """Wav2Vec2Model re-applies weight norm when from_pretrained builds it: the plain weight would not load."""
    folder, model = saved["wav2vec2"]
    given = tmp_path / "plain"

    _assert_refused(cli("weightnorm", "remove", folder, "-o", given), given)
    out = tmp_path / "plain.pt"
    report = _report(cli("weightnorm", "remove", folder, "-o", out, "--json"))

    assert report["passed"] and report["output_form"] == "module" and report["changes"]
    assert any("inferred from the model's config" in n for n in report["notes"])
    plain = torch.load(out, weights_only=False)
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())
    torch.testing.assert_close(_first(plain, AUDIO), _first(model, AUDIO), rtol=1e-5, atol=1e-5)


def test_weightnorm_remove_default_output_is_a_module_beside_the_folder(saved: dict, tmp_path: Path, cli) -> None:
    folder, _ = saved["wav2vec2"]
    (tmp_path / "w2v").symlink_to(folder, target_is_directory=True)

    report = _report(cli("weightnorm", "remove", tmp_path / "w2v", "--json"))

    assert report["output"] == str(tmp_path / "w2v.plain.pt") and (tmp_path / "w2v.plain.pt").is_file()
    assert any("instead of a save_pretrained directory" in n and "ParametrizedConv1d" in n for n in report["notes"])
    assert not list(tmp_path.glob(".w2v.plain*"))  # the staging folder is gone


def test_weightnorm_apply_on_a_directory_writes_a_state_dict_and_refuses_a_directory(saved: dict, tmp_path: Path,
                                                                                    cli) -> None:
    folder, _ = saved["bert"]
    given = tmp_path / "normed"

    refused = cli("weightnorm", "apply", folder, "-o", given, "--layer-type", "linear")
    out = tmp_path / "normed.pt"
    report = _report(cli("weightnorm", "apply", folder, "-o", out, "--layer-type", "linear", "--json"))

    assert refused.returncode == 8 and "does not build the tensors weight norm adds" in refused.stderr
    assert not given.exists() and report["output_form"] == "state_dict"
    assert any("not a save_pretrained directory" in n for n in report["notes"])
    assert any(k.endswith("parametrizations.weight.original0") for k in torch.load(out))
