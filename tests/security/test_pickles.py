"""Hostile ``torch.save`` pickles (issue 13, classes 1-4 and the controls): each payload is built here,
opened the way a user would, and must be refused before anything of its choosing runs or is imported.
"""

from __future__ import annotations

import argparse
import copyreg
import functools
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from normsurgeon.errors import LoadError, UnsafePickleError
from normsurgeon.io.loading import load_model, load_tensors

from .conftest import Sandbox, cli_refused, refused

REPO = Path(__file__).resolve().parents[2]


class Reduce:
    """Pickles as ``func(*args)``: the classic payload shape."""

    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


class _Placeholder:
    pass


def newobj(cls: type, state: dict) -> Any:
    """An object that torch.save writes as NEWOBJ ``cls`` + BUILD ``state`` whatever ``cls.__reduce__`` says.

    This is the shape torch.save gives an nn.Module; it lets a test write a class the way an
    attacker would, without running the class's own constructor or reducer here.
    """
    obj = _Placeholder()
    obj.__class__ = cls
    object.__getattribute__(obj, "__dict__").update(state)
    _AS_NEWOBJ[id(obj)] = (obj, state)
    return obj


_AS_NEWOBJ: dict[int, tuple[Any, dict]] = {}


class _NewObjPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if id(obj) in _AS_NEWOBJ:
            return copyreg.__newobj__, (type(obj),), _AS_NEWOBJ[id(obj)][1]
        return NotImplemented


_PICKLE_MODULE = type(pickle)("payload_pickle")
_PICKLE_MODULE.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
_PICKLE_MODULE.Pickler = _NewObjPickler


def save(obj: Any, path: Path) -> Path:
    """torch.save, writing the objects made by :func:`newobj` as NEWOBJ + BUILD."""
    torch.save(obj, path, pickle_module=_PICKLE_MODULE)
    return path


# --------------------------------------------------------------------------- 1. torch classes that run code


def _lazy_graph_module_payload(marker: Path) -> Any:
    """A _LazyGraphModule whose code generator's function name smuggles a statement into the source it execs."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    graph = torch.fx.symbolic_trace(nn.Identity()).graph
    graph._codegen._func_name = (
        f"forward(self, x):\n    __import__('pathlib').Path({str(marker)!r}).touch()\n    return x\ndef unused"
    )
    state = {**nn.Module().__dict__, "_graph": graph, "training": False, "_tracer_cls": None, "meta": {},
             "_tracer_extras": {}, "_erase_node": None}
    return newobj(_LazyGraphModule, state)


def test_fx_graph_module_that_execs_its_source_is_refused(sandbox: Sandbox) -> None:
    path = save(_lazy_graph_module_payload(sandbox.marker), sandbox.root / "graph.pt")
    sandbox.snapshot()

    message = cli_refused("fold", path, "--input-shape", "1,4", "-o", sandbox.root / "out.pt", exit_code=4)

    assert "torch.fx" in message and "--trust-pickle" in message
    sandbox.assert_untouched()


def test_fx_graph_module_is_refused_by_the_python_api(sandbox: Sandbox) -> None:
    path = save(_lazy_graph_module_payload(sandbox.marker), sandbox.root / "graph.pt")
    sandbox.snapshot()

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert "GraphModule" in message
    sandbox.assert_untouched()


# --------------------------------------------------------------------------- 2. native libraries


@pytest.fixture
def marker_library(sandbox: Sandbox) -> Path:
    """A shared library whose constructor creates the marker: loading it is running it."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the marker library (the refusal is still checked by name below)")
    source = sandbox.root / "marker.c"
    source.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void run(void) {{ fclose(fopen("{sandbox.marker}", "w")); }}
    """))
    library = sandbox.root / "libmarker.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


@pytest.mark.parametrize("loader", ["torch._inductor.codecache.DLLWrapper", "torch._C._aoti.AOTIModelContainerRunnerCpu"])
def test_native_library_loaders_are_refused(loader: str, marker_library: Path, sandbox: Sandbox) -> None:
    module, name = loader.rsplit(".", 1)
    path = sandbox.root / "native.pt"
    write_torch_save(path, _pickle_referencing(module, name, (str(marker_library),)))
    sandbox.snapshot()

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert loader in message
    sandbox.assert_untouched()


def write_torch_save(path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save zip archive whose data.pkl is ``pickle_bytes``: what torch.load really reads."""
    template = path.with_name(path.name + ".template")
    torch.save(0, template)
    with zipfile.ZipFile(template) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, pickle_bytes if info.filename.endswith("data.pkl") else zin.read(info))
    template.unlink()
    return path


