"""Helpers shared by the tests: running the CLI as a user does, hashing files, realistic BN stats."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: object, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m normsurgeon ARGS`` in a subprocess, with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "normsurgeon", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def give_realistic_stats(model: nn.Module, *inputs: torch.Tensor, steps: int = 3, seed: int = 0) -> nn.Module:
    """Run a few train-mode batches (shifted, scaled inputs) and randomize norm affines; return eval model.

    Folding BN with its initial stats (mean 0, var 1, gamma 1, beta 0) would test almost nothing.
    """
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(*(x * (1.5 + step) + 0.5 if x.is_floating_point() else x for x in inputs))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.copy_(torch.empty(module.weight.shape).uniform_(-1.5, 1.5, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.3)
    return model.eval()
