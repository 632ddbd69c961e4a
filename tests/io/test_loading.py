"""Loading models safely: the supported forms, the errors, and real malicious pickles."""

from __future__ import annotations

import builtins
import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from normsurgeon.errors import LoadError, UnsafePickleError, UsageError
from normsurgeon.io.loading import (
    LoadedModel,
    import_callable,
    load_model,
    load_tensors,
    scan_pickle_globals,
)

HELPER_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, hidden)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            return self.head(y.mean(dim=(2, 3)))


    def build_model():
        torch.manual_seed(0)
        return TinyNet().eval()


    def build_wide():
        return TinyNet(hidden=16).eval()


    def build_not_a_module():
        return [1, 2, 3]
    """
)


class Payload:
    """Unpickles as ``func(*args)``: how a malicious checkpoint runs code on torch.load."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


def assert_one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A user-model module ``mymodels`` in tmp_path/src, imported once and then forgotten."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "mymodels.py").write_text(HELPER_SOURCE)
    monkeypatch.chdir(tmp_path)  # cwd must not hold mymodels.py: tests pass import_paths
    sys.modules.pop("mymodels", None)
    sys.path.insert(0, str(src))
    try:
        module = importlib.import_module("mymodels")
    finally:
        sys.path.remove(str(src))
    yield module
    sys.modules.pop("mymodels", None)


def forget_helper() -> None:
    """Make the next load import mymodels from disk again, as a fresh process would."""
    sys.modules.pop("mymodels", None)
    importlib.invalidate_caches()


# --------------------------------------------------------------------------- supported forms


def test_pickled_module_round_trip(helper: ModuleType, tmp_path: Path) -> None:
    model = helper.build_model()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    forget_helper()

    loaded = load_model(path, import_paths=[tmp_path / "src"])

    assert isinstance(loaded, LoadedModel)
    assert loaded.form == "module"
    assert loaded.source == path
    assert loaded.notes == []
    assert type(loaded.model).__name__ == "TinyNet"
    torch.testing.assert_close(loaded.model(x), expected, rtol=0, atol=0)


