"""Where outputs go (issue 13, class 9): never over a file the command reads, never onto a device or fifo,
never over a file that appeared meanwhile, no temp file after ``kill -9``, and a full disk said as such.

Each test builds its files in the sandbox, runs the command the way a user would (in process through
the CLI, or ``write_atomically`` where the attack is a race), and asserts a one-line error with its
exit code, every input unchanged (hash), nothing written, in bounded time.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from normsurgeon.errors import OutputError
from normsurgeon.io import saving
from normsurgeon.io.saving import write_atomically
from tests.helpers import REPO, sha256

from .conftest import TIME_LIMIT_S, Sandbox, cli_refused, refused

OUTPUT_ERROR = 8


def linear_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


@pytest.fixture
def files(sandbox: Sandbox) -> dict[str, Path]:
    """A model, a weight-normed model, an inputs file, a data file, a data folder and an init-data file."""
    root = sandbox.root
    paths = {"model": root / "model.pt", "batch": root / "batch.pt", "data": root / "calib.pt",
             "folder": root / "calib", "init": root / "init.npz", "wn": root / "wn.pt"}
    torch.save(linear_bn(), paths["model"])
    with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated, and what old checkpoints hold
        warnings.simplefilter("ignore")
        torch.save(nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 4)), nn.BatchNorm1d(4)).eval(), paths["wn"])
    torch.save((torch.randn(3, 4),), paths["batch"])
    torch.save([torch.randn(3, 4) for _ in range(3)], paths["data"])
    paths["folder"].mkdir()
    for i in range(2):
        torch.save(torch.randn(3, 4), paths["folder"] / f"{i}.pt")
    np.savez(paths["init"], np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32))
    return paths


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------- every file read is protected

# (id, the command line with {model} {batch} ... placeholders, which file -o names)
READS = [
    ("fold-inputs", ["fold", "{model}", "--inputs", "{batch}"], "batch"),
    ("convert-inputs", ["convert", "{model}", "--to", "frozen-batchnorm", "--inputs", "{batch}"], "batch"),
    ("export-inputs", ["export", "{model}", "--inputs", "{batch}"], "batch"),
    ("recalibrate-data", ["recalibrate", "{model}", "--data", "{data}"], "data"),
    ("recalibrate-data-folder", ["recalibrate", "{model}", "--data", "{folder}"], "folder/0.pt"),
    ("weightnorm-init-data",
     ["weightnorm", "apply", "{model}", "--init-data", "{init}", "--input-shape", "3,4"], "init"),
    ("weightnorm-remove-inputs", ["weightnorm", "remove", "{wn}", "--inputs", "{batch}"], "batch"),
]


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in args]


def _target(files: dict[str, Path], key: str) -> Path:
    head, _, tail = key.partition("/")
    return files[head] / tail if tail else files[head]


@pytest.mark.parametrize(("args", "read"), [r[1:] for r in READS], ids=[r[0] for r in READS])
@pytest.mark.parametrize("how", ["same-path", "symlink", "hard-link"])
def test_output_onto_a_file_the_command_reads_is_refused_even_with_force(
        args: list[str], read: str, how: str, files: dict[str, Path], sandbox: Sandbox) -> None:
    read_path = _target(files, read)
    out = read_path
    if how == "symlink":
        out = sandbox.root / "link.out"
        out.symlink_to(read_path)
    elif how == "hard-link":
        out = sandbox.root / "hard.out"
        os.link(read_path, out)
    before = hashes(sandbox.root)
    sandbox.snapshot()

    line = cli_refused(*_fill(args, files), "-o", out, "--force", exit_code=OUTPUT_ERROR)

    assert "never overwritten" in line and str(out) in line, line
    assert hashes(sandbox.root) == before
    sandbox.assert_no_new_files()


def test_factory_weights_are_protected(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state_dict that ``--factory`` fills is MODEL: the output never replaces it."""
    (sandbox.root / "nets_for_test.py").write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    """))
    weights = sandbox.root / "weights.pth"
    torch.save(linear_bn().state_dict(), weights)
    monkeypatch.chdir(sandbox.root)
    before = hashes(sandbox.root)
    sandbox.snapshot()

    line = cli_refused("fold", weights, "--factory", "nets_for_test:build", "--import-path", sandbox.root,
                       "--input-shape", "3,4", "-o", weights, "--force", exit_code=OUTPUT_ERROR)

    assert "never overwritten" in line
    assert hashes(sandbox.root) == before
    sys.modules.pop("nets_for_test", None)


# --------------------------------------------------------------------------- targets that are not regular files


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _char_device(path: Path) -> None:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("creating a character device needs CAP_MKNOD")


def _socket(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    return server


@pytest.mark.parametrize("kind", ["fifo", "character-device", "socket", "symlink-to-fifo"])
def test_non_regular_output_is_refused_even_with_force(kind: str, files: dict[str, Path], sandbox: Sandbox) -> None:
    out = sandbox.root / "out.pt"
    keep = None
    if kind == "fifo":
        _fifo(out)
    elif kind == "character-device":
        _char_device(out)
    elif kind == "socket":
        keep = _socket(out)
    else:
        _fifo(sandbox.root / "pipe")
        out.symlink_to(sandbox.root / "pipe")
    mode = os.lstat(out).st_mode
    before = hashes(sandbox.root)
    sandbox.snapshot()
    try:
        line = cli_refused("fold", files["model"], "--input-shape", "3,4", "-o", out, "--force", exit_code=OUTPUT_ERROR)
    finally:
        if keep is not None:
            keep.close()

    assert "not a regular file" in line and "not even with --force" in line, line
    assert os.lstat(out).st_mode == mode, "the target was replaced"
    assert hashes(sandbox.root) == before
    sandbox.assert_no_new_files()


def test_dangling_symlink_output_counts_as_existing(files: dict[str, Path], sandbox: Sandbox) -> None:
    out = sandbox.root / "out.pt"
    out.symlink_to(sandbox.root / "nowhere.pt")
    sandbox.snapshot()

    line = cli_refused("fold", files["model"], "--input-shape", "3,4", "-o", out, exit_code=OUTPUT_ERROR)

    assert "exists" in line and "--force" in line, line
    assert out.is_symlink() and os.readlink(out) == str(sandbox.root / "nowhere.pt")
    sandbox.assert_no_new_files()


# --------------------------------------------------------------------------- races and crashes


@pytest.mark.parametrize("anonymous", [True, False], ids=["o-tmpfile", "named-temp-fallback"])
def test_output_that_appears_during_the_write_survives_without_force(
        anonymous: bool, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """TOCTOU: the target is free when checked, then another process creates it while we write."""
    if not anonymous:
        monkeypatch.setattr(saving, "_anonymous_files_supported", lambda: False)
    target = sandbox.root / "out.pt"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"ours " * 1000)
        target.write_bytes(b"theirs")  # appears between the check and the rename

    message = refused(lambda: write_atomically(target, write), OutputError)

    assert "appeared" in message and str(target) in message, message
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in sandbox.root.iterdir()) == ["out.pt"]


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from normsurgeon.io.saving import write_atomically

def write(tmp):
    with open(tmp, "wb") as f:
        for _ in range(32):  # 32 MiB, then wait to be killed
            f.write(bytes(1 << 20))
        f.flush()
        print("writing", flush=True)
        time.sleep(120)

write_atomically(Path(sys.argv[1]), write)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_TMPFILE is Linux's")
def test_sigkill_during_the_write_leaves_no_file(sandbox: Sandbox) -> None:
    folder = sandbox.root / "out"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(folder / "model.folded.pt")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "writing", process.stderr.read()  # type: ignore[union-attr]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == -signal.SIGKILL
    assert sorted(p.name for p in folder.iterdir()) == [], "a temp file outlived the process"


# --------------------------------------------------------------------------- a full disk


_FULL_DISK_FOLD = """
import resource, signal, sys, time
import normsurgeon.cli
from normsurgeon.commands import fold  # imported before the limit: nothing left to write but the output

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
start = time.perf_counter()
try:
    normsurgeon.cli.main(sys.argv[2:], prog_name="normsurgeon")