def _pickle_referencing(module: str, name: str, args: tuple = (), *, reduce: bool = True) -> bytes:
    """Protocol-2 bytes: GLOBAL module.name, args, REDUCE (or just the GLOBAL as a value)."""
    body = b"\x80\x02c" + f"{module}\n{name}\n".encode()
    if reduce:
        body += pickle.dumps(args, protocol=2)[2:-1] + b"R"
    return body + b"."


# --------------------------------------------------------------------------- 3. imports before the verdict

MAIN_MODULES = ["torch.utils.model_dump.__main__", "numpy.f2py.__main__", "pygments.__main__", "tqdm.__main__",
                "typer.__main__"]
SIDE_EFFECT_MODULES = ["torch.backends.xeon.run_cpu", "torch._inductor.fx_passes.numeric_utils"]


@pytest.mark.parametrize("module", MAIN_MODULES + SIDE_EFFECT_MODULES)
def test_modules_named_by_the_file_are_not_imported_to_judge_it(module: str, sandbox: Sandbox) -> None:
    path = sandbox.root / "imports.pt"
    write_torch_save(path, _pickle_referencing(module, "Model", reduce=False))
    sys.modules.pop(module, None)
    sandbox.snapshot()

    refused(lambda: load_model(path), LoadError)

    sandbox.assert_untouched()
    assert module not in sys.modules


TRAIN_PY = """
import pathlib
pathlib.Path({marker!r}).touch()

def build():
    raise SystemExit("ran")
"""


