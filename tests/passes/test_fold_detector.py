"""A torchvision detector (RetinaNet: ResNet body with FrozenBatchNorm2d, FPN, score threshold, topk, NMS)
folds and passes its check without any tolerance widening (issue 16).

torchvision's C++ ops cannot load beside the CPU torch here (normsurgeon/torchvision_compat.py declares
``torchvision::nms`` without a kernel), so the test registers an exact pure-torch NMS for the module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import normsurgeon  # before torchvision: declares the NMS schema torchvision needs to import
from normsurgeon.check import default_tolerance

IMAGE = 128


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Exact NMS (torchvision's semantics): by falling score, drop boxes overlapping a kept one by IoU > threshold."""
    order = scores.argsort(descending=True, stable=True)
    boxes = boxes[order]
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    corner_max = torch.max(boxes[:, None, :2], boxes[None, :, :2])
    corner_min = torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (corner_min - corner_max).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= iou[i, i + 1:] <= iou_threshold
    return order[keep]


@pytest.fixture(scope="module")
def nms_kernel() -> Iterator[None]:
    """A CPU kernel for ``torchvision::nms`` while this module runs (torchvision's own cannot load here)."""
    import torchvision.ops.boxes

    library = None
    if not torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "CPU"):
        library = torch.library.Library("torchvision", "IMPL")  # noqa: TOR901
        library.impl("nms", _nms, "CPU")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.ops.boxes, "_assert_has_ops", lambda: None)
        yield
    if library is not None:
        library._destroy()


@pytest.fixture(scope="module")
def detector(nms_kernel: None) -> nn.Module:
    """RetinaNet on a one-block-per-stage ResNet with FrozenBatchNorm2d (as torchvision's trained detectors),
    realistic frozen statistics, and a classification head whose scores spread over the threshold."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 32,
                               extra_blocks=LastLevelP6P7(32, 32))
    model = RetinaNet(backbone, num_classes=3, min_size=IMAGE, max_size=IMAGE, score_thresh=0.3,
                      topk_candidates=40, detections_per_img=30)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.weight.numel()
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        head = model.head.classification_head
        for conv in [*head.conv.modules(), head.cls_logits]:
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight)
        nn.init.constant_(head.cls_logits.bias, -2.0)
    return model.eval()


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random images (bicubic upsampling of 10x10 noise), not white noise."""
    low = torch.rand(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed))
    return list(nn.functional.interpolate(low, size=(IMAGE, IMAGE), mode="bicubic", align_corners=False).clamp(0, 1))


def _frozen_batchnorms(model: nn.Module) -> int:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def folded(detector: nn.Module) -> normsurgeon.Report:
    return normsurgeon.fold(detector, (_images(8),), inplace=False)


def test_the_detector_folds_and_passes_on_8_images_at_the_default_tolerance(detector, folded):
    judged, shown = folded.checks
    assert folded.passed and len(folded.changed("folded")) == _frozen_batchnorms(detector) == 12
    assert _frozen_batchnorms(folded.model) == 0
    assert (judged.atol, judged.rtol) == default_tolerance(torch.float32)  # no rounding-noise allowance
    assert not any("accepted as rounding" in note for note in folded.notes)
    names = {o.name for o in judged.outputs}
    assert {f"output[{i}].{key}" for i in range(8) for key in ("boxes", "scores", "labels")} <= names
    assert "gt input[0]" in names  # the scores the first threshold read
    assert shown.informational and "final outputs as computed" in shown.label


def test_the_report_names_the_data_dependent_ops(folded):
    assert "first data-dependent op (gt at torchvision/models/detection/retinanet.py:" in folded.check.label
    assert any("data-dependent ops (gt x40, topk x40, nms x8)" in note for note in folded.notes)


def test_the_images_have_detections(detector):
    with torch.no_grad():
        counts = [len(result["boxes"]) for result in detector(_images(8))]
    assert all(count > 0 for count in counts)


def test_an_image_without_detections_is_a_valid_input(detector):
    blind = copy.deepcopy(detector)
    blind.score_thresh = 1.0  # no sigmoid score is over it
    images = _images(2, seed=1)
    with torch.no_grad():
        assert all(result["boxes"].shape == (0, 4) for result in blind(images))
    report = normsurgeon.fold(blind, (images,))
    assert report.passed and all(o.max_abs_diff == 0 for o in report.check.outputs if o.name.startswith("output"))


def test_a_wrong_fold_fails_before_the_first_data_dependent_op(detector, monkeypatch):
    import normsurgeon.passes.fold_batchnorm as fold_module

    real_apply = fold_module._apply
    planned = []

    def first_off_by_a_percent(plan):
        given_a_bias = real_apply(plan)
        if not planned:
            with torch.no_grad():
                plan.targets[0].weight.mul_(1.01)
        planned.append(plan)
        return given_a_bias

    monkeypatch.setattr(fold_module, "_apply", first_off_by_a_percent)
    report = normsurgeon.fold(detector, (_images(2),), inplace=False, raise_on_mismatch=False)
    assert not report.passed and "gt input[0]" in [o.name for o in report.check.outputs if not o.passed]
    assert not any("accepted as rounding" in note for note in report.notes)
