"""Helpers shared by the tests: running the CLI (in a subprocess, or in this process), hashing files,
realistic BN stats. The fixtures built on them are in tests/conftest.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
COLUMNS = "200"


def run_cli(*args: object, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m normsurgeon ARGS`` in a subprocess, with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": COLUMNS}
    return subprocess.run([sys.executable, "-m", "normsurgeon", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@dataclass(frozen=True)
class CliResult:
    """What :func:`run_cli` gives (``returncode``, ``stdout``, ``stderr``), for a run in this process."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


# Python's default warning filters (what a fresh ``python -m normsurgeon`` shows on stderr), not pytest's.
_QUIET_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def invoke_cli(*args: object, cwd: Path = REPO) -> CliResult:
    """``normsurgeon ARGS`` in this process (click's CliRunner), as :func:`run_cli` runs it in a subprocess.

    No interpreter start and no torch import (~2-3 s a run). The differences a test could see are
    kept out: the cwd is ``cwd`` for the run only; warnings go to ``stderr`` as Python would print
    them; an uncaught exception is exit 1 with its traceback on ``stderr``. cli.py puts the SIGINT
    handler back and loading puts sys.path back (both asserted here). Modules imported from a test's
    folder (``--factory``) stay in sys.modules: the ``cli`` fixture (tests/conftest.py) forgets them.
    """
    from click.testing import CliRunner

    import normsurgeon.cli

    argv = [str(a) for a in args]
    handler, path = signal.getsignal(signal.SIGINT), list(sys.path)
    with contextlib.chdir(cwd), warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in _QUIET_BY_DEFAULT:
            warnings.simplefilter("ignore", category)
        result = CliRunner().invoke(normsurgeon.cli.main, argv, prog_name="normsurgeon", env={"COLUMNS": COLUMNS},
                                    terminal_width=int(COLUMNS))
    assert signal.getsignal(signal.SIGINT) is handler and sys.path == path, "the run left its SIGINT handler or sys.path"
    stderr = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    stderr += result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
        return CliResult(argv, 1, result.stdout, stderr)
    return CliResult(argv, result.exit_code, result.stdout, stderr)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def give_realistic_stats(model: nn.Module, *inputs: torch.Tensor, keywords: dict[str, torch.Tensor] | None = None,
                         steps: int = 3, seed: int = 0) -> nn.Module:
    """Run a few train-mode batches (shifted, scaled inputs) and randomize norm affines; return eval model.

    ``inputs`` are passed by position, ``keywords`` by name. Folding BN with its initial stats
    (mean 0, var 1, gamma 1, beta 0) would test almost nothing.
    """
    generator = torch.Generator().manual_seed(seed)

    def shifted(x: torch.Tensor, step: int) -> torch.Tensor:
        return x * (1.5 + step) + 0.5 if x.is_floating_point() else x

    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(*(shifted(x, step) for x in inputs), **{k: shifted(x, step) for k, x in (keywords or {}).items()})
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.copy_(torch.empty(module.weight.shape).uniform_(-1.5, 1.5, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.3)
    return model.eval()


def count_batchnorm_like(model: nn.Module) -> int:
    """BatchNorm-like modules left in ``model`` (torch BatchNorms, BatchNorm+act, frozen BatchNorms)."""
    from normsurgeon.norms import is_batchnorm_like

    return sum(is_batchnorm_like(m) for m in model.modules())
