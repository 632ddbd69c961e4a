"""The dataflow trace: who produces and who consumes each tensor."""

import torch
from torch import nn

from normsurgeon.trace import trace


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[1] == 3 and y.dim() == 4:  # metadata reads are not consumers
            pass
        return self.bn(y) + y


def test_conv_output_consumers_include_the_residual_add():
    model = Residual().eval()
    flow = trace(model, (torch.randn(1, 3, 4, 4),))
    (conv_call,) = flow.calls_of(model.conv)
    users = [u.name for u in conv_call.outputs[0].users]
    assert users == ["bn", "add"]


def test_reused_module_has_one_node_per_call_and_outputs_are_the_reference():
    conv = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv).eval()
    x = torch.randn(1, 2, 3, 3)
    flow = trace(model, (x,))
    assert [n.call for n in flow.calls_of(conv)] == [0, 1]
    assert torch.equal(flow.outputs, model(x))


def test_functional_use_of_a_parameter_is_recorded():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)

        def forward(self, ids):
            return nn.functional.linear(self.embed(ids), self.embed.weight)

    model = Tied().eval()
    flow = trace(model, (torch.tensor([[1, 2]]),))
    assert [n.name for n in flow.uses_outside(model.embed.weight)] == ["linear"]


def test_in_place_op_produces_a_new_value():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            y.add_(1)
            return self.bn(y)

    model = InPlace().eval()
    flow = trace(model, (torch.randn(1, 2, 2, 2),))
    (bn_call,) = flow.calls_of(model.bn)
    assert flow.data_input(bn_call).producer.name == "add_"