finally:
    print(f"seconds={time.perf_counter() - start:.2f}", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_full_disk_during_fold_says_so(sandbox: Sandbox) -> None:
    """A file-size limit (RLIMIT_FSIZE) makes every write past it fail with EFBIG, as a full disk does with ENOSPC."""
    model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256)).eval()  # 260 KB folded
    path = sandbox.root / "model.pt"
    torch.save(model, path)
    digest = sha256(path)
    out = sandbox.root / "model.folded.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "250"}
    result = subprocess.run([sys.executable, "-c", _FULL_DISK_FOLD, str(64 * 1024), "fold", str(path),
                             "--input-shape", "2,256", "-o", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)

    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == OUTPUT_ERROR, result.stderr
    assert len(errors) == 1 and errors[0].startswith("error: no space left on device"), result.stderr
    assert errors[0].endswith("free space or choose another path with -o"), errors[0]
    seconds = float(result.stdout.strip().rsplit("seconds=", 1)[-1])
    assert seconds < TIME_LIMIT_S
    assert sha256(path) == digest
    assert sorted(p.name for p in sandbox.root.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
], ids=["ENOSPC", "torch-stream-writer"])
def test_full_disk_is_not_reported_as_an_unpicklable_model(failure: BaseException, files: dict[str, Path],
                                                           sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise failure

    monkeypatch.setattr(torch, "save", save_until_full)
    sandbox.snapshot()

    line = cli_refused("fold", files["model"], "--input-shape", "3,4", exit_code=OUTPUT_ERROR)

    assert line.startswith("error: no space left on device: could not write"), line
    assert "cannot pickle" not in line
    assert line.endswith("free space or choose another path with -o"), line
    sandbox.assert_no_new_files()


# --------------------------------------------------------------------------- what still works


@pytest.mark.parametrize("anonymous", [True, False], ids=["o-tmpfile", "named-temp-fallback"])
def test_writers_get_a_path_that_works(anonymous: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save, torch.export.save and a writer that needs a real directory entry (named_temp) all land."""
    if not anonymous:
        monkeypatch.setattr(saving, "_anonymous_files_supported", lambda: False)
    model = linear_bn()
    write_atomically(tmp_path / "m.pt", lambda tmp: torch.save(model, tmp))
    program = torch.export.export(model, (torch.randn(2, 4),))
    write_atomically(tmp_path / "m.pt2", lambda tmp: torch.export.save(program, tmp))
    staged = tmp_path / "staged.bin"

    def rename_onto(tmp: Path) -> None:
        staged.write_bytes(b"staged")
        os.replace(staged, saving.named_temp(tmp))

    write_atomically(tmp_path / "renamed.bin", rename_onto)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt2", "renamed.bin"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(torch.load(tmp_path / "m.pt", weights_only=False)(x), model(x))
    torch.testing.assert_close(torch.export.load(tmp_path / "m.pt2").module()(x), model(x))
    assert (tmp_path / "renamed.bin").read_bytes() == b"staged"
    umask = os.umask(0)
    os.umask(umask)
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("m.pt", "m.pt2", "renamed.bin")} == {0o666 & ~umask}
