"""The pass runner: one trace per run, each pass checked against the original, one place that raises.

Tolerance: outputs the runner's checks call equal use the default check (fp32: |diff| <= 1e-5 +
1e-4·max|out|); "untouched" and "unchanged" below are bit-identical (torch.equal).
"""

from __future__ import annotations

import ast
import copy
import json
from collections.abc import Callable, MutableMapping
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import normsurgeon
import normsurgeon.pipeline as pipeline
from tests.helpers import give_realistic_stats
from normsurgeon.errors import PreconditionError, VerificationError
from normsurgeon.passes.fold_batchnorm import FoldBatchNorm
from normsurgeon.passes.fold_norm_affine import FoldNormAffines
from normsurgeon.passes.registry import MODULE_PASSES, pre_export_passes
from normsurgeon.pipeline import Edit, ModulePass, Sequential, run
from normsurgeon.report import Change, Skip, SkipReason


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list:
    """One entry per trace the runner takes in the test."""
    calls: list = []
    real = pipeline.trace
    monkeypatch.setattr(pipeline, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.conv = nn.Linear(4, 4), nn.Linear(4, 4), nn.Conv1d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.conv(x.unsqueeze(1)).squeeze(1)


class DoubleThenHalve(ModulePass):
    """Exact: scales a's output by 2 and b's input by 1/2 (b is linear, so the output is unchanged)."""

    name, report_name = "double_then_halve", "rescale"
    check_label, subject = "rescaled vs original", "the rescaled model"

    def plan(self, ctx):
        assert ctx.flow.calls_of(ctx.model.a)  # the shared trace is there
        yield Edit("a", ctx.model.a)
        yield Skip("conv", SkipReason.NO_FOLDABLE_NEIGHBOUR, "not a linear pair")

    def apply(self, ctx, edit):
        with torch.no_grad():
            ctx.model.a.weight.mul_(2)
            ctx.model.a.bias.mul_(2)
            ctx.model.b.weight.mul_(0.5)
        return [Change("folded", edit.path, "b")]  # a's scale is folded into b


class Break(ModulePass):
    name, report_name = "break", "break"
    check_label, subject = "broken vs original", "the broken model"

    def plan(self, ctx):
        yield Edit("b", ctx.model.b)

    def apply(self, ctx, edit):
        with torch.no_grad():
            ctx.model.b.bias.add_(1)
        return [Change("replaced", edit.path)]


def test_a_pass_is_planned_applied_and_checked_against_the_original() -> None:
    model, x = Net().eval(), torch.randn(3, 4)
    want = model(x)

    report = run(DoubleThenHalve(), model, (x,))

    assert [c.action for c in report.changes] == ["folded"] and report.skipped[0].module == "conv"
    assert report.check.label == "rescaled vs original" and report.passed
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def test_a_sequential_traces_once(traces: list) -> None:
    report = run(Sequential(DoubleThenHalve(), DoubleThenHalve()), Net().eval(), (torch.randn(2, 4),))

    assert len(traces) == 1 and len(report.checks) == 2 and report.passed


def test_the_first_failed_check_stops_the_run_and_the_error_carries_the_report() -> None:
    model = Net().eval()
    a_before = model.a.weight.clone()

    with pytest.raises(VerificationError) as info:
        run(Sequential(Break(), DoubleThenHalve()), model, (torch.randn(2, 4),))

    report = info.value.report
    assert "the broken model differs from the original" in str(info.value)
    assert [r.label for r in report.checks] == ["broken vs original"] and not report.passed
    assert torch.equal(model.a.weight, a_before)  # the second pass never ran


def test_training_mode_is_refused_once_with_every_pass_reason() -> None:
    model = _conv_bn().train()
    with pytest.raises(PreconditionError, match=r"training mode, where BatchNorm uses batch statistics and dropout "
                                                r"is random; call model.eval\(\) first"):
        run(Sequential(FoldBatchNorm(), FoldNormAffines()), model, (torch.randn(2, 3, 8, 8),))
    assert isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(PreconditionError):
        run(DoubleThenHalve(), Net(), (torch.randn(2, 4),))


# --------------------------------------------------------------------------- the real passes


def _conv_bn() -> nn.Module:
    return give_realistic_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), torch.randn(2, 3, 8, 8))


def _ln_linear() -> nn.Module:
    return give_realistic_stats(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)), torch.randn(2, 8))


