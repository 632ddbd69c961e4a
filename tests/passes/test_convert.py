"""Norm conversions: exact ones match the original (fp32: atol=rtol=1e-5 on fresh inputs, and the
pass's own check), approximate ones need ``approximate=True`` and say how far off they are."""

from __future__ import annotations

import copy

import pytest
import torch
from rich.console import Console
from torch import nn

import models
from models.calibrate import randomize_affine
from normsurgeon.errors import PreconditionError, UsageError
from normsurgeon.modules import ChannelsFirstLayerNorm, FrozenBatchNorm
from normsurgeon.passes.convert import convert_norms
from normsurgeon.recognize import NormKind
from normsurgeon.render import print_check
from normsurgeon.report import SkipReason
from tests.helpers import give_realistic_stats
from tests.hf_models import hf_inputs, hf_model
from tests.norm_zoo import ConvNeXtLayerNorm, FrozenBatchNorm2d, PlainLayerNorm, RMSNorm


def _run(model: nn.Module, inputs: tuple | dict):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _converted(model: nn.Module, inputs, fresh, **options):
    original = copy.deepcopy(model)
    report = convert_norms(model, inputs, **options)
    assert report.check.passed
    torch.testing.assert_close(_run(model, fresh), _run(original, fresh), rtol=1e-5, atol=1e-5)
    return report


# ------------------------------------------------------------------------------- hand-written -> native








def _conv_then(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.Conv2d(8, 4, 1)).eval()


NATIVE_CASES = {
    # name -> (build, inputs, fresh inputs, the classes that must be gone, the class that replaces them)
    "models-llama": (lambda: models.build("llama"), models.example_inputs("llama", 2), models.example_inputs("llama", 3),
                     "LlamaRMSNorm", nn.RMSNorm),
    "hf-llama": (lambda: hf_model("llama"), hf_inputs("llama"), hf_inputs("llama", 1), "LlamaRMSNorm", nn.RMSNorm),
    "hf-t5": (lambda: hf_model("t5"), hf_inputs("t5"), hf_inputs("t5", 1), "T5LayerNorm", nn.RMSNorm),
    "hf-convnext": (lambda: hf_model("convnext"), hf_inputs("convnext"), hf_inputs("convnext", 1),
                    "ConvNextLayerNorm", nn.LayerNorm),
    "convnext-original": (lambda: _conv_then(ConvNeXtLayerNorm(8)), (torch.randn(2, 3, 9, 9),), (torch.randn(3, 3, 7, 7),),
                          "ConvNeXtLayerNorm", ChannelsFirstLayerNorm),
    "f-layer-norm": (lambda: nn.Sequential(nn.Linear(6, 16), PlainLayerNorm(16), nn.Linear(16, 2)).eval(),
                     (torch.randn(4, 6),), (torch.randn(5, 6),), "PlainLayerNorm", nn.LayerNorm),
    "frozen-batchnorm2d": (lambda: _conv_then(FrozenBatchNorm2d(8)), (torch.randn(2, 3, 9, 9),), (torch.randn(3, 3, 7, 7),),
                           "FrozenBatchNorm2d", FrozenBatchNorm),
}


@pytest.mark.parametrize("case", NATIVE_CASES, ids=list(NATIVE_CASES))
def test_hand_written_norms_become_torch_layers_exactly(case):
    build, inputs, fresh, old_class, new_class = NATIVE_CASES[case]
    model = build()
    count = sum(type(m).__name__ == old_class for m in model.modules())
    report = _converted(model, inputs, fresh, to="native")
    assert not any(type(m).__name__ == old_class for m in model.modules())
    assert len(report.changed("converted")) == count > 0
    assert sum(isinstance(m, new_class) for m in model.modules()) >= count
    assert report.check.max_abs_diff <= 1e-5


def test_llama_rmsnorm_to_native_keeps_eps_weight_and_dtype_in_bf16():
    model = hf_model("llama").to(torch.bfloat16)
    weight = model.norm.weight.detach().clone()
    report = convert_norms(model, hf_inputs("llama"), to=NormKind.RMSNORM)
    assert report.check.passed and report.check.atol == 1e-2  # bf16 tolerance
    assert isinstance(model.norm, nn.RMSNorm) and model.norm.eps == 1e-6
    assert model.norm.weight.dtype == torch.bfloat16 and torch.equal(model.norm.weight, weight)


