"""The dataflow helpers the passes share: walks through layout ops and reshapes (with the channel
axis), the node describer, producer_targets / check_editable and the one Refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsurgeon.dataflow import (
    Refusal,
    readers,
    check_editable,
    describe,
    is_passthrough,
    producer_targets,
    single_user,
    users_through,
    walk_down,
    walk_up,
)
from normsurgeon.layout import is_layout_op, is_reshape, reshaped_axis
from normsurgeon.passes.fold_batchnorm import fold_batchnorm
from normsurgeon.report import Skip, SkipReason
from normsurgeon.surgery import shared_parameter_ids
from normsurgeon.trace import trace


class LinearThenBatchNorm(nn.Module):
    """(B, T, C) linear -> transpose to (B, C, T) -> Identity -> BatchNorm1d -> permute back -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.keep = nn.Identity()
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.bn(self.keep(self.fc(x).transpose(1, 2)))
        return self.head(y.permute(0, 2, 1))


def _flow(model: nn.Module, *inputs: torch.Tensor):
    return trace(model.eval(), inputs)


def _call(flow, module: nn.Module):
    (call,) = flow.calls_of(module)
    return call


def test_walk_up_tracks_the_channel_axis_back_through_transpose_and_identity():
    model = LinearThenBatchNorm()
    flow = _flow(model, torch.randn(2, 5, 4))
    value, axis, reader = walk_up(flow, _call(flow, model.bn), axis=1)
    assert value.producer.module is model.fc
    assert axis == 2  # the BN's channel axis 1 is the linear's last axis
    assert (reader.kind, reader.name) == ("function", "transpose")
    value, axis, reader = walk_up(flow, _call(flow, model.bn))  # the axis is tracked only when asked
    assert value.producer.module is model.fc and axis is None


def test_walk_up_stops_at_a_value_someone_else_also_reads():
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)

        def forward(self, x):
            y = self.conv(x).contiguous()
            return self.bn(y) + y

    model = Fork()
    flow = _flow(model, torch.randn(2, 3, 5))
    value, axis, reader = walk_up(flow, _call(flow, model.bn), axis=1)
    assert (value.producer.kind, value.producer.name, axis) == ("function", "contiguous", 1)
    assert reader is _call(flow, model.bn) and single_user(value) is None


def test_walk_down_tracks_the_axis_and_a_dead_layout_branch_yields_nothing():
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.head = nn.BatchNorm1d(6), nn.Linear(6, 2)

        def forward(self, x):
            y = self.bn(x)
            y.transpose(1, 2)  # computed, never read
            return self.head(y.permute(0, 2, 1)), torch.relu(y)

    model = Branches()
    flow = _flow(model, torch.randn(2, 6, 5))
    out = _call(flow, model.bn).outputs[0]
    found = [(describe(node), axis, read.shape) for node, axis, read in walk_down(out, axis=1)]
    assert found == [("head (Linear)", 2, (2, 5, 6)), ("relu()", 1, (2, 6, 5))]
    assert [describe(node) for node, axis, _ in walk_down(out)] == ["head (Linear)", "relu()"]
    assert all(axis is None for _, axis, _ in walk_down(out))


def test_passthrough_walks_go_through_device_moves_and_contiguous_but_not_transposes():
    class Moves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.a, self.b = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(5, 5)

        def forward(self, x):
            y = self.norm(x)
            return self.a(y.to("cpu").contiguous()) + self.b(y.transpose(1, 2)).sum()

    model = Moves()
    flow = _flow(model, torch.randn(2, 5, 4))
    out = _call(flow, model.norm).outputs[0]
    assert [describe(user) for user, _ in users_through(out)] == ["a (Linear)", "transpose()"]
    to_node = next(n for n in flow.nodes if n.name == "to")
    assert is_passthrough(to_node)
    assert not is_passthrough(next(n for n in flow.nodes if n.name == "transpose"))