def _weight_normed_linear() -> nn.Module:
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(8, 4)), nn.ReLU()).eval()


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _two_branches() -> nn.Module:
    return nn.Sequential(_TwoBranches()).eval()


class _StandardizedConv(nn.Conv2d):
    """Weight standardization (timm's StdConv2d, without timm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w / w.flatten(1).std(dim=1).view(-1, 1, 1, 1), self.bias)


# One small model per registered pass, on which that pass changes something: a new pass adds its case.
CHANGED_BY: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "fold_batchnorm": (_conv_bn, (2, 3, 8, 8)),
    "fold_norm_affines": (_ln_linear, (2, 8)),
    "remove_weight_norm": (_weight_normed_linear, (2, 8)),
    "reparameterize": (_two_branches, (2, 3, 8, 8)),
    "bake_weight_standardization": (lambda: nn.Sequential(_StandardizedConv(3, 4, 3)).eval(), (2, 3, 8, 8)),
}


def test_every_registered_pass_has_a_model_it_changes() -> None:
    assert set(CHANGED_BY) == set(MODULE_PASSES)


@pytest.mark.parametrize("name", sorted(MODULE_PASSES))
def test_inplace_false_leaves_the_original_bit_identical(name: str) -> None:
    build, shape = CHANGED_BY[name]
    torch.manual_seed(0)
    model, x = build(), torch.randn(shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(path, type(m)) for path, m in model.named_modules()]
    with torch.no_grad():
        want = model(x)

    report = run(MODULE_PASSES[name](), model, (x,), inplace=False)

    assert report.changes and report.passed and report.model is not model
    assert [(path, type(m)) for path, m in model.named_modules()] == structure
    assert model.state_dict().keys() == state.keys() and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_the_pre_export_passes_trace_once_and_check_each_pass_against_the_original(traces: list) -> None:
    model, x = _conv_bn(), torch.randn(2, 3, 8, 8)
    parametrizations.weight_norm(model[0])
    with torch.no_grad():
        want = model(x)

    report = run(pre_export_passes(fold=True), copy.deepcopy(model), (x,))

    assert [p.name for p in pre_export_passes(fold=False)] == ["remove_weight_norm", "bake_weight_standardization"]
    assert [c.label for c in report.checks] == ["without weight norm vs with", "folded vs original"] and report.passed
    assert [c.action for c in report.changes] == ["weight norm removed", "folded"] and len(traces) == 1
    torch.testing.assert_close(report.model(x), want, rtol=1e-4, atol=1e-5)


def test_a_pass_that_changed_nothing_and_need_not_say_so_is_not_run_on_the_inputs(monkeypatch) -> None:
    """Export bakes weight norm on every model: one without it costs no forward pass."""
    calls = []
    real = pipeline.call_model
    monkeypatch.setattr(pipeline, "call_model", lambda *a, **k: calls.append(1) or real(*a, **k))

    report = run(pre_export_passes(fold=False), _conv_bn(), (torch.randn(2, 3, 8, 8),))

    assert report.checks == [] and report.changes == [] and calls == []


def test_fold_affine_traces_the_model_once(tmp_path: Path, cli, traces: list) -> None:
    model = give_realistic_stats(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.Linear(8, 4)),
                                 torch.randn(4, 8))
    torch.save(model, tmp_path / "net.pt")

    result = cli("fold", tmp_path / "net.pt", "--affine", "--input-shape", "4,8", "-o", tmp_path / "out.pt", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(c["action"], c["module"], c["into"]) for c in report["changes"]] == [("folded", "1", "0"),
                                                                               ("folded-affine", "2", "3")]
    assert [c["label"] for c in report["checks"]] == ["folded vs original", "norm affines folded vs before"]
    assert len(traces) == 1
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=False)(x), model(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- weights not in memory


class AlignDevicesHook:
    """What the runner reads of accelerate's hook (accelerate.hooks.AlignDevicesHook)."""

    def __init__(self, offload: bool, weights_map: dict | None = None) -> None:
        self.offload, self.weights_map = offload, weights_map


def _accelerate_like(model: nn.Module) -> nn.Module:
    """What accelerate.cpu_offload leaves: weights moved to a map, meta placeholders, a hook on each module."""
    weights: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            weights[f"{path}.{name}"] = param.detach().clone()
            module._parameters[name] = nn.Parameter(param.detach().to("meta"))
        module._hf_hook = AlignDevicesHook(offload=bool(module._parameters), weights_map=weights if path else None)
    return model


