"""Weight norm: apply is exact, remove gives the original function back, DDI normalizes, mean-only BN."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import models
from models.hifigan import Generator
from normsurgeon.errors import UsageError
from normsurgeon.modules import MeanOnlyBatchNorm
from normsurgeon.norms import is_batchnorm_like
from normsurgeon.passes.weight_norm import apply_weight_norm, bake, remove_weight_norm
from normsurgeon.report import SkipReason

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
ROUND_TRIP_MODELS = ["resnet18", "mlp", "convtranspose_decoder", "convtranspose1d_decoder", "prenorm_transformer"]


def _out(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def _picklable(model: nn.Module) -> bool:
    torch.save(model, io.BytesIO())
    return True


@pytest.mark.parametrize("name", ROUND_TRIP_MODELS)
def test_apply_is_exact_and_remove_returns_the_original_function(name):
    model, x = models.build(name), models.example_inputs(name, 2)
    expected = _out(model, *x)
    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    applied = apply_weight_norm(model, example_inputs=x)
    assert len(applied.changed("weight-normed")) == len(layers) and applied.skipped == []
    assert applied.check.passed and applied.check.label == "weight-normed vs original"
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    torch.testing.assert_close(_out(model, *x), expected, rtol=1e-4, atol=1e-5)
    removed = remove_weight_norm(model, example_inputs=x)
    assert len(removed.changes) == len(layers) and removed.check.passed
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(_out(model, *x), expected, rtol=1e-4, atol=1e-5)
    assert _picklable(model)


def test_g_is_per_output_channel_for_every_layer_type():
    layers = {
        "conv2d": (nn.Conv2d(3, 6, 3), (6, 1, 1, 1)),
        "conv3d": (nn.Conv3d(2, 4, 2), (4, 1, 1, 1, 1)),
        "convT1d": (nn.ConvTranspose1d(4, 6, 3), (1, 6, 1)),
        "convT2d-grouped": (nn.ConvTranspose2d(4, 8, 3, groups=2), (1, 4, 1, 1)),
        "linear": (nn.Linear(5, 7), (7, 1)),
    }
    for label, (layer, g_shape) in layers.items():
        report = apply_weight_norm(layer)
        assert tuple(layer.parametrizations.weight.original0.shape) == g_shape, label
        assert report.check.passed and "per-layer weights" in report.check.label
    assert "shared by the 2 output channels" in apply_weight_norm(nn.ConvTranspose2d(4, 8, 3, groups=2)).changes[0].detail


def test_all_zero_output_channels_stay_zero_instead_of_nan():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[2].zero_()
    x = torch.randn(2, 3, 6, 6)
    expected = _out(conv, x)
    report = apply_weight_norm(conv, example_inputs=(x,))
    assert "1 all-zero slice(s)" in report.changes[0].detail
    torch.testing.assert_close(_out(conv, x), expected)


@pytest.mark.parametrize("layer_type", [nn.Embedding, nn.LayerNorm, "embedding", "batchnorm2d"])
def test_unsupported_layer_types_are_refused(layer_type):
    with pytest.raises(UsageError, match="weight norm is not supported on .*conv, conv-transpose and linear"):
        apply_weight_norm(models.build("mlp"), layer_types=[layer_type])


def test_layer_types_restrict_what_is_normed_and_skips_say_why():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 2, 3))
    parametrizations.weight_norm(model[0])
    report = apply_weight_norm(model, layer_types=["linear"])
    assert report.changes == []
    assert [(s.module, s.reason) for s in report.skipped] == [("0", SkipReason.ALREADY_WEIGHT_NORMED)]
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert {s.reason for s in apply_weight_norm(tied).skipped} == {SkipReason.SHARED_PARAMETER}


def test_a_weight_that_is_a_view_of_another_is_skipped_as_shared():
    """Same rule as the folds (surgery.shared_parameter_ids): memory shared through a view counts, not only
    one Parameter registered twice; weight-norming either would leave the other reading the raw weight."""
    model = nn.Sequential(nn.Conv1d(4, 4, 1, bias=False), nn.Conv1d(4, 4, 1, bias=False), nn.Linear(3, 3))
    model[1].weight = nn.Parameter(model[0].weight.view(4, 4, 1))  # an alias, not the same Parameter
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = apply_weight_norm(model)
    assert [(s.module, s.reason, s.detail) for s in report.skipped] == [
        ("0", SkipReason.SHARED_PARAMETER, "weight norm would untie it"),
        ("1", SkipReason.SHARED_PARAMETER, "weight norm would untie it"),
    ]
    assert [c.module for c in report.changes] == ["2"]
    assert model[1].weight.data_ptr() == model[0].weight.data_ptr()  # still one tensor
    assert all(torch.equal(before[f"{i}.weight"], model[i].weight) for i in (0, 1))


@pytest.mark.parametrize("name", ["hifigan", "hifigan_legacy"], ids=["parametrizations", "hook-api"])
def test_remove_on_real_weight_normed_generators(name):
    model, x = models.build(name), models.example_inputs(name, 2)
    expected = _out(model, *x)
    report = remove_weight_norm(model, example_inputs=x)
    assert len(report.changes) == 20 and report.check.passed
    assert not any(hasattr(m, "weight_g") or parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(_out(model, *x), expected, rtol=1e-5, atol=1e-6)
    assert _picklable(model)


def test_remove_without_inputs_checks_every_layer_weight():
    report = remove_weight_norm(models.build("hifigan"))
    assert report.check.passed and "no example inputs" in report.check.label
    assert len(report.check.outputs) == 20


@pytest.mark.parametrize("name", ["hifigan", "hifigan_legacy"], ids=["original0-1", "weight_g-weight_v"])
def test_bare_state_dict_remove_loads_strictly_into_the_plain_architecture(name):
    source, x = models.build(name), models.example_inputs(name, 3)
    state_dict = source.state_dict()
    report = remove_weight_norm(state_dict)
    assert report.check.passed and len(report.changes) == 20
    assert not any("original" in k or k.endswith(("_g", "_v")) for k in report.model)
    assert list(report.model)[:2] == ["conv_pre.bias", "conv_pre.weight"]
    plain = Generator().eval()
    plain.load_state_dict(report.model, strict=True)
    torch.testing.assert_close(_out(plain, *x), _out(source, *x), rtol=1e-5, atol=1e-6)
    assert set(state_dict) == set(source.state_dict())  # the input is not modified


def test_bake_reads_the_norm_dims_from_g():
    v = torch.randn(4, 3, 5, dtype=torch.float64)
    for dim in (0, 1, 2, -1):
        g = torch.norm_except_dim(v, 2, dim) * 1.7
        torch.testing.assert_close(bake(g, v), torch._weight_norm(v, g, dim))


# --------------------------------------------------------------------------- transformers models


def _randomize_g(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("original0", "weight_g")):
                p.mul_(torch.rand(p.shape, generator=generator) + 0.5)


def _wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    return Wav2Vec2Model(config), (torch.randn(2, 400),), 1


def _encodec():
    from transformers import EncodecConfig, EncodecModel

    config = EncodecConfig(target_bandwidths=[24.0], sampling_rate=8000, audio_channels=1, hidden_size=16,
                           num_filters=4, num_residual_layers=1, upsampling_ratios=[2, 2], codebook_size=16,
                           codebook_dim=16, num_lstm_layers=1)
    return EncodecModel(config), (torch.randn(1, 1, 64),), 20


def _speecht5_hifigan():
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    config = SpeechT5HifiGanConfig(model_in_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2],
                                   upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
                                   resblock_dilation_sizes=[[1, 3]])
    model = SpeechT5HifiGan(config)
    model.apply_weight_norm()
    return model, (torch.randn(2, 10, 8),), 12


@pytest.mark.slow
@pytest.mark.parametrize("build", [_wav2vec2, _encodec, _speecht5_hifigan], ids=["wav2vec2-pos-conv", "encodec", "speecht5-hifigan"])
def test_remove_on_transformers_models(build):
    torch.manual_seed(0)
    model, x, count = build()
    model.eval()
    _randomize_g(model)
    expected = _out(model, *x)
    report = remove_weight_norm(model, example_inputs=x)
    assert len(report.changes) == count and report.check.passed, report.check
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    got = _out(model, *x)
    for key in ("last_hidden_state", "audio_values"):
        if isinstance(expected, dict) and key in expected:
            expected, got = expected[key], got[key]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert _picklable(model)


# --------------------------------------------------------------------------- data-dependent init


class Net(nn.Module):
    """Conv → ReLU → grouped ConvTranspose → ReLU → Linear, to init in forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8 * 8 * 8, 5)  # registered first: forward order must come from the trace
        self.conv = nn.Conv2d(3, 8, 3)
        self.up = nn.ConvTranspose2d(8, 8, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(torch.relu(self.conv(x))))
        return self.head(h.flatten(1))