# ------------------------------------------------------------------------------- BatchNorm family


def _bn_model(norm: nn.Module, rank: int) -> tuple[nn.Module, torch.Tensor]:
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[rank](3, 6, 3)
    model = nn.Sequential(conv, norm, nn.ReLU())
    x = torch.randn(4, 3, *([6] * (rank - 2)))
    return give_realistic_stats(model, x), x


def _sync_model(rank: int) -> tuple[nn.Module, torch.Tensor]:
    model, x = _bn_model({3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank](6), rank)
    model[1] = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(model[1]))[0].eval()
    return model, x


BN_CASES = {
    "bn2d-to-frozen": (lambda: _bn_model(nn.BatchNorm2d(6), 4), NormKind.FROZEN_BATCHNORM, FrozenBatchNorm),
    "bn-noaffine-to-frozen": (lambda: _bn_model(nn.BatchNorm1d(6, affine=False), 3), NormKind.FROZEN_BATCHNORM, FrozenBatchNorm),
    "bn3d-to-sync": (lambda: _bn_model(nn.BatchNorm3d(6), 5), NormKind.SYNC_BATCHNORM, nn.SyncBatchNorm),
    "sync-to-bn1d": (lambda: _sync_model(3), NormKind.BATCHNORM, nn.BatchNorm1d),
    "sync-to-bn2d": (lambda: _sync_model(4), NormKind.BATCHNORM, nn.BatchNorm2d),
    "sync-to-bn3d": (lambda: _sync_model(5), NormKind.BATCHNORM, nn.BatchNorm3d),
    "frozen-to-bn2d": (lambda: (_conv_then(FrozenBatchNorm2d(8)), torch.randn(2, 3, 7, 7)), NormKind.BATCHNORM, nn.BatchNorm2d),
}


@pytest.mark.parametrize("case", BN_CASES, ids=list(BN_CASES))
def test_batchnorm_family_conversions_are_exact(case):
    build, target, new_class = BN_CASES[case]
    model, x = build()
    report = _converted(model, (x,), (x[:3] * 2 + 1,), to=target)
    (change,) = report.changed("converted")
    assert type(model[1]) is new_class and not model[1].training
    assert change.detail.endswith("exact")


def test_frozen_batchnorm_has_nothing_to_train_and_takes_a_batchnorm_state_dict():
    model, x = _bn_model(nn.BatchNorm2d(6), 4)
    state = copy.deepcopy(model[1].state_dict())
    convert_norms(model, (x,), to="frozen-batchnorm")
    assert list(model[1].parameters()) == []
    fresh = FrozenBatchNorm(6)
    fresh.load_state_dict(state)  # num_batches_tracked is dropped
    assert torch.equal(fresh.running_var, model[1].running_var)


# ------------------------------------------------------------------------------- InstanceNorm <-> GroupNorm


def test_instancenorm_to_groupnorm_and_back_is_exact():
    model = _conv_then(nn.InstanceNorm2d(8, affine=True))
    randomize_affine(model, torch.Generator().manual_seed(0))
    x, fresh = (torch.randn(2, 3, 9, 9),), (torch.randn(3, 3, 7, 7),)
    _converted(model, x, fresh, to="groupnorm")
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 8
    _converted(model, x, fresh, to="instancenorm")
    assert type(model[1]) is nn.InstanceNorm2d and model[1].affine and not model[1].track_running_stats


def test_groupnorm_with_fewer_groups_than_channels_is_not_an_instancenorm():
    report = convert_norms(models.build("groupnorm_unet"), models.example_inputs("groupnorm_unet", 1), to="instancenorm")
    assert report.changes == [] and len(report.skipped) == 10
    assert report.skipped[0].reason is SkipReason.NO_CONVERSION and "4 groups for 16 channels" in report.skipped[0].detail


def test_instancenorm_tracking_running_stats_needs_approximate():
    model = _conv_then(nn.InstanceNorm2d(8, track_running_stats=True))
    give_realistic_stats(model, torch.randn(4, 3, 9, 9))
    with pytest.raises(UsageError, match="tracks running statistics.*--approximate"):
        convert_norms(model, (torch.randn(2, 3, 9, 9),), to="groupnorm")
    assert isinstance(model[1], nn.InstanceNorm2d)
    report = convert_norms(model, (torch.randn(2, 3, 9, 9),), to="groupnorm", approximate=True)
    assert isinstance(model[1], nn.GroupNorm) and report.facts["needs_fine_tuning"]