def test_describe_names_every_kind_of_node():
    model = LinearThenBatchNorm()
    flow = _flow(model, torch.randn(2, 5, 4))
    by_kind = {}
    for node in flow.nodes:
        by_kind.setdefault(node.kind, describe(node))
    assert by_kind == {"input": "the model's input", "module": "fc (Linear)", "function": "transpose()",
                       "output": "the model's output"}


def test_producer_targets_folds_through_a_transpose_and_refuses_with_the_reason():
    model = LinearThenBatchNorm()
    flow = _flow(model, torch.randn(2, 5, 4))
    assert producer_targets(flow, flow.calls_of(model.bn)) == [model.fc]
    with pytest.raises(Refusal) as refused:
        producer_targets(flow, flow.calls_of(model.bn), kinds=(nn.Conv1d,))
    assert refused.value.reason is SkipReason.NO_FOLDABLE_NEIGHBOUR
    assert refused.value.detail == "its input comes from fc (Linear)"


def test_check_editable_refuses_a_weight_that_is_a_view_of_another():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = nn.Parameter(model[0].weight.view(3, 3))
    flow = _flow(model, torch.randn(2, 3))
    with pytest.raises(Refusal) as refused:
        check_editable(flow, model[1], shared_parameter_ids(model))
    assert (refused.value.reason, refused.value.detail) == (SkipReason.SHARED_PARAMETER, "1 shares its weight with another module")
    check_editable(flow, model[1], set())  # nothing else stands in the way


def test_refusal_is_the_skip_it_records():
    refusal = Refusal(SkipReason.NO_RUNNING_STATS)
    assert (str(refusal), refusal.detail, refusal.stats) == (SkipReason.NO_RUNNING_STATS.value, "", None)
    assert refusal.skip("layer1.bn") == Skip("layer1.bn", SkipReason.NO_RUNNING_STATS, "")
    detailed = Refusal(SkipReason.HOOKED, "its forward hooks (spy) would be dropped with it", stats="carried")
    assert str(detailed) == detailed.detail and detailed.stats == "carried"
    assert detailed.skip("bn").message == f"{SkipReason.HOOKED.value}: its forward hooks (spy) would be dropped with it"


# ------------------------------------------------------------------------------- reshapes


class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: BatchNorm1d on the linear's (B*N, C) rows, put back with reshape_as."""

    def __init__(self, cin: int = 4, cout: int = 6) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class ReshapeBeforeNorm(nn.Module):
    """A producer, a reshape, a BatchNorm1d: ``shape`` decides whether the channel axis survives."""

    def __init__(self, producer: nn.Module, reshape, channels: int) -> None:
        super().__init__()
        self.producer, self.reshape, self.bn = producer, reshape, nn.BatchNorm1d(channels)

    def forward(self, x):
        return self.bn(self.reshape(self.producer(x)))


@pytest.mark.parametrize(("source", "target", "axis", "expected"), [
    ((2, 5, 6), (10, 6), 2, 1),         # flatten(0, 1): the channels stay whole
    ((1, 5, 6), (5, 6), -1, 1),         # a batch of one squeezed away
    ((2, 6, 1, 1), (2, 6), 1, 1),       # flatten(1) after global pooling
    ((2, 6, 3), (2, 6, 3, 1), 1, 1),    # unsqueeze
    ((2, 6, 1), (2, 1, 6), 1, 2),       # a size-1 axis moved across: row-major order keeps the channel
    ((2, 5, 6), (2, 30), 2, None),      # merged with the axis before
    ((2, 6, 5), (2, 30), 1, None),      # merged with the axis after
    ((2, 6), (2, 2, 3), 1, None),       # split
    ((3, 4), (4, 3), 1, None),          # same sizes, not the same axes
    ((2, 1, 5), (2, 5), 1, None),       # a channel axis of size 1 cannot be told apart
    ((2, 0, 6), (0, 6), 2, None),       # no elements: nothing to tell
], ids=["merge-outer", "squeeze-batch", "flatten-pooled", "unsqueeze", "move-size-1", "merged-before",
        "merged-after", "split", "same-sizes", "size-1", "empty"])