def _channel_stats(model: Net, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    outputs = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o))
             for n in ("conv", "up", "head")]
    _out(model, x)
    for h in hooks:
        h.remove()
    stats = {}
    for name, o in outputs.items():
        t = o.movedim(-1 if o.dim() == 2 else 1, 0).flatten(1).double()
        stats[name] = (t.mean(1), t.std(1, unbiased=False))
    return stats


def test_data_dependent_init_gives_zero_mean_unit_std_per_channel():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(64, 3, 8, 8) * 2 + 1
    report = apply_weight_norm(model, init_data=x)
    assert [c.module for c in report.changed("initialised")] == ["conv", "up", "head"]
    stats = _channel_stats(model, x)
    tolerance = 1e-4  # float32 forward passes; measured ~1e-7
    for name in ("conv", "head"):
        mean, std = stats[name]
        assert mean.abs().max() < tolerance and (std - 1).abs().max() < tolerance, name
    mean, std = stats["up"]  # groups=2: a g is shared by 2 channels, their pooled variance is 1
    assert mean.abs().max() < tolerance
    pooled = std.pow(2).view(2, 4).mean(0).sqrt()
    assert (pooled - 1).abs().max() < tolerance
    assert "pooled" in report.changed("initialised")[1].detail


def test_data_dependent_init_reads_a_file_or_a_folder(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    torch.save(x[:16], tmp_path / "a.pt")
    torch.save(x[16:], tmp_path / "b.pt")
    from_folder, from_tensor = Net(), Net()
    from_tensor.load_state_dict(from_folder.state_dict())
    apply_weight_norm(from_folder, init_data=tmp_path)
    apply_weight_norm(from_tensor, init_data=x)
    torch.testing.assert_close(_out(from_folder, x), _out(from_tensor, x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- mean-only BatchNorm


def test_mean_only_batchnorm_subtracts_batch_mean_in_training_and_running_mean_in_eval():
    norm = MeanOnlyBatchNorm(3, momentum=None)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(8, 3, 4) * 3 + torch.tensor([5.0, -1.0, 2.0]).view(1, 3, 1)
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2)), norm.bias.detach())
    torch.testing.assert_close(y, x - x.mean(dim=(0, 2), keepdim=True) + norm.bias.detach().view(1, 3, 1))  # no division
    torch.testing.assert_close(norm.running_mean, x.mean(dim=(0, 2)))
    assert int(norm.num_batches_tracked) == 1
    norm.eval()
    torch.testing.assert_close(norm(x), x - norm.running_mean.view(1, 3, 1) + norm.bias.detach().view(1, 3, 1))


