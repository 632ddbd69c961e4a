"""``fold`` on real timm CV models (random weights, realistic BatchNorm statistics).

timm builds most of its CNNs from ``BatchNormAct2d`` (a BatchNorm with its activation inside) and
its deployable ones from multi-branch blocks (RepVGG, MobileOne, FastViT). ``fold`` merges the
branches (reparameterize), folds every BatchNorm it can (the activation stays in the norm's place),
and must leave no more BatchNorm-like modules than timm's own ``reparameterize_model`` (which calls
each block's ``fuse()``/``reparameterize()``; a model without one keeps every BN there).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normsurgeon.norms import is_batchnorm_like
from normsurgeon.passes.fold_batchnorm import batchnorms_left, fold_batchnorm
from tests.helpers import count_batchnorm_like, give_realistic_stats

TOLERANCE = 1e-4  # max |folded - original| relative to max |original|, on inputs the fold never saw
SHAPE = (2, 3, 64, 64)  # the smallest square input all these models take

FAST = ["efficientnet_b0", "mobilenetv3_large_100", "regnety_002", "cs3darknet_s", "mobileone_s0", "fastvit_t8"]
HEAVY = ["resnetv2_50", "densenet121", "repvgg_a0"]


def _relative_error(original: nn.Module, folded: nn.Module) -> float:
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = original(x), folded(x)
    return ((got - want).abs().max() / want.abs().max()).item()


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A timm model with random weights and realistic BN statistics, and its example input."""
    import timm  # after normsurgeon, which lets torchvision (imported by timm) load beside the CPU torch

    x = torch.randn(*SHAPE)
    return give_realistic_stats(timm.create_model(name, pretrained=False), x), x


def _check_fold(name: str, *, frozen: bool = False) -> None:
    from timm.layers import freeze_batch_norm_2d
    from timm.utils.model import reparameterize_model

    model, x = _build(name)
    if frozen:
        model = freeze_batch_norm_2d(model).eval()  # BatchNormAct2d -> FrozenBatchNormAct2d
    by_timm = count_batchnorm_like(reparameterize_model(copy.deepcopy(model)))

    report = fold_batchnorm(model, (x,), inplace=False)

    assert report.passed and report.pass_name == "fold"
    left = count_batchnorm_like(report.model)
    assert left == len(batchnorms_left(report)) and left <= by_timm and left < count_batchnorm_like(model), (name, report.skipped)
    assert _relative_error(model, report.model) < TOLERANCE