def test_cwd_is_on_the_import_path(helper: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    torch.save(helper.build_model(), path)
    forget_helper()
    monkeypatch.chdir(tmp_path / "src")

    assert load_model(path).form == "module"


def test_class_not_importable_names_it_and_import_path(helper: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(helper.build_model(), path)
    forget_helper()

    with pytest.raises(LoadError) as exc:
        load_model(path)

    message = assert_one_line(exc)
    assert "mymodels.TinyNet" in message
    assert "--import-path" in message
    assert str(path) in message


def test_state_dict_with_factory(helper: ModuleType, tmp_path: Path) -> None:
    model = helper.build_model()
    with torch.no_grad():
        model.bn.running_mean.uniform_()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    forget_helper()
    x = torch.randn(2, 3, 8, 8)

    loaded = load_model(path, factory="mymodels:build_model", import_paths=[tmp_path / "src"])

    assert loaded.form == "state_dict+factory"
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_checkpoint_dict_with_state_dict_key(helper: ModuleType, tmp_path: Path) -> None:
    model = helper.build_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)

    loaded = load_model(path, factory="mymodels:build_model", import_paths=[tmp_path / "src"])

    assert loaded.form == "state_dict+factory"
    torch.testing.assert_close(loaded.model.head.weight, model.head.weight)


def test_state_dict_without_factory_is_usage_error(helper: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(helper.build_model().state_dict(), path)

    with pytest.raises(UsageError) as exc:
        load_model(path)

    message = assert_one_line(exc)
    assert "--factory module:callable" in message
    assert str(path) in message


def test_strict_mismatch_lists_keys(helper: ModuleType, tmp_path: Path) -> None:
    state = helper.build_model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    path = tmp_path / "weights.pt"
    torch.save(state, path)

    with pytest.raises(LoadError) as exc:
        load_model(path, factory="mymodels:build_model", import_paths=[tmp_path / "src"])

    message = assert_one_line(exc)
    assert "missing keys head.bias" in message
    assert "unexpected keys extra.weight" in message


def test_strict_shape_mismatch(helper: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(helper.build_model().state_dict(), path)

    with pytest.raises(LoadError) as exc:
        load_model(path, factory="mymodels:build_wide", import_paths=[tmp_path / "src"])

    message = assert_one_line(exc)
    assert "size mismatch for head.weight" in message


def test_factory_must_return_a_module(helper: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(helper.build_model().state_dict(), path)

    with pytest.raises(LoadError) as exc:
        load_model(path, factory="mymodels:build_not_a_module", import_paths=[tmp_path / "src"])

    assert "not an nn.Module" in assert_one_line(exc)


class Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x)) * x.shape[0]


def test_pt2_round_trip(tmp_path: Path) -> None:
    model = Doubler().eval()
    x = torch.randn(3, 4)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)

    loaded = load_model(path)

    assert loaded.form == "exported_program"
    assert isinstance(loaded.exported_program, torch.export.ExportedProgram)
    x5 = torch.randn(5, 4)
    torch.testing.assert_close(loaded.model(x5), model(x5))


_OUTPUT_TYPE_MODULE = """
import dataclasses
import torch
import torch.utils._pytree as pytree

@dataclasses.dataclass
class Features:
    last: torch.Tensor

pytree.register_dataclass(Features, serialized_type_name="ns_test_output_type.Features")

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return Features(self.conv(x))
"""


def test_pt2_whose_output_type_is_not_registered_here_names_the_type_and_the_fix(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """transformers' ModelOutput classes are such types: the .pt2 loads only where transformers is imported."""
    (tmp_path / "ns_test_output_type.py").write_text(_OUTPUT_TYPE_MODULE)
    path = tmp_path / "features.pt2"
    subprocess.run([sys.executable, "-c", "import torch, ns_test_output_type as m\n"
                    f"torch.export.save(torch.export.export(m.Net().eval(), (torch.randn(1, 3, 8, 8),)), {str(path)!r})"],
                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=True, timeout=300)
    assert "ns_test_output_type" not in sys.modules
    capfd.readouterr()
    with pytest.raises(LoadError, match=r"use ns_test_output_type\.Features, a type this process has not registered "
                       r"with torch's pytree; re-export it returning plain tensors .* import ns_test_output_type before"):
        load_model(path)
    assert "Traceback" not in capfd.readouterr().err  # torch's own logged traceback is not printed


@pytest.mark.slow
def test_transformers_model_loads_safely(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    model = transformers.ResNetModel(config).eval()
    pixels = torch.randn(1, 3, 32, 32)
    path = tmp_path / "resnet.pt"
    torch.save(model, path)

    loaded = load_model(path)  # default: safe, no --trust-pickle

    assert loaded.notes == []
    with torch.no_grad():
        got, want = loaded.model(pixels).last_hidden_state, model(pixels).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- malicious pickles

MARKER_CASES = ["os.system", "builtins.eval", "subprocess.Popen"]


def payload_for(kind: str, marker: Path) -> Payload:
    if kind == "os.system":
        return Payload(os.system, (f"touch '{marker}'",))
    if kind == "builtins.eval":
        return Payload(builtins.eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",))
    return Payload(subprocess.Popen, (["touch", str(marker)],))


def wait_for(path: Path, seconds: float = 5.0) -> bool:
    """Popen runs its child asynchronously: give it a moment."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", MARKER_CASES)
def test_malicious_pickle_is_refused_without_running(kind: str, zip_format: bool, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(2), "x": payload_for(kind, marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(UnsafePickleError) as exc:
        load_model(path)
    with pytest.raises(UnsafePickleError):
        load_tensors(path)

    message = assert_one_line(exc)
    assert kind in message
    assert "--trust-pickle" in message
    assert str(path) in message
    time.sleep(0.1)
    assert not marker.exists()


@pytest.mark.parametrize("kind", MARKER_CASES)
def test_trusted_malicious_pickle_really_runs(kind: str, tmp_path: Path) -> None:
    """Proves the payloads above are real: trusting the file executes them."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "x": payload_for(kind, marker)}, path)

    with pytest.raises(LoadError):  # it executes, then turns out not to be a model
        load_model(path, trust_pickle=True)

    assert wait_for(marker)


def test_torch_python_functions_are_refused(tmp_path: Path) -> None:
    written = tmp_path / "written.pt"
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload(torch.save, (torch.ones(1), str(written)))}, path)

    with pytest.raises(UnsafePickleError) as exc:
        load_model(path)

    assert "torch.serialization.save" in assert_one_line(exc)
    assert not written.exists()


def test_malicious_payload_next_to_a_real_model(helper: ModuleType, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = helper.build_model()
    model.evil = payload_for("os.system", marker)
    path = tmp_path / "model.pt"
    torch.save(model, path)

    with pytest.raises(UnsafePickleError) as exc:
        load_model(path, import_paths=[tmp_path / "src"])

    assert "os.system" in assert_one_line(exc)
    assert not marker.exists()


def test_scan_lists_globals_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": payload_for("os.system", marker)}, path)

    refs = scan_pickle_globals(path)

    assert ("posix", "system") in refs or ("nt", "system") in refs
    assert ("torch._utils", "_rebuild_tensor_v2") in refs
    assert not marker.exists()


def test_plain_pickle_with_protocol_4_is_scanned(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(Payload(builtins.eval, ("1",)), protocol=4))

    assert ("builtins", "eval") in scan_pickle_globals(path)


def rewrite_pt2(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))


@pytest.fixture
def clean_pt2(tmp_path: Path) -> Path:
    x = torch.randn(3, 4)
    program = torch.export.export(Doubler().eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    path = tmp_path / "clean.pt2"
    torch.export.save(program, path)
    return path


def test_pt2_with_malicious_sample_inputs(clean_pt2: Path, tmp_path: Path) -> None:
    """torch.export.load unpickles sample inputs with a weights_only=False fallback."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(((torch.ones(3, 4), payload_for("os.system", marker)), {}), buffer)
    evil = tmp_path / "evil.pt2"
    rewrite_pt2(clean_pt2, evil, lambda n, d: buffer.getvalue() if n.endswith("sample_inputs/model.pt") else d)

    with pytest.raises(UnsafePickleError) as exc:
        load_model(evil)

    assert "os.system" in assert_one_line(exc)
    assert not marker.exists()
    with pytest.raises(LoadError):
        load_model(evil, trust_pickle=True)
    assert marker.exists()  # the payload is real


def test_pt2_with_code_in_a_symbolic_expression(clean_pt2: Path, tmp_path: Path) -> None:
    """torch.export.load parses expressions with sympy.sympify, which evals them."""
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        text = data.decode()
        start = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', start)
        return (text[:start] + code.replace('"', '\\"') + text[end:]).encode()

    evil = tmp_path / "evil.pt2"
    rewrite_pt2(clean_pt2, evil, edit)

    with pytest.raises(UnsafePickleError) as exc:
        load_model(evil)

    assert "expression" in assert_one_line(exc)
    assert not marker.exists()
    with pytest.raises(LoadError):
        load_model(evil, trust_pickle=True)
    assert marker.exists()


def test_pt2_with_unsafe_graph_call_and_guard(clean_pt2: Path, tmp_path: Path) -> None:
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        doc = json.loads(data)
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.system"
        doc["guards_code"] = ["__import__('os').system('true') == 0"]
        return json.dumps(doc).encode()

    evil = tmp_path / "evil.pt2"
    rewrite_pt2(clean_pt2, evil, edit)

    with pytest.raises(UnsafePickleError) as exc:
        load_model(evil)

    message = assert_one_line(exc)
    assert "graph call torch.serialization.os.system" in message
    assert "guard" in message


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(LoadError) as exc:
        load_model(path)
    assert str(path) in assert_one_line(exc)
    assert "no such file" in str(exc.value)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.pt", b"", "empty"),
        ("notes.pt", b"just some text\nnot a model\n", "text"),
        ("garbage.pt", bytes(range(3, 40)), "not a torch.save"),
    ],
)
def test_unreadable_files(name: str, content: bytes, expected: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(LoadError) as exc:
        load_model(path)

    message = assert_one_line(exc)
    assert str(path) in message
    assert expected in message


def test_truncated_zip(tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    torch.save(nn.Linear(4, 4), full)
    path = tmp_path / "truncated.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])

    with pytest.raises(LoadError) as exc:
        load_model(path)

    message = assert_one_line(exc)
    assert str(path) in message
    assert "truncated or corrupt" in message


def test_truncated_legacy_pickle(tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    torch.save(nn.Linear(4, 4), full, _use_new_zipfile_serialization=False)
    path = tmp_path / "truncated.pt"
    path.write_bytes(full.read_bytes()[:40])

    with pytest.raises(LoadError) as exc:
        load_model(path)

    assert str(path) in assert_one_line(exc)


def test_pickled_non_module(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)

    with pytest.raises(LoadError) as exc:
        load_model(path)

    message = assert_one_line(exc)
    assert str(path) in message
    assert "a list of 3 items" in message


def test_dict_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)

    with pytest.raises(LoadError) as exc:
        load_model(path)

    assert "'epoch'" in assert_one_line(exc)


# --------------------------------------------------------------------------- tensors, factories


def test_load_tensors_tuple_and_dict(tmp_path: Path) -> None:
    path = tmp_path / "inputs.pt"
    ids = torch.tensor([[1, 2, 3]])
    torch.save((ids, {"mask": torch.ones(1, 3)}), path)

    loaded = load_tensors(path)

    assert torch.equal(loaded[0], ids)
    assert torch.equal(loaded[1]["mask"], torch.ones(1, 3))


def test_load_tensors_without_tensor(tmp_path: Path) -> None:
    path = tmp_path / "inputs.pt"
    torch.save([1, 2], path)

    with pytest.raises(LoadError) as exc:
        load_tensors(path)

    assert "no tensor" in assert_one_line(exc)


def test_load_tensors_refuses_module_classes(tmp_path: Path) -> None:
    path = tmp_path / "inputs.pt"
    torch.save(nn.Linear(2, 2), path)

    with pytest.raises(LoadError) as exc:
        load_tensors(path)

    # a model where inputs belong: said as such, not as an unsafe pickle to --trust
    assert not isinstance(exc.value, UnsafePickleError)
    assert "holds a model (torch.nn.modules.linear.Linear), not example inputs" in assert_one_line(exc)


def test_import_callable(helper: ModuleType, tmp_path: Path) -> None:
    forget_helper()
    build = import_callable("mymodels:build_model", import_paths=[tmp_path / "src"])
    assert isinstance(build(), nn.Module)


@pytest.mark.parametrize("spec", ["mymodels", "mymodels:", ":build", "my models:build", "a:b:c"])
def test_import_callable_bad_format(spec: str) -> None:
    with pytest.raises(UsageError) as exc:
        import_callable(spec)
    assert "package.module:callable" in assert_one_line(exc)


def test_import_callable_missing_module_and_attr(helper: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(LoadError) as exc:
        import_callable("no_such_module_xyz:build")
    assert "no_such_module_xyz" in assert_one_line(exc)

    with pytest.raises(LoadError) as exc:
        import_callable("mymodels:no_such_factory", import_paths=[tmp_path / "src"])
    assert "no_such_factory" in assert_one_line(exc)


def _repoint_bias(clean: Path, evil: Path, member_suffix: str, payload: bytes) -> None:
    """Declare the bias as a pickled payload at ``member_suffix`` and put ``payload`` there."""

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            entry = next(v for k, v in config["config"].items() if k.endswith("lin.bias"))
            entry.update(path_name=member_suffix, use_pickle=True, tensor_meta=None)
            return json.dumps(config).encode()
        return payload if name.endswith("data/weights/" + member_suffix) else data

    rewrite_pt2(clean, evil, edit)
    if member_suffix.startswith("extra_files/"):
        top = zipfile.ZipFile(clean).namelist()[0].split("/")[0]
        with zipfile.ZipFile(evil, "a") as zout:
            zout.writestr(f"{top}/data/weights/{member_suffix}", payload)


@pytest.mark.parametrize("member", ["extra_files/evil", "weight_0"], ids=["hidden-in-extra-files", "aliasing-a-raw-weight"])
def test_pt2_pickled_weight_cannot_hide_from_the_scan(clean_pt2: Path, tmp_path: Path, member: str) -> None:
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(payload_for("os.system", marker), buffer)
    evil = tmp_path / "evil.pt2"
    _repoint_bias(clean_pt2, evil, member, buffer.getvalue())

    with pytest.raises(UnsafePickleError) as exc:
        load_model(evil)

    assert "os.system" in assert_one_line(exc)
    assert not marker.exists()


def test_pt2_with_compiled_aotinductor_code_is_refused(clean_pt2: Path, tmp_path: Path) -> None:
    evil = tmp_path / "aoti.pt2"
    rewrite_pt2(clean_pt2, evil, lambda n, d: d)
    top = zipfile.ZipFile(clean_pt2).namelist()[0].split("/")[0]
    with zipfile.ZipFile(evil, "a") as zout:
        zout.writestr(f"{top}/data/aotinductor/model/model.so", b"\x7fELF")

    with pytest.raises(UnsafePickleError) as exc:
        load_model(evil)

    assert "AOTInductor" in assert_one_line(exc)
