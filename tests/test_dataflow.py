"""The dataflow helpers the passes share: walks through layout ops (with the channel axis), the node
describer, producer_targets / check_editable and the one Refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsurgeon.dataflow import (
    Refusal,
    check_editable,
    describe,
    is_passthrough,
    producer_targets,
    single_user,
    users_through,
    walk_down,
    walk_up,
)
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