# ------------------------------------------------------------------------------- LayerNorm -> RMSNorm


def test_prenorm_layernorm_to_rmsnorm_by_centring_the_residual_stream():
    model = models.build("prenorm_transformer")
    report = _converted(model, models.example_inputs("prenorm_transformer", 2),
                        models.example_inputs("prenorm_transformer", 3), to="rmsnorm")
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    assert len(norms) == 5 and all(n.weight is None and n.eps == 1e-5 for n in norms)
    centred = {c.module for c in report.changed("centred")}
    assert centred == {"tok_emb", "pos_emb", "blocks.0.attn.o_proj", "blocks.0.mlp.fc2",
                       "blocks.1.attn.o_proj", "blocks.1.mlp.fc2"}
    assert model.tok_emb.weight.mean(1).abs().max() < 1e-6


def test_only_some_layernorms_converted_still_centres_the_whole_stream():
    model = models.build("prenorm_transformer")
    report = _converted(model, models.example_inputs("prenorm_transformer", 2),
                        models.example_inputs("prenorm_transformer", 3), to="rmsnorm", only="blocks.0.*")
    assert {c.module for c in report.changed("converted")} == {"blocks.0.ln1", "blocks.0.ln2"}
    assert isinstance(model.blocks[1].ln1, nn.LayerNorm) and isinstance(model.blocks[0].ln1, nn.RMSNorm)


def test_gpt2_layernorms_become_rmsnorm_and_ln_f_stays_a_layernorm():
    model = hf_model("gpt2")
    report = _converted(model, hf_inputs("gpt2"), hf_inputs("gpt2", 1), to="rmsnorm")
    assert {c.module for c in report.changed("converted")} == {"h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2"}
    (kept,) = report.skipped
    assert kept.module == "ln_f" and "kept as LayerNorm" in kept.detail
    assert {"wte", "wpe", "h.0.attn.c_proj", "h.1.mlp.c_proj"} <= {c.module for c in report.changed("centred")}


@pytest.mark.parametrize("name", ["postnorm_transformer", "bert"])
def test_postnorm_layernorm_to_rmsnorm_needs_approximate_and_says_why(name):
    model = models.build(name) if name in models.REGISTRY else hf_model(name)
    inputs = models.example_inputs(name, 2) if name in models.REGISTRY else hf_inputs(name)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError) as error:
        convert_norms(model, inputs, to="rmsnorm")
    message = str(error.value)
    assert "LayerNorm -> RMSNorm is not exact" in message and "--approximate" in message and "differ by up to" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    report = convert_norms(model, inputs, to="rmsnorm", approximate=True)
    assert any("post-norm" in note and "needs pre-norm blocks" in note for note in report.notes)
    assert report.facts["needs_fine_tuning"] and report.checks[-1].max_abs_diff > 1e-2


def test_tied_embedding_blocks_centring():
    model = models.build("prenorm_transformer")
    model.head = nn.Linear(32, 100, bias=False)
    model.head.weight = model.tok_emb.weight
    report = convert_norms(model, models.example_inputs("prenorm_transformer", 2), to="rmsnorm", approximate=True)
    assert any("cannot be exact by centring" in n and "tok_emb shares its weight" in n for n in report.notes)


# ------------------------------------------------------------------------------- approximate


def test_batchnorm_to_groupnorm_is_approximate_and_warns_with_the_difference():
    model, inputs = models.build("mlp"), models.example_inputs("mlp", 4)
    with pytest.raises(UsageError, match=r"BatchNorm -> GroupNorm is not exact .* differ by up to [0-9.]+"):
        convert_norms(model, inputs, to="groupnorm")
    assert isinstance(model.bn1, nn.BatchNorm1d)
    weight = model.bn1.weight.detach().clone()
    report = convert_norms(model, inputs, to="groupnorm", approximate=True)
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 32 and torch.equal(model.bn1.weight, weight)
    assert torch.equal(model.bn2.weight, torch.ones(64))  # affine=False BN: unit GroupNorm affine
    (approx,) = report.checks  # no exact conversion happened, so no "exact conversions" check to show
    assert approx.label == "after approximate conversions vs original" and approx.max_abs_diff > 1e-2
    assert approx.atol == float("inf")  # measured, not judged: rendered as informational
    console = Console(record=True, width=200)
    print_check(approx, console)
    text = " ".join(console.export_text().split())  # the title wraps
    assert "(informational: not expected to match)" in text and "differs" in text and "pass" not in text
    assert any(n.startswith("warning: approximate") and "fine-tuning" in n for n in report.notes)


