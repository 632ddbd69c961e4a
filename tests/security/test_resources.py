"""Files built to exhaust time, stack or memory (issue 13, class 8, except the unpickler's own limits):
a module DAG, list DAGs, self-referential and 200 000-deep lists as inputs, .npz zip bombs and
headers that claim terabytes. Each is refused (or read) in seconds, with a one-line error and its exit code.
"""

from __future__ import annotations

import io
import random
import struct
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.errors import PreconditionError
from normsurgeon.surgery import module_parents, shared_parameter_ids
from normsurgeon.trace import trace
from normsurgeon.walk import module_graph, refuse_unwalkable
from tests.helpers import sha256

from .conftest import TIME_LIMIT_S, Sandbox, cli_refused, refused

LOAD_ERROR, USAGE_ERROR, PRECONDITION_ERROR = 3, 2, 5


def module_dag(depth: int = 60) -> nn.Module:
    """``Sequential(m, m)`` nested ``depth`` deep around a Linear+BN: ``depth + 3`` modules, ~2**(depth + 2) paths."""
    module: nn.Module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    for _ in range(depth):
        module = nn.Sequential(module, module)
    return module.eval()


def list_dag(depth: int = 60) -> list:
    """``[x, x]`` nested ``depth`` deep around one tensor: 2**depth paths to it, 61 lists."""
    value: list = [torch.randn(3, 4)]
    for _ in range(depth):
        value = [value, value]
    return value


@pytest.fixture
def model_file(sandbox: Sandbox) -> Path:
    path = sandbox.root / "model.pt"
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval(), path)
    return path


def unchanged(sandbox: Sandbox, *paths: Path, digests: list[str]) -> None:
    assert [sha256(p) for p in paths] == digests
    sandbox.assert_untouched()


# --------------------------------------------------------------------------- module graphs


@pytest.mark.parametrize("command", [
    ["fold", "{model}", "--input-shape", "2,4"],
    ["inspect", "{model}", "--input-shape", "2,4"],
    ["recalibrate", "{model}", "--data", "{data}"],
    ["weightnorm", "apply", "{model}"],
], ids=["fold", "inspect", "recalibrate", "weightnorm-apply"])
def test_module_dag_is_refused_in_seconds(command: list[str], sandbox: Sandbox) -> None:
    path = sandbox.root / "dag.pt"
    torch.save(module_dag(), path)
    assert path.stat().st_size < 32_000
    data = sandbox.root / "calib.pt"
    torch.save([torch.randn(3, 4) for _ in range(3)], data)
    digests = [sha256(path), sha256(data)]
    sandbox.snapshot()

    args = [a.format(model=path, data=data) for a in command]
    line = cli_refused(*args, exit_code=LOAD_ERROR)

    assert f"{path}: the model registers its 63 modules under about 2**62 paths" in line, line
    unchanged(sandbox, path, data, digests=digests)


def test_module_cycle_is_refused(sandbox: Sandbox) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    model._modules["again"] = model  # registers itself: every recursive walk of torch's never ends
    path = sandbox.root / "cycle.pt"
    torch.save(model, path)
    digests = [sha256(path)]
    sandbox.snapshot()

    line = cli_refused("fold", path, "--input-shape", "2,4", exit_code=LOAD_ERROR)

    assert "module graph has a cycle (again registers a module that contains it)" in line, line
    unchanged(sandbox, path, digests=digests)


def test_module_walks_are_linear_on_a_dag() -> None:
    """What trace and surgery walk, on a DAG whose paths could never be enumerated (2**201)."""
    model = module_dag(depth=200)
    message = refused(lambda: trace(model, (torch.randn(2, 4),)), PreconditionError)
    assert "about 2**202 paths" in message

    parents = refused_not(lambda: module_parents(model))
    assert sum(len(v) for v in parents.values()) == 2 * 200 + 2  # one entry per registration
    shared = refused_not(lambda: shared_parameter_ids(model))
    assert len(shared) == 4  # Linear and BN parameters: each reachable under 2**200 names


def refused_not(call):
    """Run ``call`` and assert it is quick (these walks used to enumerate every path)."""
    start = time.perf_counter()
    result = call()
    assert time.perf_counter() - start < TIME_LIMIT_S
    return result


def _random_dag(rng: random.Random) -> nn.Module:
    """A small random module DAG: shared leaves, shared blocks, tied parameters."""
    pool: list[nn.Module] = [nn.Linear(2, 2), nn.Identity(), nn.BatchNorm1d(2)]
    for _ in range(rng.randint(1, 10)):
        block = nn.Module()
        for j in range(rng.randint(1, 4)):
            block.add_module(f"c{j}", rng.choice(pool))
        if rng.random() < 0.3:
            block.tied = pool[0].weight
        pool.append(block)
    return pool[-1]