@pytest.mark.parametrize("name", FAST)
def test_timm_model_folds_to_no_more_batchnorms_than_timm_leaves(name: str) -> None:
    _check_fold(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_heavier_timm_model_folds_to_no_more_batchnorms_than_timm_leaves(name: str) -> None:
    _check_fold(name)


def test_frozen_batchnorm_act_folds_like_the_trainable_one() -> None:
    """timm's FrozenBatchNormAct2d (buffers only, no torch BatchNorm class) is recognised by behaviour too."""
    _check_fold("regnety_002", frozen=True)


def test_batchnorm_act_keeps_its_activation_and_says_so() -> None:
    model, x = _build("efficientnet_b0")

    report = fold_batchnorm(model, (x,), inplace=False)

    first = report.changed("folded")[0]
    assert (first.module, first.into) == ("bn1", "conv_stem")
    assert first.detail == "BatchNorm+SiLU into its producer; its SiLU takes its place"
    assert type(report.model.bn1) is nn.SiLU and type(model.bn1).__name__ == "BatchNormAct2d"  # the original is kept


def test_batchnorm_act_with_no_producer_says_why_and_becomes_affine_then_act() -> None:
    """resnetv2's pre-activation norms read a residual sum: the norm has no producer, and its ReLU
    comes before the next conv, so it cannot fold into that either; --to-affine keeps the ReLU."""
    model, x = _build("resnetv2_50")
    norm = "stages.0.blocks.1.norm1"

    kept = fold_batchnorm(model, (x,), inplace=False)
    affine = fold_batchnorm(model, (x,), inplace=False, unfoldable="affine")

    skip = next(s for s in kept.skipped if s.module == norm)
    assert skip.detail.startswith("BatchNorm+ReLU: its input comes from add()")
    assert skip.detail.endswith("its ReLU runs after the norm inside the module, so the norm cannot fold into "
                                "the layers that read the module's output")
    replaced = affine.model.get_submodule(norm)
    assert [type(m).__name__ for m in replaced] == ["ChannelAffine", "ReLU"]
    assert affine.passed and batchnorms_left(affine) == [] and _relative_error(model, affine.model) < TOLERANCE


# ------------------------------------------------------------------------------- the other commands agree


def test_inspect_offers_to_fold_exactly_the_norms_fold_folds() -> None:
    """resnetv2_50 has both: BatchNorm+ReLU after a conv (folds) and after a residual sum (stays)."""
    from normsurgeon.passes.inspect import inspect_norms

    model, x = _build("resnetv2_50")
    rows = inspect_norms(model, (x,)).norms

    folded = {c.module for c in fold_batchnorm(model, (x,), inplace=False, reparameterize=False).changed("folded")}

    offered = {row.path for row in rows if any(c.startswith("fold into") for c in row.can)}
    assert offered == folded and len(folded) == 32
    assert all(row.evidence.endswith("followed by its ReLU") for row in rows if row.cls == "BatchNormAct2d")


def _repvgg_blocks() -> tuple[nn.Module, torch.Tensor]:
    """A conv+BN stem, then RepVGG blocks with (8 -> 8) and without (8 -> 16, stride 2) an identity BN."""
    from tests.passes.test_reparameterize import RepBlock

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), RepBlock(8, 8),
                          RepBlock(8, 16, stride=2))
    x = torch.randn(*SHAPE)
    return give_realistic_stats(model, x), x


@pytest.mark.parametrize("build, merged", [(_repvgg_blocks, 5), (lambda: _build("repvgg_a0"), 61)],
                         ids=["hand-built", "repvgg_a0"])
def test_inspect_offers_to_merge_or_fold_exactly_the_norms_fold_removes(build, merged) -> None:
    """fold reparameterizes first: inspect says which branch BNs that merges away (from the same plan)."""
    from normsurgeon.passes.inspect import inspect_norms

    model, x = build()
    rows = inspect_norms(model, (x,)).norms
    report = fold_batchnorm(model, (x,), inplace=False)

    kept = {path for path, m in report.model.named_modules() if is_batchnorm_like(m)}
    removed = {path for path, m in model.named_modules() if is_batchnorm_like(m)} - kept
    offered = {row.path for row in rows if any(c.startswith(("fold into", "merged with")) for c in row.can)}
    said_merged = [row for row in rows if any(c.startswith("merged with its branch") for c in row.can)]
    assert report.passed and offered == removed and len(said_merged) == merged
    assert all("fold reparameterizes first" in row.can[0] for row in said_merged)


