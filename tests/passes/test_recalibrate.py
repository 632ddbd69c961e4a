"""BatchNorm recalibration: recovers true statistics, repairs averaged or corrupted models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import models
from models.inputs import images
from models.mlp import build_mlp, mlp_inputs
from normsurgeon.errors import (
    LoadError,
    PreconditionError,
    UsageError,
    VerificationError,
)
from normsurgeon.modules import MeanOnlyBatchNorm
from normsurgeon.passes.recalibrate import recalibrate
from normsurgeon.report import SkipReason


def _out(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _mlp_batches(count: int, size: int = 256, seed: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [mlp_inputs(size, generator)[0] for _ in range(count)]


def _with_true_stats(model: nn.Module, data: torch.Tensor) -> nn.Module:
    """A copy whose BN stats are those of ``data`` as one batch: the reference."""
    model = copy.deepcopy(model)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm1d):
            bn.reset_running_stats()
            bn.momentum = None
    model.train()
    _out(model, data)
    return model.eval()


def test_recovers_the_mean_and_variance_of_a_known_distribution():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.zero_()
    mu, sigma = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([0.5, 2.0, 1.0, 3.0])
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(512, 4, generator=generator) * sigma + mu for _ in range(9)]
    report = recalibrate(model, data)
    bn = model[1]
    # 8 x 512 samples: the standard error of the mean is sigma/64, of the variance ~ sigma^2/45
    torch.testing.assert_close(bn.running_mean, mu, atol=float(4 * sigma.max() / 64), rtol=0)
    torch.testing.assert_close(bn.running_var, sigma**2, rtol=0.1, atol=0)
    assert int(bn.num_batches_tracked) == 8 and bn.momentum == 0.1 and not bn.training
    assert "mean |Δmean|" in report.changes[0].detail and "mean |Δvar|" in report.changes[0].detail


def test_repairs_a_weight_averaged_model():
    a, b = build_mlp(seed=0), build_mlp(seed=1)
    averaged = copy.deepcopy(a)
    with torch.no_grad():
        for pa, pb in zip(averaged.state_dict().values(), b.state_dict().values()):
            if pa.is_floating_point():
                pa.copy_((pa + pb) / 2)
    batches = _mlp_batches(8)
    reference = _with_true_stats(averaged, torch.cat(batches))
    x = mlp_inputs(64, torch.Generator().manual_seed(11))[0]
    before = _rel_err(_out(averaged, x), _out(reference, x))
    report = recalibrate(averaged, batches, batches=8)
    after = _rel_err(_out(averaged, x), _out(reference, x))
    assert before > 0.3 and after < 0.03, (before, after)  # measured: 0.46 -> 0.013
    assert report.passed and report.check.max_abs_diff > 0.1  # informational: it changed, and passes


def test_repairs_corrupted_statistics():
    good = build_mlp()
    recalibrate(good, _mlp_batches(16, size=512, seed=1))  # the good model's stats describe the distribution
    bad = copy.deepcopy(good)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (bad.bn1, bad.bn2):
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=generator))
            bn.running_var.mul_(4)
    x = mlp_inputs(64, torch.Generator().manual_seed(99))[0]
    before = _rel_err(_out(bad, x), _out(good, x))
    fresh = _mlp_batches(16, size=512, seed=2)  # new samples of the same distribution
    good_on_fresh = copy.deepcopy(good)
    recalibrate(good_on_fresh, fresh)
    recalibrate(bad, fresh)
    after = _rel_err(_out(bad, x), _out(good, x))
    # measured 1.50 -> 0.038: what is left is the sampling noise of two 7,680-sample estimates
    assert before > 0.3 and after < 0.06, (before, after)
    # and nothing of the corruption survives: same data, same statistics as the good model's
    torch.testing.assert_close(_out(bad, x), _out(good_on_fresh, x), rtol=1e-5, atol=1e-6)


def test_fixes_stats_that_were_never_updated_in_a_resnet():
    trained = models.build("resnet18")
    fresh = copy.deepcopy(trained)
    for bn in fresh.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
    data = [images(8, torch.Generator().manual_seed(i))[0] for i in range(3)]
    recalibrate(trained, data)
    report = recalibrate(fresh, data)
    assert len(report.changed("recalibrated")) == 20 and report.skipped == []
    x = images(4, torch.Generator().manual_seed(7))[0]
    torch.testing.assert_close(_out(fresh, x), _out(trained, x), rtol=1e-4, atol=1e-5)


class DropoutNet(nn.Module):
    """Linear → BN → Dropout → Linear → BN, called with keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1, self.drop = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)
        self.fc2, self.bn2 = nn.Linear(8, 3), nn.BatchNorm1d(3, momentum=0.3)

    def forward(self, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.bn2(self.fc2(self.drop(self.bn1(self.fc1(features * scale)))))


@pytest.mark.parametrize("training", [False, True], ids=["eval-model", "train-model"])
def test_only_batchnorm_trains_dropout_stays_off_and_modes_come_back(training):
    torch.manual_seed(0)
    model = DropoutNet().train(training)
    data = [{"features": torch.randn(32, 6), "scale": 2.0} for _ in range(4)]
    twin = copy.deepcopy(model)
    recalibrate(model, data)
    recalibrate(twin, data)
    torch.testing.assert_close(model.bn2.running_mean, twin.bn2.running_mean)  # no random dropout masks
    assert [m.training for m in model.modules()] == [training] * 6
    assert (model.bn1.momentum, model.bn2.momentum) == (0.1, 0.3)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_data_from_files_folders_npz_and_rebatching(tmp_path):
    batches = _mlp_batches(4, size=32)
    torch.save(batches[:2], tmp_path / "a.pt")  # a list of batches
    np.savez(tmp_path / "b.npz", torch.cat(batches[2:]).numpy())  # one positional array
    from_folder, from_list = build_mlp(), build_mlp()
    report = recalibrate(from_folder, tmp_path, batch_size=32)
    recalibrate(from_list, batches, batch_size=32)
    torch.testing.assert_close(from_folder.bn1.running_var, from_list.bn1.running_var)
    assert report.facts["batches"] == 3 and "4 batch(es), 128 samples" in report.notes[0]
    capped = recalibrate(build_mlp(), batches, batches=2)
    assert capped.facts["batches"] == 2 and int(capped.model.bn1.num_batches_tracked) == 2


def test_mean_only_batchnorm_is_recalibrated_too():
    model = nn.Sequential(nn.Linear(3, 3), MeanOnlyBatchNorm(3)).eval()
    data = [torch.randn(64, 3) + 4 for _ in range(3)]
    recalibrate(model, data)
    expected = torch.stack([model[0](d).mean(0) for d in data[:2]]).mean(0).detach()
    torch.testing.assert_close(model[1].running_mean, expected)


def test_a_batchnorm_the_data_never_reaches_keeps_its_stats():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.used(x)

    model = Branchy().eval()
    with torch.no_grad():
        model.unused.running_mean.fill_(7.0)
    report = recalibrate(model, [torch.randn(8, 3), torch.randn(8, 3)])
    assert [(s.module, s.reason) for s in report.skipped] == [("unused", SkipReason.NOT_CALLED)]
    assert torch.all(model.unused.running_mean == 7.0)


def test_shape_mismatch_is_a_clear_error_and_changes_nothing():
    model = build_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match=r"batch of shape \(16, 5\).*Linear expects \(\.\.\., 32\)"):
        recalibrate(model, [torch.randn(16, 5)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_empty_folder_and_nonfinite_data_are_refused(tmp_path):
    with pytest.raises(LoadError, match="holds no data files"):
        recalibrate(build_mlp(), tmp_path)
    model = build_mlp()
    before = model.bn1.running_mean.clone()
    bad = [torch.full((16, 32), float("nan")), torch.randn(16, 32)]
    with pytest.raises(VerificationError, match="NaN/inf"):
        recalibrate(model, bad)
    assert torch.equal(model.bn1.running_mean, before)  # the old statistics came back
    with pytest.raises(PreconditionError, match="no BatchNorm"):
        recalibrate(nn.Linear(3, 3), [torch.randn(4, 3)])


def test_statistics_are_pooled_over_every_sample_not_averaged_per_batch():
    # batches of different sizes and different means (data sorted by source): torch's cumulative
    # average (momentum=None) would weight the 2-sample batch like the 14-sample one and miss the
    # spread between the batch means (0.79 off in mean, 0.56 in variance here)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, generator=generator) + 3, torch.randn(14, 3, generator=generator),
            torch.randn(16, 3, generator=generator)]  # the last batch is held out for the check
    recalibrate(model, data)
    with torch.no_grad():
        seen = torch.cat([model[0](batch) for batch in data[:2]]).double()
    torch.testing.assert_close(model[1].running_mean.double(), seen.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), seen.var(0), atol=1e-5, rtol=1e-5)  # unbiased, like torch


def test_pooled_statistics_of_conv_features_match_one_big_batch():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)).eval()
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(size, 3, 6, 6, generator=generator) * (1 + i) + i for i, size in enumerate((3, 7, 2, 4))]
    recalibrate(model, data)
    with torch.no_grad():
        seen = torch.cat([model[0](batch) for batch in data[:-1]]).double()
    dims = (0, 2, 3)
    torch.testing.assert_close(model[1].running_mean.double(), seen.mean(dims), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var.double(), seen.var(dims), atol=1e-5, rtol=1e-5)
    assert int(model[1].num_batches_tracked) == 3
