"""Ctrl-C while writing: the old file or the complete new one, never half of it, and no temp file.

In process, ``save_module`` (``write_atomically`` around ``torch.save``) is interrupted
(KeyboardInterrupt) at every step of a write: creating the temp file, half way through the real
``torch.save``, the fsync, the rename. (tests/io/test_saving.py interrupts a plain write callback.) Then a real
SIGINT is sent to ``python -m normsurgeon fold`` on a model big enough (134 MB) that saving
takes a while, at random times: after it started loading the model, and inside the window in
which the temp file exists (an anonymous O_TMPFILE the process holds open, or the fallback's named
one). No hook in normsurgeon makes this happen: the test watches the
process from outside (its open files in /proc, the temp file in the output folder).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from normsurgeon.cli import INTERRUPTED
from normsurgeon.io import saving
from normsurgeon.io.saving import save_module
from tests.helpers import REPO, sha256

OLD = b"the previous output, which must survive an interrupted write\n"


# --------------------------------------------------------------------------- in process


class Trap:
    """Pickling it raises KeyboardInterrupt, as Ctrl-C would half way through ``torch.save``."""

    def __reduce__(self):
        raise KeyboardInterrupt


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8)).eval()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())  # dot-files included


@pytest.mark.parametrize("existing", [True, False], ids=["over-an-old-file", "new-file"])
def test_torch_save_interrupted_half_way(existing: bool, model: nn.Module, tmp_path: Path) -> None:
    target = tmp_path / "model.folded.pt"
    if existing:
        target.write_bytes(OLD)
    model[1].trap = Trap()  # pickled after the first layer's weights went to the temp file

    with pytest.raises(KeyboardInterrupt):
        save_module(model, target, force=True)

    assert files_in(tmp_path) == (["model.folded.pt"] if existing else [])
    if existing:
        assert target.read_bytes() == OLD


def _interrupting(real: Callable, *, before: bool) -> Callable:
    """``real`` that raises KeyboardInterrupt once, right after (or before) it runs."""
    state = {"fired": False}

    def wrapper(*args, **kwargs):
        if state["fired"]:
            return real(*args, **kwargs)
        state["fired"] = True
        if before:
            raise KeyboardInterrupt
        result = real(*args, **kwargs)
        if real is OS_OPEN:
            OS_CLOSE(result)  # the interrupt lands once the fd is back: close it, as exit would
        raise KeyboardInterrupt

    return wrapper


OS_OPEN, OS_CLOSE = os.open, os.close


# (step, where to patch, interrupt before the step runs?, does the new file land?)
STEPS = [
    ("temp-file-created", (os, "open"), False, False),
    ("temp-file-closed", (os, "close"), False, False),
    ("fsync", (saving, "_fsync"), False, False),
    ("mode-copied", (saving, "_copy_mode"), False, False),
    ("before-rename", (os, "replace"), True, False),
    ("after-rename", (os, "replace"), False, True),
    ("directory-fsync", (saving, "_fsync_directory"), True, True),
]


@pytest.mark.parametrize("existing", [True, False], ids=["over-an-old-file", "new-file"])
@pytest.mark.parametrize(("step", "where", "before", "lands"), STEPS, ids=[s[0] for s in STEPS])
def test_interrupt_at_every_step(step: str, where: tuple, before: bool, lands: bool, existing: bool,
                                 model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.folded.pt"
    if existing:
        target.write_bytes(OLD)
    owner, name = where
    monkeypatch.setattr(owner, name, _interrupting(getattr(owner, name), before=before))

    with pytest.raises(KeyboardInterrupt):
        save_module(model, target, force=True)
    monkeypatch.undo()

    if lands:  # the rename happened: the complete new file
        x = torch.randn(3, 64)
        torch.testing.assert_close(torch.load(target, weights_only=False)(x), model(x), rtol=0, atol=0)
    elif existing:
        assert target.read_bytes() == OLD
    assert files_in(tmp_path) == (["model.folded.pt"] if existing or lands else []), step


# --------------------------------------------------------------------------- a real SIGINT

BLOCKS, WIDTH = 8, 2048  # 8 x (Linear 2048x2048 + BatchNorm1d): 134 MB of weights


def big_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        linear, norm = nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH)
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(-1.5, 1.5)
            norm.bias.normal_()
        layers += [linear, norm, nn.ReLU()]
    return nn.Sequential(*layers).eval()


class Run:
    """``python -m normsurgeon fold`` watched from outside: when it opened MODEL, made the temp file."""

    def __init__(self, model: Path, out: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        args = [sys.executable, "-m", "normsurgeon", "fold", str(model), "--input-shape", f"2,{WIDTH}", "-o", str(out)]
        self.model, self.out = model, out
        self.process = subprocess.Popen(args, cwd=REPO, env=env, text=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_for(self, seen: Callable[[], bool], timeout: float = 120) -> float | None:
        """Poll every millisecond until ``seen()``; the time then, or None when the process ended first."""
        end = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < end:
            if seen():
                return time.monotonic()
            time.sleep(0.001)
        return None

    def loading(self) -> bool:
        """The process has MODEL open: it is past its imports, inside the command."""
        try:
            fds = os.listdir(f"/proc/{self.process.pid}/fd")
            return any(os.readlink(f"/proc/{self.process.pid}/fd/{fd}") == str(self.model) for fd in fds)
        except OSError:  # it ended, or closed that fd while we looked
            return False

    def writing(self) -> bool:
        """The temp file exists: an anonymous O_TMPFILE the process holds open in the output folder
        (its fd reads as '<folder>/#<inode> (deleted)'), or the fallback's hidden named one."""
        if any(name.startswith(f".{self.out.name}.") for name in os.listdir(self.out.parent)):
            return True
        try:
            fds = os.listdir(f"/proc/{self.process.pid}/fd")
            return any(os.readlink(f"/proc/{self.process.pid}/fd/{fd}").startswith(f"{self.out.parent}/#")
                       for fd in fds)
        except OSError:  # it ended, or closed that fd while we looked
            return False

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def finish(self) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=120)
        return self.process.returncode, stderr


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, nn.Module, str]]:
    model = big_model()
    path = tmp_path_factory.mktemp("big") / "big.pt"
    torch.save(model, path)
    yield path, model, sha256(path)
    path.unlink()