def test_mean_only_batchnorm_exports_to_onnx_as_sub_and_add(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MeanOnlyBatchNorm(4)).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(4))
        model[1].bias.copy_(torch.randn(4))
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops and {"Sub", "Add"} <= set(ops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _out(model, x), rtol=1e-5, atol=1e-5)


def test_mean_only_bn_keeps_eval_outputs_when_the_scale_moves_into_g_and_warns():
    model, x = models.build("mlp"), models.example_inputs("mlp", 4)
    expected = _out(model, *x)
    report = apply_weight_norm(model, example_inputs=x, mean_only_bn=True)
    assert [c.module for c in report.changed("mean-only")] == ["bn1", "bn2"]
    assert isinstance(model.bn1, MeanOnlyBatchNorm) and isinstance(model.bn2, MeanOnlyBatchNorm)
    torch.testing.assert_close(_out(model, *x), expected, rtol=1e-4, atol=1e-5)
    warning = next(n for n in report.notes if n.startswith("warning:"))
    assert "no longer divides by the batch std" in warning and "retraining" in warning.replace("(re)training", "retraining")
    assert float(report.facts["mean-only BN max abs diff"]) < 1e-4


def test_mean_only_bn_that_cannot_absorb_the_scale_reports_the_measured_difference():
    model, x = models.build("convtranspose_decoder"), models.example_inputs("convtranspose_decoder", 2)
    report = apply_weight_norm(model, example_inputs=x, mean_only_bn=True)
    assert len(report.changed("mean-only")) == 3
    inexact = [c.module for c in report.changed("mean-only") if "not exact" in c.detail]
    assert inexact == ["up2.1", "up3.1"]  # grouped transposed convs share g across groups
    warning = next(n for n in report.notes if n.startswith("warning:"))
    measured = float(report.facts["mean-only BN max abs diff"])
    assert measured > 1e-2 and f"{measured:.3g}" in warning and "up2.1" in warning
    assert report.check.passed  # the weight-norm step itself stayed exact


def test_mean_only_bn_needs_inputs_and_skips_batchnorms_not_after_weight_norm():
    with pytest.raises(UsageError, match="needs example inputs"):
        apply_weight_norm(models.build("mlp"), mean_only_bn=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    report = apply_weight_norm(model, example_inputs=(torch.randn(2, 3, 6, 6),), mean_only_bn=True)
    assert [(s.module, s.reason) for s in report.skipped] == [("2", SkipReason.NOT_AFTER_WEIGHT_NORM)]


@pytest.mark.skipif(not is_batchnorm_like(MeanOnlyBatchNorm(1)), reason="needs the norms.py change for MeanOnlyBatchNorm")
def test_weight_norm_mean_only_bn_remove_then_fold_gives_the_original_function():
    from normsurgeon import fold_batchnorm

    model, x = models.build("resnet18"), models.example_inputs("resnet18", 2)
    expected = _out(model, *x)
    apply_weight_norm(model, example_inputs=x, mean_only_bn=True)
    remove_weight_norm(model)
    report = fold_batchnorm(copy.deepcopy(model), x)
    assert len(report.changed("folded")) == 20 and report.skipped == []
    torch.testing.assert_close(_out(report.model, *x), expected, rtol=1e-4, atol=1e-4)


def test_removing_from_a_deep_copy_leaves_the_original_working():
    """torch's remove_parametrizations edits the generated class, which a deep copy shares."""
    original = models.build("hifigan")
    inputs = models.example_inputs("hifigan", 2)
    with torch.no_grad():
        expected = original(*inputs)
    remove_weight_norm(copy.deepcopy(original))
    with torch.no_grad():
        torch.testing.assert_close(original(*inputs), expected, rtol=0, atol=0)