def test_recalibrate_updates_batchnorm_act_with_its_dropout_off() -> None:
    """Only the norm part runs on batch statistics: a dropout inside the module would make the BNs after it
    see different (random) inputs, so two recalibrations would disagree."""
    from timm.layers import BatchNormAct2d

    from normsurgeon.passes.recalibrate import recalibrate

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, drop_layer=nn.Dropout), nn.Conv2d(8, 4, 3),
                             nn.BatchNorm2d(4)).eval()

    data = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 + 1 for i in range(3)]
    first, second = build(), build()
    torch.manual_seed(1)
    report = recalibrate(first, data)
    torch.manual_seed(2)
    recalibrate(second, data)

    assert [c.module for c in report.changed("recalibrated")] == ["1", "3"]
    with torch.no_grad():
        conv_out = torch.cat([first[0](b) for b in data[:2]])  # the last batch is held out
    torch.testing.assert_close(first[1].running_mean, conv_out.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert torch.equal(first[3].running_mean, second[3].running_mean)
    assert torch.equal(first[3].running_var, second[3].running_var)


def test_export_folds_batchnorm_act_and_merged_branches_out_of_the_onnx(tmp_path) -> None:
    """export runs fold's passes: no BatchNormalization node is left for BatchNorm+act or a RepVGG-style sum."""
    import onnx
    from timm.layers import BatchNormAct2d, ConvNormAct

    from normsurgeon.onnx.export import export_onnx

    class RepBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kxk = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.identity, self.act = BatchNormAct2d(8, apply_act=False), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.kxk(x) + self.identity(x))

    x = torch.randn(2, 3, 16, 16)
    model = give_realistic_stats(nn.Sequential(ConvNormAct(3, 8, 3, act_layer=nn.SiLU), RepBlock()), x)

    report = export_onnx(model, (x,), tmp_path / "m.onnx")

    ops = [node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node]
    assert report.passed and "BatchNormalization" not in ops and ops.count("Conv") == 2
    assert sorted(c.action.value for c in report.changes) == ["folded", "reparameterized"]


@pytest.mark.slow
def test_levit_pt2_fold_gets_the_rounding_allowance_the_module_fold_gets(monkeypatch) -> None:
    """With a tolerance any float32 rounding exceeds, both paths must judge LeViT's fold by its own
    rounding noise; the .pt2 path used to have no such allowance and exit 6 where the module path passed."""
    import timm

    import normsurgeon.check as check_module
    from normsurgeon.passes.fold_batchnorm_exported import fold_batchnorm_exported

    x = torch.randn(1, 3, 224, 224)
    model = give_realistic_stats(timm.create_model("levit_128", pretrained=False), torch.randn(2, 3, 224, 224), steps=1)
    program = torch.export.export(model, (x,))
    monkeypatch.setitem(check_module.TOLERANCES, torch.float32, (1e-12, 0.0))

    by_module = fold_batchnorm(model, (x,), inplace=False)
    by_program = fold_batchnorm_exported(program)

    for report in (by_module, by_program):
        assert report.passed and "rounding noise" in report.checks[-1].label and report.changes
        assert any("accepted as rounding" in note for note in report.notes)


def test_a_batchnorm_act_also_held_in_a_closure_becomes_its_activation_there_too() -> None:
    """The fold replaces the module in the tree; a closure calling the old object must not apply the norm twice."""
    from timm.layers import BatchNormAct2d

    class InAClosure(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, act_layer=nn.SiLU)
            bn = self.bn
            self.normalize = lambda x: bn(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.normalize(self.conv(x))

    model = give_realistic_stats(InAClosure(), torch.randn(2, 3, 8, 8))
    fresh = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # not a deep copy: deepcopy shares the closure, and with it the very module folded below
        expected = model(fresh)

    report = fold_batchnorm(model, (torch.randn(1, 3, 8, 8),))

    assert report.passed and any("turned into its SiLU as well" in note for note in report.notes)
    assert type(model.bn) is nn.SiLU and "bn.running_mean" not in model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(fresh), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "fastvit_t8"])
def test_timm_export_ships_no_more_batchnormalization_nodes_than_the_fold_leaves(name: str, tmp_path) -> None:
    """The ONNX carries what the module fold leaves (0 here; timm's own tools leave 49 and 10), and matches in onnxruntime."""
    import onnx

    from normsurgeon.onnx.export import export_onnx

    model, x = _build(name)
    left = count_batchnorm_like(fold_batchnorm(model, (x,), inplace=False).model)

    report = export_onnx(model, (x,), tmp_path / "m.onnx")

    ops = [node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node]
    assert report.passed and ops.count("BatchNormalization") <= left == 0
