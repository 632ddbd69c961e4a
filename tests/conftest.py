"""Fixtures shared by every test folder: the CLI run in this process, and torch.onnx's registry built once.

The plain helpers they use (``invoke_cli``, ``run_cli``, ``give_realistic_stats``, ``sha256``) are
in tests/helpers.py, which tests import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, CliResult, invoke_cli


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker gets its share of the cores: torch's default (one thread per
    core in every worker) oversubscribes them, and its spinning threads then slow a test ~10x."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the CLI subprocesses a test starts


@pytest.fixture
def forget_new_modules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the test, drop from sys.modules what it imported from a temporary folder (a ``--factory``'s
    ``arch.py``), so that a later test's module of the same name is imported afresh, as in a new process."""
    before = set(sys.modules)
    yield
    base = tmp_path_factory.getbasetemp().resolve()
    for name in set(sys.modules) - before:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file and Path(file).resolve().is_relative_to(base):
            del sys.modules[name]


@pytest.fixture
def cli(forget_new_modules: None) -> Callable[..., CliResult]:
    """``cli("fold", path, "--json")``: ``normsurgeon ARGS`` in this process, with ``returncode``,
    ``stdout`` and ``stderr`` as ``run_cli`` (a subprocess) gives them. ``cwd=`` as for ``run_cli``."""

    def run(*args: object, cwd: Path = REPO) -> CliResult:
        return invoke_cli(*args, cwd=cwd)

    return run


@pytest.fixture(autouse=True, scope="session")
def _share_the_exporters_op_registry() -> Iterator[None]:
    """Build torch.onnx's ATen→ONNX registry once per opset instead of once per export (~3 s each).

    The exporter only reads the registry (it is mutated only for ``custom_translation_table``,
    which normsurgeon never passes), so sharing it changes no result, only the suite's run time.
    Session-wide: the in-process ``export`` runs of tests/commands share it with tests/onnx.
    """
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:  # another torch layout: run unshared
        yield
        return
    original = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return
    cache: dict = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original.__func__(cls, *args, **kwargs)
        return cache[key]

    ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original