def test_conv_batchnorm_to_layernorm_is_a_channels_first_layernorm():
    model, x = _bn_model(nn.BatchNorm2d(6), 4)
    report = convert_norms(model, (x,), to="layernorm", approximate=True)
    assert type(model[1]) is ChannelsFirstLayerNorm and report.facts["needs_fine_tuning"]


def test_rmsnorm_to_layernorm_is_approximate():
    model = models.build("llama")
    report = convert_norms(model, models.example_inputs("llama", 2), to="layernorm", approximate=True)
    assert isinstance(model.norm, nn.LayerNorm) and model.norm.bias is None
    assert report.facts["approximate"] and "approximate:" in report.changes[0].detail


# ------------------------------------------------------------------------------- bad input




def test_a_look_alike_norm_is_not_converted():
    model = nn.Sequential(nn.Linear(4, 8), RMSNorm(8)).eval()
    report = convert_norms(model, (torch.randn(2, 4),), to="native")
    assert report.changes == [] and isinstance(model[1], RMSNorm)
    (skip,) = report.skipped
    assert skip.reason is SkipReason.NOT_A_NORM and "computes no known norm formula" in skip.detail


def test_unknown_kinds_list_the_valid_ones():
    with pytest.raises(UsageError, match="unknown --to kind 'rms'; valid kinds: batchnorm, .*rmsnorm.*native"):
        convert_norms(models.build("llama"), models.example_inputs("llama", 1), to="rms")
    with pytest.raises(UsageError, match="unknown --from kind"):
        convert_norms(models.build("llama"), models.example_inputs("llama", 1), to="native", from_="foo")


def test_nothing_of_the_requested_kind_is_a_usage_error():
    with pytest.raises(UsageError, match=r"no groupnorm norms in the model \(kinds found: rmsnorm\)"):
        convert_norms(models.build("llama"), models.example_inputs("llama", 1), to="native", from_="groupnorm")


def test_training_mode_and_inplace_false():
    with pytest.raises(PreconditionError, match="eval"):
        convert_norms(models.build("llama").train(), models.example_inputs("llama", 1), to="native")
    model = models.build("llama")
    report = convert_norms(model, models.example_inputs("llama", 1), to="native", inplace=False)
    assert type(model.norm).__name__ == "LlamaRMSNorm" and isinstance(report.model.norm, nn.RMSNorm)


def test_cli_convert_with_everything_already_native_exits_0_with_a_note(tmp_path) -> None:
    """Like fold with nothing to fold: not an error, and the note says why nothing changed."""
    import json

    from click.testing import CliRunner

    import normsurgeon.cli

    path = tmp_path / "native.pt"
    torch.save(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).eval(), path)

    result = CliRunner().invoke(normsurgeon.cli.main, ["convert", str(path), "--to", "native", "--input-shape", "2,8",
                                                       "-o", str(tmp_path / "out.pt"), "--json"])

    assert result.exit_code == 0, result.stderr
    assert any("already" in n and "nothing to convert" in n for n in json.loads(result.stdout)["notes"])


def test_a_failed_exact_check_raises_through_the_runner_with_the_report(monkeypatch):
    """convert raises like every pass (pipeline.raise_if_failed): the error carries the report."""
    from normsurgeon import check as check_module
    from normsurgeon.errors import VerificationError
    from normsurgeon.passes import convert as convert_module

    model, x = nn.Sequential(nn.Linear(8, 8), PlainLayerNorm(8)).eval(), torch.randn(2, 8)
    real = check_module.compare_outputs
    monkeypatch.setattr(convert_module, "compare_outputs",
                        lambda ref, new, **kw: real(ref, new + 1, **kw))  # as if the conversion were off by 1

    with pytest.raises(VerificationError, match="^the converted model differs from the original by 1") as info:
        convert_norms(model, (x,), to="native", inplace=False)
    assert info.value.report.checks[0].label == "exact conversions vs original" and not info.value.report.passed