@pytest.fixture(scope="module")
def timeline(big: tuple[Path, nn.Module, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """One uninterrupted run: it must pass, and it says how long loading+folding and the write take."""
    path, model, _ = big
    out = tmp_path_factory.mktemp("calibration") / "out.pt"
    run = Run(path, out)
    loading = run.wait_for(run.loading)
    writing = run.wait_for(run.writing)
    written = run.wait_for(lambda: out.exists())
    code, stderr = run.finish()
    assert code == 0, stderr
    assert None not in (loading, writing, written), "the run was too quick to watch; make the model bigger"
    assert_complete(out, model)
    return {"to_write": writing - loading, "write": written - writing}


def assert_complete(out: Path, model: nn.Module) -> None:
    folded = torch.load(out, weights_only=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    x = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


# When SIGINT lands: "anywhere" from the moment the command opened MODEL until a little after the
# write; "writing" inside the window in which the temp file exists. Seeded, so reruns pick the
# same fractions (the machine's timing still varies).
_random = random.Random(8)
WHEN = [("anywhere", _random.uniform(0, 1.15)) for _ in range(3)]
WHEN += [("writing", _random.uniform(0, 1)) for _ in range(3)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="watches the process through /proc (Linux)")
@pytest.mark.parametrize(("phase", "fraction"), WHEN, ids=[f"{p}-{f:.2f}" for p, f in WHEN])
def test_sigint_during_fold(phase: str, fraction: float, big: tuple[Path, nn.Module, str],
                            timeline: dict[str, float], tmp_path: Path) -> None:
    path, model, digest = big
    out = tmp_path / "out.pt"
    run = Run(path, out)
    if phase == "anywhere":
        start, delay = run.wait_for(run.loading), fraction * (timeline["to_write"] + timeline["write"])
    else:
        start, delay = run.wait_for(run.writing), fraction * timeline["write"]
    if start is not None:
        time.sleep(max(0.0, start + delay - time.monotonic()))
        run.interrupt()
    code, stderr = run.finish()

    # 130: interrupted inside the command. -SIGINT: the signal came as the interpreter shut down,
    # after the command was done (a shell shows both as exit status 130).
    assert code in (0, 130, -signal.SIGINT), stderr
    if code == 130:
        assert stderr.strip() == INTERRUPTED
    if code != 130 or out.exists():  # done, or interrupted after the rename: the complete file
        assert_complete(out, model)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["out.pt"]), "a temp file was left behind"
    assert sha256(path) == digest, "the input changed"
