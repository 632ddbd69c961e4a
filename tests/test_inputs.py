"""ExampleInputs: one value for a model's example arguments, validated once, and what the code does with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.errors import PreconditionError, UsageError
from normsurgeon.inputs import ExampleInputs
from tests.helpers import give_realistic_stats


class Takes(nn.Module):
    """forward(x, scale=1.0, mask=None): positional, keyword and optional arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(self.linear(x)) * scale
        return y if mask is None else y * mask


@pytest.fixture(scope="module")
def model() -> Takes:
    return give_realistic_stats(Takes(), torch.randn(16, 4))


X, MASK = torch.randn(3, 4), torch.ones(3, 4)


@pytest.mark.parametrize("value, args, kwargs", [
    ((X,), (X,), {}),
    ([X, 2.0], (X, 2.0), {}),
    ({"x": X, "mask": MASK}, (), {"x": X, "mask": MASK}),
], ids=["tuple", "list", "dict"])
def test_of_splits_positional_and_keyword_arguments(model, value, args, kwargs):
    inputs = ExampleInputs.of(value, "test inputs")
    assert inputs.args == args and inputs.kwargs.keys() == kwargs.keys()
    assert all(inputs.kwargs[k] is v for k, v in kwargs.items())
    assert inputs.description == "test inputs"
    expected = model(*args, **kwargs)
    assert torch.equal(inputs.call(model), expected)
    assert ExampleInputs.of(inputs) is inputs  # already one: as it is


def test_mixed_positional_and_keyword_arguments(model):
    inputs = ExampleInputs((X,), {"scale": 2.0, "mask": MASK})
    assert torch.equal(inputs.call(model), model(X, scale=2.0, mask=MASK))
    assert inputs.tensors() == [X, MASK]  # positional first, then keyword values in order
    with pytest.raises(UsageError, match="both positional and keyword arguments; pass one kind"):
        inputs.plain()
    assert ExampleInputs.of((X,)).plain() == (X,) and ExampleInputs.of({"x": X}).plain() == {"x": X}


def test_tensors_are_found_nested_and_batch_size_is_the_first_with_a_dim():
    scalar, nested = torch.tensor(1.0), [torch.randn(5, 2), (torch.randn(7),)]
    inputs = ExampleInputs((scalar, nested), {"y": torch.randn(9, 1)})
    assert [tuple(t.shape) for t in inputs.tensors()] == [(), (5, 2), (7,), (9, 1)]
    assert inputs.batch_size() == 5
    assert ExampleInputs.of((2.0, None)).batch_size() is None


def test_to_casts_floating_tensors_and_leaves_integers_and_other_values():
    ids, floats = torch.arange(4), torch.randn(2, 4)
    moved = ExampleInputs((floats, ids, 3), {"mask": torch.ones(2)}).to(device="cpu", dtype=torch.float16)
    assert moved.args[0].dtype == torch.float16 and torch.equal(moved.args[1], ids) and moved.args[2] == 3
    assert moved.kwargs["mask"].dtype == torch.float16


def test_like_takes_the_models_floating_dtype():
    half = nn.Linear(4, 2).half()
    assert ExampleInputs.of((X,)).like(half).args[0].dtype == torch.float16
    assert ExampleInputs.of((X,)).like(nn.ReLU()).args[0] is X  # no parameters: as they are


@pytest.mark.parametrize("value, error, message", [
    (X, UsageError, r"example_inputs is a Tensor: pass a tuple of positional arguments, e.g. \(x,\)"),
    ("x", UsageError, "example_inputs must be a tuple of positional arguments or a dict of keyword arguments, not str"),
    ({0: X}, UsageError, "keyword example inputs must be named by str, not 0"),
    ((torch.empty(2, 4, device="meta"),), PreconditionError,
     r"example inputs are on the meta device \(shapes, no values\)"),
    ({"x": [torch.empty(2, device="meta")]}, PreconditionError, "example inputs are on the meta device"),
], ids=["tensor", "str", "non-str-key", "meta", "nested-meta"])
def test_unusable_inputs_are_refused_when_made(value, error, message):
    with pytest.raises(error, match=message):
        ExampleInputs.of(value)


def test_the_passes_take_example_inputs_of_either_kind_and_mixed(model):
    """fold on positional, keyword and mixed ExampleInputs: each folds and matches the original on its inputs."""
    for inputs in (ExampleInputs.of((X,)), ExampleInputs.of({"x": X}), ExampleInputs((X,), {"mask": MASK})):
        report = normsurgeon.fold_batchnorm(model, inputs, inplace=False)
        assert report.passed and len(report.changed("folded")) == 1
        assert torch.allclose(inputs.call(report.model), inputs.call(model), atol=1e-6)
