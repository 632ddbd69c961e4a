"""Atomic, input-protecting output writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from normsurgeon.errors import OutputError
from normsurgeon.io.loading import load_model
from normsurgeon.io.saving import default_output_path, save_module, save_state_dict, write_atomically


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def write_bytes(data: bytes):
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write


@pytest.mark.parametrize(
    ("name", "tag", "suffix", "expected"),
    [
        ("model.pt", "folded", None, "model.folded.pt"),
        ("model.pt2", "rmsnorm", None, "model.rmsnorm.pt2"),
        ("model.pt", "folded", ".onnx", "model.folded.onnx"),
        ("model.pt", "folded", "onnx", "model.folded.onnx"),
        ("dir.v1/model", "folded", None, "dir.v1/model.folded"),
    ],
)
def test_default_output_path(name: str, tag: str, suffix: str | None, expected: str) -> None:
    assert default_output_path(Path(name), tag, suffix) == Path(expected)


def test_writes_new_file_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"

    assert write_atomically(target, write_bytes(b"new")) == target

    assert target.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_refuses_to_overwrite_input_even_with_force(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes(b"original")

    for target in (source, tmp_path / "." / "model.pt"):
        with pytest.raises(OutputError) as exc:
            write_atomically(target, write_bytes(b"clobbered"), force=True, protect=[source])
        assert "input file" in one_line(exc)

    assert source.read_bytes() == b"original"


def test_refuses_input_reached_through_a_symlink(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes(b"original")
    link = tmp_path / "link.pt"
    link.symlink_to(source)

    with pytest.raises(OutputError):
        write_atomically(link, write_bytes(b"clobbered"), force=True, protect=[source])

    assert source.read_bytes() == b"original"


def test_existing_output_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    with pytest.raises(OutputError) as exc:
        write_atomically(target, write_bytes(b"new"))

    assert one_line(exc) == f"{target} exists; pass --force to overwrite"
    assert target.read_bytes() == b"old"

    write_atomically(target, write_bytes(b"new"), force=True)
    assert target.read_bytes() == b"new"


def test_missing_directory_is_named(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "out.bin"

    with pytest.raises(OutputError) as exc:
        write_atomically(target, write_bytes(b"x"))

    message = one_line(exc)
    assert str(target.parent) in message
    assert "does not exist" in message


def test_unwritable_directory_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # chmod alone does not stop root (CI containers), so deny write access to this directory.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))

    with pytest.raises(OutputError) as exc:
        write_atomically(locked / "out.bin", write_bytes(b"x"))

    message = one_line(exc)
    assert str(locked) in message
    assert "not writable" in message
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_old_file_and_no_temp(error: type[BaseException], tmp_path: Path) -> None:
    target = tmp_path / "model.folded.pt"
    old = os.urandom(4096)
    target.write_bytes(old)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half of the new ")
            f.flush()
        raise error("interrupted")

    with pytest.raises(error):
        write_atomically(target, write, force=True)

    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.folded.pt"]


def test_oserror_in_write_becomes_output_error(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError) as exc:
        write_atomically(tmp_path / "out.bin", write)

    assert "No space left on device" in one_line(exc)
    assert list(tmp_path.iterdir()) == []


def test_save_module_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).eval()
    target = tmp_path / "model.folded.pt"

    save_module(model, target)

    x = torch.randn(2, 3)
    torch.testing.assert_close(load_model(target).model(x), model(x), rtol=0, atol=0)


def test_save_module_refuses_input(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), source)
    before = source.read_bytes()

    with pytest.raises(OutputError):
        save_module(nn.Linear(2, 2), source, force=True, protect=[source])

    assert source.read_bytes() == before


def test_save_parametrized_module_explains(tmp_path: Path) -> None:
    model = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))
    target = tmp_path / "out.pt"

    with pytest.raises(OutputError) as exc:
        save_module(model, target)

    message = one_line(exc)
    assert "weight norm" in message
    assert "state_dict" in message
    assert list(tmp_path.iterdir()) == []


def test_save_module_unpicklable_attribute(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    model.fn = lambda x: x

    with pytest.raises(OutputError) as exc:
        save_module(model, tmp_path / "out.pt")

    assert "cannot pickle" in one_line(exc)
    assert list(tmp_path.iterdir()) == []


def test_save_state_dict(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    target = tmp_path / "weights.pt"

    save_state_dict(model.state_dict(), target)

    loaded = torch.load(target, weights_only=True)
    assert set(loaded) == {"weight", "bias"}
    assert torch.equal(loaded["weight"], model.weight)