def test_module_graph_matches_torch_on_shared_modules() -> None:
    """The linear walk gives exactly what torch's path enumeration gave, on models small enough to enumerate."""
    rng = random.Random(0)
    for _ in range(200):
        model = _random_dag(rng)
        graph = module_graph(model)
        everything = list(model.named_modules(remove_duplicate=False))
        last = {}
        for path, module in everything:
            last[module] = path
        assert graph.modules == [m for _, m in model.named_modules()]
        assert [graph.last_path[id(m)] for m in graph.modules] == [last[m] for m in graph.modules]
        assert graph.total_paths == len(everything)
        counts: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        assert shared_parameter_ids(model) >= {k for k, n in counts.items() if n > 1}
        refuse_unwalkable(model)


# --------------------------------------------------------------------------- inputs and data


def test_list_dag_as_inputs_is_walked_in_linear_time(model_file: Path, sandbox: Sandbox) -> None:
    inputs = sandbox.root / "inputs.pt"
    torch.save(list_dag(), inputs)
    digests = [sha256(model_file), sha256(inputs)]
    sandbox.snapshot()

    line = cli_refused("fold", model_file, "--inputs", inputs, exit_code=PRECONDITION_ERROR)

    assert "the model failed on the example inputs" in line, line
    unchanged(sandbox, model_file, inputs, digests=digests)


def test_list_dag_as_data_is_walked_in_linear_time(model_file: Path, sandbox: Sandbox) -> None:
    data = sandbox.root / "calib.pt"
    torch.save(list_dag(), data)
    digests = [sha256(model_file), sha256(data)]
    sandbox.snapshot()

    line = cli_refused("recalibrate", model_file, "--data", data, exit_code=USAGE_ERROR)

    assert "the calibration data does not fit the model: a batch of shape a list of 2 items" in line, line
    unchanged(sandbox, model_file, data, digests=digests)


class TakesExtra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, extra: object = None) -> torch.Tensor:
        return self.norm(self.linear(x))


def test_list_dag_argument_to_a_model_that_accepts_it() -> None:
    """fold (trace, check, float64 noise) on a model called with a 2**60-path argument: done in seconds."""
    model = TakesExtra().eval()
    with torch.no_grad():
        model.norm.running_var.uniform_(0.5, 2)
    report = refused_not(lambda: normsurgeon.fold(model, (torch.randn(3, 4), list_dag())))
    assert report.passed and len(report.changed("folded")) == 1


def test_self_referential_inputs_are_refused(model_file: Path, sandbox: Sandbox) -> None:
    inputs = sandbox.root / "inputs.pt"
    loop: list = [torch.randn(3, 4)]
    loop.append(loop)
    torch.save(loop, inputs)
    digests = [sha256(model_file), sha256(inputs)]
    sandbox.snapshot()

    line = cli_refused("fold", model_file, "--inputs", inputs, exit_code=LOAD_ERROR)

    assert f"{inputs} contains itself" in line, line
    unchanged(sandbox, model_file, inputs, digests=digests)


def test_self_referential_data_is_refused(model_file: Path, sandbox: Sandbox) -> None:
    data = sandbox.root / "calib.pt"
    loop: list = [torch.randn(3, 4)]
    loop.append(loop)
    torch.save(loop, data)
    sandbox.snapshot()

    line = cli_refused("recalibrate", model_file, "--data", data, exit_code=LOAD_ERROR)

    assert f"{data} contains itself" in line, line
    sandbox.assert_untouched()


def _save_deep_list(path: Path, depth: int) -> None:
    """torch.save a list nested ``depth`` deep (pickling it needs a deep stack: a thread with a big one)."""
    def save() -> None:
        value: list = [torch.zeros(1)]
        for _ in range(depth):
            value = [value]
        torch.save(value, path)

    old_limit, old_stack = sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(max(old_limit, 4 * depth))
    threading.stack_size(512 * 2**20)
    try:
        thread = threading.Thread(target=save)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(old_stack)
        sys.setrecursionlimit(old_limit)
    assert path.exists()


def test_deeply_nested_inputs_are_refused(model_file: Path, sandbox: Sandbox) -> None:
    inputs = sandbox.root / "inputs.pt"
    _save_deep_list(inputs, 200_000)
    digests = [sha256(model_file), sha256(inputs)]
    sandbox.snapshot()

    line = cli_refused("fold", model_file, "--inputs", inputs, exit_code=LOAD_ERROR)

    assert f"{inputs} is nested more than 200 levels deep" in line, line
    unchanged(sandbox, model_file, inputs, digests=digests)


