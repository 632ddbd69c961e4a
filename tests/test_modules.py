"""The modules normsurgeon puts into users' models survive the ways models are deployed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsurgeon.modules import (
    BiasAfterConvTranspose1d,
    ChannelAffine,
    ChannelsFirstLayerNorm,
    FrozenBatchNorm,
    MeanOnlyBatchNorm,
)


def _frozen() -> FrozenBatchNorm:
    module = FrozenBatchNorm(4)
    with torch.no_grad():
        for buffer in module.buffers():
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    return module


def _bias_after() -> nn.Module:
    module = nn.ConvTranspose1d(4, 4, 3, stride=2, groups=2)
    module.__class__ = BiasAfterConvTranspose1d
    return module


MODULES = {
    "ChannelAffine": (lambda: ChannelAffine(torch.randn(4), torch.randn(4)), (2, 4, 3, 3)),
    "MeanOnlyBatchNorm": (lambda: MeanOnlyBatchNorm(4), (2, 4, 3, 3)),
    "MeanOnlyBatchNorm-cumulative": (lambda: MeanOnlyBatchNorm(4, momentum=None), (2, 4)),
    "FrozenBatchNorm": (_frozen, (2, 4, 3, 3)),
    "ChannelsFirstLayerNorm": (lambda: ChannelsFirstLayerNorm(4), (2, 4, 3, 3)),
    "BiasAfterConvTranspose1d": (_bias_after, (2, 4, 5)),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MODULES)
def test_every_module_scripts_to_the_same_outputs_in_train_and_eval_mode(name):
    build, shape = MODULES[name]
    torch.manual_seed(0)
    eager = build()
    scripted = torch.jit.script(build())
    scripted.load_state_dict(eager.state_dict())
    x = torch.randn(shape)
    for training in (True, False):
        eager.train(training)
        scripted.train(training)
        torch.testing.assert_close(scripted(x), eager(x), rtol=0, atol=0)
    for name_, buffer in eager.named_buffers():  # train mode updated the same running stats
        torch.testing.assert_close(dict(scripted.named_buffers())[name_], buffer, rtol=0, atol=0)
