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


class _CountingMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


def _function_stack() -> list:
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


def test_the_trace_leaves_the_torch_function_stack_as_it_found_it():
    model = Residual().eval()
    x = torch.randn(1, 3, 4, 4)
    trace(model, (x,))
    assert _function_stack() == []
    with _CountingMode() as outer:
        flow = trace(model, (x,))
        assert _function_stack() == [outer]
    # stepping aside inside atomic modules hands their ops to the user's own mode, as before
    assert "conv2d" in outer.names and "batch_norm" in outer.names
    assert [n.name for n in flow.nodes] == ["input", "conv", "bn", "add", "output"]


class _FailsInside(nn.Module):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error


def test_the_trace_restores_the_stack_when_the_model_fails_inside_a_layer():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), _FailsInside(RuntimeError("boom"))).eval()
    try:
        trace(model, (torch.randn(1, 1, 2, 2),))
    except Exception as exc:
        assert "boom" in str(exc)
    assert _function_stack() == []
    model = nn.Sequential(nn.Conv2d(1, 1, 1), _FailsInside(KeyboardInterrupt())).eval()
    try:  # no forward hook runs on a KeyboardInterrupt: the trace itself must put the stack back
        trace(model, (torch.randn(1, 1, 2, 2),))
    except KeyboardInterrupt:
        pass
    assert _function_stack() == []


def test_a_mode_the_model_enters_itself_is_not_reordered():
    class EntersAMode(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)
            self.mode = _CountingMode()

        def forward(self, x):
            with self.mode:
                return self.bn(self.conv(x)) * 2

    model = EntersAMode().eval()
    flow = trace(model, (torch.randn(1, 2, 2, 2),))
    assert _function_stack() == []
    (bn_call,) = flow.calls_of(model.bn)
    assert flow.data_input(bn_call).producer.module is model.conv
    assert [n.name for n in flow.nodes][-2:] == ["mul", "output"]
    assert "conv2d" in model.mode.names