def test_a_function_in_a_local_module_is_refused_without_importing_it(sandbox: Sandbox,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (sandbox.root / "train_payload.py").write_text(TRAIN_PY.format(marker=str(sandbox.marker)))
    path = sandbox.root / "model.pt"
    write_torch_save(path, _pickle_referencing("train_payload", "build"))
    monkeypatch.chdir(sandbox.root)
    sandbox.snapshot()

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert "train_payload.build" in message and "nothing was executed" in message
    sandbox.assert_untouched()


def test_inputs_naming_a_local_module_are_judged_without_importing_it(sandbox: Sandbox,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (sandbox.root / "netdef_payload.py").write_text(
        TRAIN_PY.format(marker=str(sandbox.marker)) + "\nclass Net:\n    pass\n")
    path = sandbox.root / "inputs.pt"
    write_torch_save(path, _pickle_referencing("netdef_payload", "Net", reduce=False))
    monkeypatch.chdir(sandbox.root)
    sandbox.snapshot()

    message = refused(lambda: load_tensors(path), LoadError)

    assert "netdef_payload.Net" in message
    sandbox.assert_untouched()


SHADOW = "import pathlib\npathlib.Path({marker!r}).touch()\nraise SystemExit('shadowed')\n"


def test_a_local_file_cannot_shadow_an_installed_package(sandbox: Sandbox) -> None:
    """A ``transformers.py`` beside the model is never imported in place of transformers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    save(model, sandbox.root / "bert.pt")
    (sandbox.root / "transformers.py").write_text(SHADOW.format(marker=str(sandbox.marker)))
    code = "import sys; from normsurgeon.cli import main; sys.argv[0] = 'normsurgeon'; main()"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}

    result = subprocess.run([sys.executable, "-c", code, "inspect", "bert.pt", "--input-shape", "1,8:int64"],
                            cwd=sandbox.root, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert not sandbox.marker.exists()


# --------------------------------------------------------------------------- 4. modules torch itself denies


@pytest.mark.parametrize("cls", [
    "torch.jit._script.RecursiveScriptModule",
    "torch.nn.parallel.distributed.DistributedDataParallel",
    "torch.fx.graph_module.GraphModule",
    "torch.ao.quantization.fake_quantize.FakeQuantize",
])
def test_module_classes_from_torch_outside_torch_nn_are_refused(cls: str, sandbox: Sandbox) -> None:
    module, name = cls.rsplit(".", 1)
    path = sandbox.root / "denied.pt"
    write_torch_save(path, b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")\x81}b.")  # NEWOBJ + BUILD {}
    sandbox.snapshot()

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert cls in message


# --------------------------------------------------------------------------- calls that allocate


@pytest.mark.parametrize("payload", [
    pytest.param(_pickle_referencing("torch", "ones", (2**28,)), id="torch.ones"),
    pytest.param(_pickle_referencing("torch", "FloatTensor", (2**28,)), id="torch.FloatTensor"),
    pytest.param(_pickle_referencing("builtins", "bytearray", (2**33,)), id="bytearray"),
])
def test_calls_that_allocate_are_refused(payload: bytes, sandbox: Sandbox) -> None:
    path = sandbox.root / "alloc.pt"
    write_torch_save(path, payload)

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert "--trust-pickle" in message


def test_rebuild_from_type_cannot_call_a_stored_function(sandbox: Sandbox) -> None:
    """torch.ones is allowed as a stored value (an activation), never called through a rebuild helper."""
    path = sandbox.root / "rebuild.pt"
    write_torch_save(path, b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(ctorch\nones\nctorch\nTensor\n"
                     + pickle.dumps((2**28,), protocol=2)[2:-1] + b"}tR.")

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert "torch.ones" in message or "_rebuild_from_type_v2" in message


def _claim_huge_storages(pickle_bytes: bytes) -> bytes:
    """Rewrite each storage's element count (the int after its 'cpu' location) to 2**40."""
    huge = b"\x8a\x06" + (2**40).to_bytes(6, "little")  # LONG1
    return re.sub(rb"(X\x03\x00\x00\x00cpu(?:q.)?)(K.|M..|J....)", lambda m: m[1] + huge, pickle_bytes,
                  flags=re.DOTALL)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_storage_claiming_more_than_the_file_holds_is_refused(zip_format: bool, sandbox: Sandbox) -> None:
    path = sandbox.root / "model.pt"
    torch.save(nn.Linear(4, 4), path, _use_new_zipfile_serialization=zip_format)
    if zip_format:
        with zipfile.ZipFile(path) as zin:
            members = {info: zin.read(info) for info in zin.infolist()}
        with zipfile.ZipFile(path, "w") as zout:
            for info, data in members.items():
                zout.writestr(info, _claim_huge_storages(data) if info.filename.endswith("data.pkl") else data)
    else:
        path.write_bytes(_claim_huge_storages(path.read_bytes()))

    message = refused(lambda: load_model(path), LoadError)

    assert "claims" in message and "more than the file holds" in message


# --------------------------------------------------------------------------- the controls

CONTROLS = [("os", "system", ("touch {marker}",)), ("builtins", "exec", ("open({marker!r}, 'w')",)),
            ("builtins", "eval", ("open({marker!r}, 'w')",)), ("subprocess", "Popen", (["touch", "{marker}"],)),
            ("importlib", "import_module", ("this",))]


@pytest.mark.parametrize("module,name,args", CONTROLS, ids=[f"{m}.{n}" for m, n, _ in CONTROLS])
def test_the_classic_payloads_are_still_refused(module: str, name: str, args: tuple, sandbox: Sandbox) -> None:
    args = tuple(a.format(marker=sandbox.marker) if isinstance(a, str) else
                 [x.format(marker=sandbox.marker) for x in a] if isinstance(a, list) else a for a in args)
    path = sandbox.root / "classic.pt"
    write_torch_save(path, _pickle_referencing(module, name, args))
    sandbox.snapshot()

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert f"{'os' if module == 'posix' else module}.{name}" in message
    sandbox.assert_untouched()


def test_copyreg_extension_opcodes_are_refused(sandbox: Sandbox) -> None:
    copyreg.add_extension("posix", "system", 0xBEEF)
    try:
        payload = pickle.dumps(Reduce(os.system, (f"touch {sandbox.marker}",)), protocol=2)
    finally:
        copyreg.remove_extension("posix", "system", 0xBEEF)
    copyreg.add_extension("posix", "system", 0xBEEF)  # as a hostile environment would have it registered
    try:
        path = write_torch_save(sandbox.root / "ext.pt", payload)
        message = refused(lambda: load_model(path), UnsafePickleError)
    finally:
        copyreg.remove_extension("posix", "system", 0xBEEF)

    assert "copyreg extension" in message


def test_a_class_with_its_own_setstate_is_refused(sandbox: Sandbox) -> None:
    path = sandbox.root / "setstate.pt"
    save(newobj(SetStateModule, {**nn.Module().__dict__, "x": 1}), path)

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert "__setstate__" in message


class SetStateModule(nn.Module):
    """An nn.Module that runs its own code when unpickled."""

    def __setstate__(self, state: dict) -> None:
        raise AssertionError("ran")


# --------------------------------------------------------------------------- what must keep loading


def _zip_pickle(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))


def test_a_module_pickle_never_reaches_pythons_unpickler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing falls back to pickle.Unpickler / weights_only=False in the safe path."""
    path = save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), tmp_path / "m.pt")
    monkeypatch.setattr(pickle, "Unpickler", None)

    loaded = load_model(path).model

    assert isinstance(loaded[1], nn.BatchNorm2d)


def _same_outputs(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        got, want = a(*inputs), b(*inputs)
    got, want = (getattr(x, "logits", x) for x in (got, want))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("example", sorted((REPO / "models" / "examples").glob("*.pt")), ids=lambda p: p.name)
def test_bundled_examples_load_without_flags(example: Path) -> None:
    loaded = load_model(example)
    assert loaded.notes == [] and isinstance(loaded.model, nn.Module)


LLM_CONFIGS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 8}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"pad_token_id": 0}),
}


@pytest.mark.slow
@pytest.mark.parametrize("route", ["config", "from_pretrained"])
@pytest.mark.parametrize("name", list(LLM_CONFIGS))
def test_transformers_language_models_load_without_flags(name: str, route: str, tmp_path: Path) -> None:
    """transformers 5 pickles reference kernels' rebuild helper and Mode enum; both load safely."""
    transformers = pytest.importorskip("transformers")
    model_class, config_class, extra = LLM_CONFIGS[name]
    config = getattr(transformers, config_class)(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    if route == "from_pretrained":
        model.save_pretrained(tmp_path / "hf")
        model = getattr(transformers, model_class).from_pretrained(tmp_path / "hf").eval()
    path = save(model, tmp_path / f"{name}.pt")

    loaded = load_model(path)

    assert loaded.notes == []
    _same_outputs(loaded.model, model, torch.randint(0, 64, (1, 8)))


class WithExtras(nn.Module):
    """A module holding what real checkpoints hold besides layers: a partial of an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.act = functools.partial(nn.functional.gelu, approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_ordinary_checkpoints_load_without_flags(zip_format: bool, tmp_path: Path) -> None:
    model = nn.Sequential(nn.utils.weight_norm(nn.Conv1d(2, 3, 3)), nn.BatchNorm1d(3), WithExtras()).eval()
    checkpoint = {"model": model, "args": argparse.Namespace(lr=0.1, arch="net"), "epoch": 3}
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)

    loaded = load_model(path)

    _same_outputs(loaded.model, model, torch.randn(2, 2, 6))
    assert loaded.notes == ["took the module stored under the checkpoint's 'model' key"]


def test_a_zip_bomb_is_refused_before_it_is_inflated(sandbox: Sandbox) -> None:
    path = save(nn.Linear(2, 2), sandbox.root / "bomb.pt")
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data/bomb", "w", force_zip64=True) as member:
            for _ in range(16):
                member.write(bytes(16 * 1024 * 1024))  # 256 MiB of zeros, about 256 KB compressed

    message = refused(lambda: load_model(path), LoadError)

    assert "zip bomb" in message and path.stat().st_size < 1024 * 1024


class Settings(dict):
    """A plain dict subclass a package may keep beside its model (restored with dict's own methods)."""


class WithSettings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.settings = Settings(scale=2, names=["a"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.settings["scale"]


def test_a_dict_subclass_of_the_models_package_loads(tmp_path: Path) -> None:
    model = WithSettings().eval()
    path = save(model, tmp_path / "settings.pt")

    loaded = load_model(path).model

    assert type(loaded.settings) is Settings and loaded.settings == {"scale": 2, "names": ["a"]}
    _same_outputs(loaded, model, torch.randn(3, 2))


def test_a_global_hidden_behind_pop_is_seen_by_the_scan(sandbox: Sandbox) -> None:
    """Push 'os' 'system', then a harmless pair, POP it, and STACK_GLOBAL the first pair."""
    def string(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    payload = (b"\x80\x04" + string("posix") + string("system") + string("collections") + string("OrderedDict")
               + b"00\x93" + string(f"touch {sandbox.marker}") + b"\x85R.")
    path = write_torch_save(sandbox.root / "pop.pt", payload)
    sandbox.snapshot()

    message = refused(lambda: load_model(path), UnsafePickleError)

    assert "os.system" in message
    sandbox.assert_untouched()


def test_an_undecodable_member_name_is_a_load_error(tmp_path: Path) -> None:
    path = save(nn.Linear(2, 2), tmp_path / "names.pt")
    data = bytearray(path.read_bytes())
    index = data.rindex(b"names/data.pkl")  # the central directory entry, flagged as UTF-8 by torch
    data[index:index + 5] = b"\xff\xfe\xfd\xfc\xfb"
    path.write_bytes(bytes(data))

    refused(lambda: load_model(path), LoadError)
