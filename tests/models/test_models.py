"""The reference models build fast, deterministically, in eval mode, with trained-looking norms."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import models
from models import REGISTRY, ModelSpec
from models.build_examples import write_examples
from models.calibrate import is_norm
from models.hifigan import build_hifigan, hifigan_legacy, mel_inputs
from models.resnet import resnet

EXAMPLE = Path(models.__file__).parent / "examples" / "resnet18.pt"
SPECS = list(REGISTRY.values())


def _outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture(scope="module", params=SPECS, ids=[s.name for s in SPECS])
def spec(request: pytest.FixtureRequest) -> ModelSpec:
    return request.param


def test_builds_in_eval_mode(spec: ModelSpec) -> None:
    model = spec.build()
    assert isinstance(model, nn.Module)
    assert not any(m.training for m in model.modules())
    copy.deepcopy(model)  # passes that work on a copy need this


@pytest.mark.parametrize("batch", [1, 4])
def test_forward_is_finite_and_deterministic(spec: ModelSpec, batch: int) -> None:
    inputs = spec.example_inputs(batch)
    assert all(x.shape[0] == batch for x in inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, spec.example_inputs(batch)))
    out = _outputs(spec.build(), inputs)
    assert out.shape[0] == batch
    assert torch.isfinite(out).all()
    assert torch.equal(out, _outputs(spec.build(), inputs))


def test_batch_one_is_first_row_of_batch_four(spec: ModelSpec) -> None:
    model = spec.build()
    one = _outputs(model, spec.example_inputs(1))
    four = _outputs(model, spec.example_inputs(4))
    torch.testing.assert_close(one, four[:1], rtol=1e-4, atol=1e-5)


def test_batchnorm_stats_are_calibrated(spec: ModelSpec) -> None:
    for name, bn in spec.build().named_modules():
        if isinstance(bn, _BatchNorm):
            assert bn.running_mean is not None and bn.running_var is not None, name
            assert (bn.running_mean != 0).any(), name
            assert (bn.running_var != 1).any(), name
            assert (bn.running_var > 0).all(), name


def test_norm_affines_are_randomized(spec: ModelSpec) -> None:
    for name, norm in spec.build().named_modules():
        weight = getattr(norm, "weight", None)
        if is_norm(norm) and isinstance(weight, torch.Tensor):
            assert (weight < 0).any() and (weight.abs() != 1).any(), name
            bias = getattr(norm, "bias", None)
            assert bias is None or (bias != 0).any(), name


def test_build_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    models.build("resnet18")
    assert torch.equal(state, torch.random.get_rng_state())


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(KeyError, match="resnet18"):
        models.build("resnet19")


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_resnet_depths(depth: int) -> None:
    model = resnet(depth, width=4).eval()
    assert _outputs(model, (torch.randn(1, 3, 32, 32),)).shape == (1, 10)


def test_hifigan_weight_norm_variants() -> None:
    new, old = build_hifigan(), hifigan_legacy()
    assert torch.equal(_outputs(new, mel_inputs(2)), _outputs(old, mel_inputs(2)))
    torch.save(old, io.BytesIO())
    with pytest.raises(RuntimeError):
        torch.save(new, io.BytesIO())


def test_bundled_example_matches_registry() -> None:
    assert EXAMPLE.is_file(), "run: python -m models.build_examples"
    assert EXAMPLE.stat().st_size < 1_000_000
    loaded = torch.load(EXAMPLE, weights_only=False)
    assert type(loaded).__module__ == "models.resnet"
    inputs = models.example_inputs("resnet18", 2)
    # close, not equal: the file may have been written on a CPU with other SIMD kernels
    expected = _outputs(models.build("resnet18"), inputs)
    torch.testing.assert_close(_outputs(loaded, inputs), expected, rtol=1e-4, atol=1e-5)


def test_write_examples(tmp_path: Path) -> None:
    (path,) = write_examples(tmp_path, ["mlp"])
    assert path == tmp_path / "mlp.pt" and [p.name for p in tmp_path.iterdir()] == ["mlp.pt"]
    loaded = torch.load(path, weights_only=False)
    inputs = models.example_inputs("mlp", 2)
    assert torch.equal(_outputs(loaded, inputs), _outputs(models.build("mlp"), inputs))
    with pytest.raises(ValueError, match="parametrizations"):
        write_examples(tmp_path, ["hifigan"])