# --------------------------------------------------------------------------- .npz


def _zip_one_deflated(path: Path, name: str, compressed: bytes, crc: int, size: int) -> None:
    """A one-member zip written by hand, so the member can be a precompressed stream."""
    name_bytes = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(compressed), size, len(name_bytes), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(compressed), size,
                          len(name_bytes), 0, 0, 0, 0, 0, 0)
    directory_offset = len(local) + len(name_bytes) + len(compressed)
    directory = central + name_bytes
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(directory), directory_offset, 0)
    path.write_bytes(local + name_bytes + compressed + directory + end)


def npz_bomb(path: Path, gib: int = 1) -> None:
    """An .npz of about ``gib`` MiB whose one float64 array inflates to ``gib`` GiB (deflate's ~1000:1 on zeros)."""
    header_stream = io.BytesIO()
    count = gib * 2**30 // 8
    np.lib.format.write_array_header_1_0(header_stream, {"descr": "<f8", "fortran_order": False, "shape": (count,)})
    header = header_stream.getvalue()
    chunk = bytes(2**20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)]
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert block == again  # after a full flush each MiB of zeros compresses to the same bytes
    chunks = gib * 1024
    parts += [block] * chunks + [deflate.flush()]
    crc = zlib.crc32(header)
    for _ in range(chunks):
        crc = zlib.crc32(chunk, crc)
    _zip_one_deflated(path, "arr_0.npy", b"".join(parts), crc, len(header) + count * 8)


def test_npz_zip_bomb_is_refused_before_inflating(model_file: Path, sandbox: Sandbox) -> None:
    data = sandbox.root / "bomb.npz"
    npz_bomb(data)
    assert data.stat().st_size < 1.5 * 2**20
    digests = [sha256(model_file), sha256(data)]
    sandbox.snapshot()

    line = cli_refused("recalibrate", model_file, "--data", data, exit_code=LOAD_ERROR)

    assert f"{data}: member arr_0.npy inflates to 1 GiB" in line and "zip bomb" in line, line
    unchanged(sandbox, model_file, data, digests=digests)


def test_npz_header_claiming_terabytes_is_refused(model_file: Path, sandbox: Sandbox) -> None:
    data = sandbox.root / "claims.npz"
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
    stream.write(bytes(8))  # one element of the 2**40 it claims
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("arr_0.npy", stream.getvalue())
    digests = [sha256(model_file), sha256(data)]
    sandbox.snapshot()

    line = cli_refused("recalibrate", model_file, "--data", data, exit_code=LOAD_ERROR)

    assert f"{data}: array arr_0 claims shape (1099511627776,) float64 = 8 TiB" in line, line
    unchanged(sandbox, model_file, data, digests=digests)


def test_ordinary_npz_still_loads(sandbox: Sandbox) -> None:
    from normsurgeon.io.data import load_batches

    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    ids = np.ones((8, 512), dtype=np.int64)
    np.savez_compressed(sandbox.root / "a.npz", x, ids)
    np.savez(sandbox.root / "b.npz", input_ids=ids)
    (batch,) = load_batches(sandbox.root / "a.npz").batches
    assert torch.equal(batch[0], torch.from_numpy(x)) and torch.equal(batch[1], torch.from_numpy(ids))
    (batch,) = load_batches(sandbox.root / "b.npz").batches
    assert set(batch) == {"input_ids"}


# --------------------------------------------------------------------------- RecursionError / MemoryError


def test_recursion_error_while_reading_a_file_is_one_line(model_file: Path, sandbox: Sandbox,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever walk overflows while a file is read, the CLI names the file (exit 3), no traceback."""
    data = sandbox.root / "calib.pt"
    torch.save([torch.randn(3, 4)] * 3, data)

    def overflow(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("normsurgeon.io.data.as_batches", overflow)
    sandbox.snapshot()

    line = cli_refused("recalibrate", model_file, "--data", data, exit_code=LOAD_ERROR)

    assert line == f"error: {data}: nested too deeply to read (RecursionError; a hostile or corrupt file?); re-save it"
    sandbox.assert_untouched()


def test_memory_error_while_working_is_one_line(model_file: Path, sandbox: Sandbox,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*args, **kwargs):
        raise MemoryError

    import normsurgeon.commands  # noqa: F401  (the package's `fold` is the command, so patch the module)

    monkeypatch.setattr(sys.modules["normsurgeon.commands.fold"], "run_fold", exhausted)
    sandbox.snapshot()

    line = cli_refused("fold", model_file, "--input-shape", "2,4", exit_code=1)

    assert line.startswith("error: ran out of memory (MemoryError) while processing the model"), line
    sandbox.assert_untouched()