def test_reshaped_axis_keeps_a_channel_axis_only_when_nothing_merges_or_splits_it(source, target, axis, expected):
    assert reshaped_axis(source, target, axis) == expected


def test_walk_up_looks_through_flatten_to_the_linear_and_reshape_as_is_a_shape_read():
    model = LinearNorm()
    flow = _flow(model, torch.randn(2, 5, 4))
    value, axis, reader = walk_up(flow, _call(flow, model.bn), axis=1)
    assert value.producer.module is model.linear and axis == 2
    assert (reader.name, is_reshape(reader)) == ("flatten", True)
    assert len(value.users) == 2 and [describe(u) for u in readers(value)] == ["flatten()"]  # reshape_as reads its shape
    assert single_user(value) is reader
    assert producer_targets(flow, flow.calls_of(model.bn)) == [model.linear]
    value, axis, _ = walk_up(flow, _call(flow, model.bn))  # without an axis to track, a reshape is not looked through
    assert (value.producer.name, axis) == ("flatten", None)


def test_walk_down_looks_through_reshape_as_and_nn_flatten_with_the_axis():
    model = LinearNorm()
    flow = _flow(model, torch.randn(2, 5, 4))
    out = _call(flow, model.bn).outputs[0]
    assert [(describe(n), axis) for n, axis, _ in walk_down(out, axis=1)] == [("the model's output", 2)]
    pooled = nn.Sequential(nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    flow = _flow(pooled, torch.randn(2, 6, 4, 4))
    pool_out = _call(flow, pooled[1]).outputs[0]
    assert [(describe(n), axis) for n, axis, _ in walk_down(pool_out, axis=1)] == [("3 (Linear)", 1)]
    assert [describe(n) for n, _, _ in walk_down(pool_out)] == ["2 (Flatten)"]  # untracked: stops at the reshape


@pytest.mark.parametrize(("model", "shape", "stop"), [
    (ReshapeBeforeNorm(nn.Linear(4, 6), lambda y: y.reshape(2, 30), 30), (2, 5, 4), "reshape()"),
    (ReshapeBeforeNorm(nn.Conv1d(3, 6, 1), lambda y: y.view(2, 3, 10), 3), (2, 3, 5), "view()"),
    (ReshapeBeforeNorm(nn.Conv1d(3, 6, 1), lambda y: y.unflatten(1, (2, 3)).flatten(2), 2), (2, 3, 5), "unflatten()"),
], ids=["merges-channels", "splits-channels", "splits-then-merges"])
def test_a_reshape_that_merges_or_splits_the_channel_axis_is_not_looked_through(model, shape, stop):
    model = model.eval()
    flow = _flow(model, torch.randn(*shape))
    value, axis, _ = walk_up(flow, _call(flow, model.bn), axis=1)
    assert (describe(value.producer), axis) == (stop, 1)
    with pytest.raises(Refusal) as refused:
        producer_targets(flow, flow.calls_of(model.bn))
    assert refused.value.detail == f"its input comes from {stop}"


def test_view_as_a_dtype_is_no_reshape():
    class Bits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(x).view(torch.int32).view(2, 3)

    flow = _flow(Bits(), torch.randn(6))
    as_int, as_matrix = (n for n in flow.nodes if n.name == "view")
    assert not is_layout_op(as_int) and is_reshape(as_matrix)


def test_linear_norm_folds_through_flatten_and_matches_the_original():
    model = LinearNorm()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(-1.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    report = fold_batchnorm(model, (torch.randn(2, 5, 4),), inplace=False)
    assert [(c.module, c.into) for c in report.changes] == [("bn", "linear")] and not report.skipped
    assert isinstance(report.model.bn, nn.Identity)
    fresh = torch.randn(3, 7, 4)  # another batch and length than the trace saw
    torch.testing.assert_close(report.model(fresh), model(fresh), atol=1e-5, rtol=1e-5)