def _accelerate_cpu_offload(model: nn.Module) -> nn.Module:
    return pytest.importorskip("accelerate").cpu_offload(model, execution_device="cpu")


class CPUCache(MutableMapping):
    """compressed-tensors' OffloadCache: module._parameters that hands out a fresh copy at every access."""

    def __init__(self, values: dict) -> None:
        self.offloaded_values = dict(values)

    def __getitem__(self, key: str):
        value = self.offloaded_values[key]
        return None if value is None else nn.Parameter(value.detach().clone())

    def __setitem__(self, key: str, value) -> None:
        self.offloaded_values[key] = value

    def __delitem__(self, key: str) -> None:
        del self.offloaded_values[key]

    def __iter__(self):
        return iter(self.offloaded_values)

    def __len__(self) -> int:
        return len(self.offloaded_values)


def _compressed_tensors_like(model: nn.Module) -> nn.Module:
    for module in (model.a, model.b):
        module._parameters, module._buffers = CPUCache(module._parameters), CPUCache(module._buffers)
    return model


OFFLOADED = {
    "accelerate-simulated": (_accelerate_like, "accelerate AlignDevicesHook on a"),
    "accelerate-cpu_offload": (_accelerate_cpu_offload, "accelerate AlignDevicesHook on a"),
    "compressed-tensors-simulated": (_compressed_tensors_like, "CPUCache, compressed-tensors offload on a"),
}


@pytest.mark.parametrize("case", OFFLOADED, ids=list(OFFLOADED))
def test_offloaded_weights_are_refused_naming_the_first_one(case: str) -> None:
    offload, how = OFFLOADED[case]
    model = offload(Net().eval())
    x = torch.randn(2, 4)
    before = _snapshot(model)
    for one_pass in (DoubleThenHalve(), FoldNormAffines()):
        with pytest.raises(PreconditionError, match=rf"the model's weights are offloaded \({how}\): a\.weight is not held "
                                                    r"in memory, .*; load the weights into memory first \(e\.g\. "
                                                    "from_pretrained without device_map"):
            run(one_pass, model, (x,))
    after = _snapshot(model)
    assert [(n, d) for n, d, _ in after] == [(n, d) for n, d, _ in before]
    assert all(a is b is None or torch.equal(a, b) for (_, _, a), (_, _, b) in zip(after, before))


def _snapshot(model: nn.Module) -> list[tuple[str, torch.device, torch.Tensor | None]]:
    """Each parameter's name, device and values (None for a meta placeholder)."""
    return [(n, t.device, None if t.is_meta else t.detach().clone()) for n, t in model.named_parameters()]


def test_an_accelerate_hook_that_only_moves_inputs_is_no_offload() -> None:
    model = Net().eval()
    model._hf_hook = AlignDevicesHook(offload=False)  # device_map onto one device: weights stay in the module
    assert run(DoubleThenHalve(), model, (torch.randn(2, 4),)).passed


def test_meta_weights_are_refused_with_and_without_example_inputs() -> None:
    with torch.device("meta"):
        model = Net().eval()
    with pytest.raises(PreconditionError, match=r"on the meta device \(shapes, no values\): a\.weight, a\.bias, b\.weight"):
        run(DoubleThenHalve(), model, (torch.randn(2, 4),))
    with torch.device("meta"):
        normed = _weight_normed_linear()
    with pytest.raises(PreconditionError, match=r"^0\.bias is on the meta device "
                                                r"\(a shape, no values\): load the weights into memory first"):
        run(MODULE_PASSES["remove_weight_norm"](), normed, None)  # a pass that needs no inputs
    assert normed[0].parametrizations.weight.original0.is_meta


# --------------------------------------------------------------------------- one place raises

PACKAGE = Path(normsurgeon.__file__).parent
# Files that still build a VerificationError themselves, and why they are not the runner's to raise.
RAISES_ELSEWHERE = {
    "check.py": "mismatch_error builds the error the runner raises",
    "onnx/optimize.py": "an ONNX file compared in onnxruntime: no module pass, no nn.Module",
    "passes/recalibrate.py": "NaN/inf statistics after recalibration, which changes the outputs on purpose",
}


def _builds_a_verification_error(path: Path) -> bool:
    names = {"VerificationError", "mismatch_error"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) in names:
                return True
    return False


def test_only_the_runner_raises_on_a_failed_check() -> None:
    found = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if _builds_a_verification_error(p)}
    assert found == {"pipeline.py", *RAISES_ELSEWHERE}
