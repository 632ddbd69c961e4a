"""Shared checks for the hostile-input tests: each builds a payload, opens it, and asserts nothing happened.

"Nothing happened" means: no marker file (the payload's proof of execution), no new file anywhere
in the test's folder besides what the test made, no new module imported, a one-line error of the
expected class, and a bounded time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

import normsurgeon.cli
from normsurgeon.errors import NormSurgeonError

TIME_LIMIT_S = 10.0
# normsurgeon's own dependencies, which its CLI imports lazily (to print a report), and the codecs
# zipfile looks up for member names: never named by a payload.
APP_PACKAGES = frozenset({"normsurgeon", "rich", "click", "markdown_it", "mdurl", "onnx", "onnxruntime", "onnxscript",
                          "onnx_ir", "encodings"})


@dataclass
class Sandbox:
    """A folder for payloads, the marker a payload would create, and a snapshot of what exists."""

    root: Path
    marker: Path
    before_files: set[Path] = field(default_factory=set)
    before_modules: set[str] = field(default_factory=set)

    def snapshot(self) -> None:
        """Record the files and modules that exist now (call after building the payload)."""
        self.before_files = set(self.root.rglob("*"))
        self.before_modules = set(sys.modules)

    def assert_untouched(self, *, allowed_new: tuple[str, ...] = ()) -> None:
        """No marker, no new file, no module imported since :meth:`snapshot`."""
        self.assert_no_new_files(allowed_new=allowed_new)
        new_modules = {m for m in set(sys.modules) - self.before_modules if m.split(".")[0] not in APP_PACKAGES}
        assert not new_modules, f"modules were imported: {sorted(new_modules)[:10]}"

    def assert_no_new_files(self, *, allowed_new: tuple[str, ...] = ()) -> None:
        """No marker and no new file (dot-files and links included) since :meth:`snapshot`.

        For commands that may import their own libraries (onnx for export) on the way to a refusal.
        """
        assert not self.marker.exists(), f"the payload ran: {self.marker} exists"
        new_files = {p for p in set(self.root.rglob("*")) - self.before_files if p.name not in allowed_new}
        assert not new_files, f"files appeared: {sorted(map(str, new_files))}"


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    box = Sandbox(root=tmp_path, marker=tmp_path / "PWNED")
    yield box
    assert not box.marker.exists(), "the payload ran"


def refused(call: Callable[[], object], error: type[NormSurgeonError] = NormSurgeonError) -> str:
    """Run ``call``; assert it raises ``error`` with a one-line message within the time limit."""
    start = time.perf_counter()
    with pytest.raises(error) as info:
        call()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.1f} s to refuse"
    return message


def cli_refused(*args: object, exit_code: int) -> str:
    """Run the CLI in-process; assert the exit code and one ``error:`` line on stderr, in time."""
    start = time.perf_counter()
    result = CliRunner().invoke(normsurgeon.cli.main, [str(a) for a in args], env={"COLUMNS": "250"})
    elapsed = time.perf_counter() - start
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.1f} s to refuse"
    return errors[0]


def mutate(data: bytes, edits: list[tuple[str, float, int]]) -> bytes:
    """Apply fuzz edits (flip / insert / delete a byte at a relative position, or truncate) to ``data``."""
    for op, where, byte in edits:
        if not data:
            break
        i = int(where * len(data))
        if op == "flip":
            data = data[:i] + bytes([data[i] ^ (byte or 1)]) + data[i + 1:]
        elif op == "insert":
            data = data[:i] + bytes([byte]) + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + 1:]
        else:
            data = data[:max(i, 1)]
    return data
