"""Hostile ``.pt2`` archives (issue 13, classes 5-7): each payload is rebuilt from a clean
``torch.export.save`` archive, opened the way a user would, and must be refused before anything of
its choosing runs, hangs or writes.

5. pickles hidden in members the scan skipped or mis-parsed;
6. graph calls that touch files (``aten.from_file`` + ``aten.copy_``), also smuggled in as an
   operator argument, and graph names pasted into the source torch.fx generates and runs;
7. hangs in sympy expressions, range constraints and guards.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from normsurgeon.errors import LoadError, UnsafePickleError
from normsurgeon.io.loading import load_model
from normsurgeon.io.pt2_ops import ATEN_OVERLOADS

from .conftest import TIME_LIMIT_S, Sandbox, cli_refused, mutate, refused

INPUT_SHAPE = "2,3,8,8"


class Net(nn.Module):
    """Conv -> BN with a dynamic batch (a symbolic size and a range constraint in the archive) and a
    uint8 buffer: the bytes a graph-only payload copies into the file it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("text", torch.tensor(list(b"written by the graph\n"), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.text[0].float() * 0


class Printer(nn.Module):
    """Decomposed, its aten._print becomes with_effects(token, aten._print.default, ...): an operator argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.ops.aten._print("hello")
        return self.bn(self.conv(x)) + 1


class Reduce:
    """Pickles as ``func(*args)``: the classic payload shape."""

    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The clean archives every payload starts from, exported once per module."""
    folder = tmp_path_factory.mktemp("clean")
    x = torch.randn(2, 3, 8, 8)
    net = torch.export.export(Net().eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    torch.export.save(net, folder / "net.pt2")
    printer = torch.export.export(Printer().eval(), (x,)).run_decompositions()
    torch.export.save(printer, folder / "printer.pt2")
    return {"net": folder / "net.pt2", "printer": folder / "printer.pt2"}


def rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None] = lambda n, d: d,
            extra: dict[str, bytes] | None = None) -> Path:
    """Copy ``src`` to ``dst`` member by member through ``edit`` (None drops the member), adding ``extra``.

    ``extra`` names are relative to the archive's folder, like the names torch's reader lists.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        top = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info))
            if data is not None:
                zout.writestr(info, data)
        for name, data in (extra or {}).items():
            zout.writestr(f"{top}/{name}", data)
    return dst


def edit_program(src: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    """Rewrite ``models/model.json`` through ``change(doc)``."""

    def edit(name: str, data: bytes) -> bytes:
        if name != "models/model.json":
            return data
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()

    return rewrite(src, dst, edit)


def touch(marker: Path) -> Reduce:
    return Reduce(os.system, (f"touch {shlex.quote(str(marker))}",))


def torch_saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def repoint_bias(src: Path, dst: Path, entries: dict[str, dict], members: dict[str, bytes]) -> Path:
    """Declare the conv bias (and ``entries``) in the weights config as the test says, drop the bias's
    raw bytes (nothing refers to them any more) and add ``members`` (names under ``data/weights/``)."""
    with zipfile.ZipFile(src) as zin:
        config = json.loads(zin.read(zin.namelist()[0].split("/")[0] + "/data/weights/model_weights_config.json"))
    orphan = "data/weights/" + config["config"]["conv.bias"]["path_name"]
    config["config"].update(entries)

    def edit(name: str, data: bytes) -> bytes | None:
        if name == "data/weights/model_weights_config.json":
            return json.dumps(config).encode()
        return None if name == orphan else data

    return rewrite(src, dst, edit, extra={f"data/weights/{name}": data for name, data in members.items()})


def pickled_weight_at(src: Path, dst: Path, member: str, payload: bytes) -> Path:
    """Declare the conv bias as a pickled weight stored at ``data/weights/<member>`` and put ``payload`` there."""
    bias = {"path_name": member, "is_param": True, "use_pickle": True, "tensor_meta": None}
    return repoint_bias(src, dst, {"conv.bias": bias}, {member: payload})


def graph(doc: dict) -> dict:
    return doc["graph_module"]["graph"]


def uint8_meta(n: int) -> dict:
    return {"dtype": 1, "sizes": [{"as_int": n}], "requires_grad": False, "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}


def arg(name: str, value: dict, kind: int = 1) -> dict:
    return {"name": name, "arg": value, "kind": kind}


# --------------------------------------------------------------------------- 5. pickles the scan skipped


@pytest.mark.parametrize("member", ["evil.json", "model_weights_config.json.pkl.json"])
def test_pickle_in_a_member_named_json_is_scanned(member: str, clean: dict[str, Path], sandbox: Sandbox) -> None:
    """A pickled weight at a ``*.json`` name: the old scan tried JSON, failed, and ignored the member."""
    evil = pickled_weight_at(clean["net"], sandbox.root / "evil.pt2", member, torch_saved(touch(sandbox.marker)))
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "system" in message and "--trust-pickle" in message
    sandbox.assert_untouched()


@pytest.mark.parametrize("member", ["version", "serialization_id", "byteorder", ".data/version"])
def test_pickle_in_a_member_named_like_archive_metadata_is_scanned(member: str, clean: dict[str, Path],
                                                                   sandbox: Sandbox) -> None:
    """The old scan skipped any member whose basename was version/serialization_id, at any depth."""
    evil = pickled_weight_at(clean["net"], sandbox.root / "evil.pt2", member, torch_saved(touch(sandbox.marker)))
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "system" in message
    sandbox.assert_untouched()


def test_legacy_stream_whose_second_pickle_pickletools_rejects_is_refused(clean: dict[str, Path],
                                                                          sandbox: Sandbox) -> None:
    """torch.load's legacy format is five pickles. ``I0x3e9`` (protocol 1001 for C's strtol, an error for
    pickletools' int()) stopped the old scan after the first; the third (sys_info) carried the payload."""
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    stream = magic + b"I0x3e9\n." + pickle.dumps(touch(sandbox.marker), protocol=2)
    evil = rewrite(clean["net"], sandbox.root / "evil.pt2",
                   lambda n, d: stream if n == "data/sample_inputs/model.pt" else d)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "legacy" in message and "sample_inputs" in message
    sandbox.assert_untouched()


def _shuffled_stack_global(command: str) -> bytes:
    """``os.system(command)`` whose STACK_GLOBAL takes the two strings *under* a popped
    ``collections OrderedDict``: a scan that does not model POP judges the wrong pair."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    cmd = command.encode()
    return (b"\x80\x04" + text("os") + text("system") + text("collections") + text("OrderedDict") + b"00"
            + b"\x93" + b"X" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R.")


def test_pickle_that_hides_its_global_behind_pop_is_refused(clean: dict[str, Path], sandbox: Sandbox) -> None:
    """The sample inputs are a torch.save zip whose data.pkl names os.system via STACK_GLOBAL after two POPs."""
    with zipfile.ZipFile(io.BytesIO(torch_saved(((torch.ones(1),), {})))) as zin:
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info)
                if info.filename.endswith("/data.pkl"):
                    data = _shuffled_stack_global(f"touch {shlex.quote(str(sandbox.marker))}")
                zout.writestr(info, data)
    evil = rewrite(clean["net"], sandbox.root / "evil.pt2",
                   lambda n, d: inner.getvalue() if n == "data/sample_inputs/model.pt" else d)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "os.system" in message
    sandbox.assert_untouched()


def test_old_archive_format_is_refused(clean: dict[str, Path], sandbox: Sandbox) -> None:
    """torch.export.load falls back to the pre-2.8 layout when a root ``version`` member exists; it unpickles
    ``serialized_state_dict.json`` (a .json name the old scan parsed as JSON and ignored)."""
    with zipfile.ZipFile(clean["net"]) as zin:
        program = zin.read("net/models/model.json")
        inputs = zin.read("net/data/sample_inputs/model.pt")
    evil = sandbox.root / "old.pt2"
    with zipfile.ZipFile(evil, "w") as zout:
        zout.writestr("version", "8.20")
        zout.writestr("serialized_exported_program.json", program)
        zout.writestr("serialized_state_dict.json", torch_saved(touch(sandbox.marker)))
        zout.writestr("serialized_constants.pt", torch_saved({}))
        zout.writestr("serialized_example_inputs.pt", inputs)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "old" in message and "--trust-pickle" in message
    sandbox.assert_untouched()


def test_members_whose_names_differ_only_in_case_are_refused(clean: dict[str, Path], sandbox: Sandbox) -> None:
    """torch's zip reader looks names up ignoring case: a config that declares
    ``weight_9`` as raw bytes (never scanned) and ``WEIGHT_9`` as a pickle (scanned, harmless) makes
    torch unpickle ``weight_9``."""
    payload = torch_saved(touch(sandbox.marker))
    entries = {"conv.bias": {"path_name": "WEIGHT_9", "is_param": True, "use_pickle": True, "tensor_meta": None},
               "hidden": {"path_name": "weight_9", "is_param": False, "use_pickle": False,
                          "tensor_meta": uint8_meta(len(payload))}}
    members = {"WEIGHT_9": torch_saved(torch.zeros(4)), "weight_9": payload}  # miniz: the later one wins
    evil = repoint_bias(clean["net"], sandbox.root / "evil.pt2", entries, members)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "case" in message
    sandbox.assert_untouched()


def test_a_member_that_inflates_beyond_the_archive_is_refused_before_reading(clean: dict[str, Path],
                                                                             sandbox: Sandbox) -> None:
    bomb = sandbox.root / "bomb.pt2"
    rewrite(clean["net"], bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as zout:
        zout.writestr("net/extra/zeros", b"\0" * (64 << 20))
    sandbox.snapshot()

    message = refused(lambda: load_model(bomb), LoadError)

    assert "zip bomb" in message
    sandbox.assert_untouched()


# --------------------------------------------------------------------------- 6. graph calls that touch files


def _from_file_and_copy(marker: Path) -> Callable[[dict], None]:
    """Prepend ``f = aten.from_file(marker, shared=True, size=n, dtype=uint8); aten.copy_(f, text)``."""

    def change(doc: dict) -> None:
        g, n = graph(doc), 21
        g["tensor_values"]["opened"] = uint8_meta(n)
        g["tensor_values"]["written"] = uint8_meta(n)
        opened = {"target": "torch.ops.aten.from_file.default", "name": "opened", "metadata": {},
                  "inputs": [arg("filename", {"as_string": str(marker)}), arg("shared", {"as_bool": True}),
                             arg("size", {"as_int": n}), arg("dtype", {"as_scalar_type": 1}, kind=2)],
                  "outputs": [{"as_tensor": {"name": "opened"}}]}
        written = {"target": "torch.ops.aten.copy_.default", "name": "written", "metadata": {},
                   "inputs": [arg("self", {"as_tensor": {"name": "opened"}}),
                              arg("src", {"as_tensor": {"name": "b_text"}})],
                   "outputs": [{"as_tensor": {"name": "written"}}]}
        g["nodes"][0:0] = [opened, written]

    return change


def test_graph_that_writes_a_file_is_refused_by_fold(clean: dict[str, Path], sandbox: Sandbox) -> None:
    """No pickle at all: fold runs the program, and the program writes a file of its choosing."""
    evil = edit_program(clean["net"], sandbox.root / "evil.pt2", _from_file_and_copy(sandbox.marker))
    sandbox.snapshot()

    message = cli_refused("fold", evil, "--input-shape", INPUT_SHAPE, "-o", sandbox.root / "out.pt2", exit_code=4)

    assert "torch.ops.aten.from_file.default" in message and "--trust-pickle" in message
    sandbox.assert_untouched()


def test_operator_argument_cannot_smuggle_a_file_call(clean: dict[str, Path], sandbox: Sandbox) -> None:
    """with_effects(token, op, *args) calls ``op``: the op travels as an ``as_operator`` argument, not a target."""

    def change(doc: dict) -> None:
        g = graph(doc)
        node = next(n for n in g["nodes"] if n["target"] == "torch.ops.higher_order.with_effects")
        node["inputs"][1]["arg"]["as_operator"] = "torch.ops.aten.from_file.default"
        node["inputs"][2:] = [arg("", {"as_string": str(sandbox.marker)}), arg("", {"as_bool": True}),
                              arg("", {"as_int": 8})]
        node["outputs"][1] = {"as_tensor": {"name": "opened"}}
        g["tensor_values"]["opened"] = uint8_meta(8)
        g["tensor_values"]["opened_sum"] = {**uint8_meta(8), "dtype": 5, "sizes": [], "strides": []}
        position = g["nodes"].index(node) + 1
        g["nodes"].insert(position, {"target": "torch.ops.aten.sum.default", "name": "opened_sum", "metadata": {},
                                     "inputs": [arg("self", {"as_tensor": {"name": "opened"}})],
                                     "outputs": [{"as_tensor": {"name": "opened_sum"}}]})
        add = next(n for n in g["nodes"][position:] if n["target"] == "torch.ops.aten.add.Tensor")
        add["inputs"][1]["arg"] = {"as_tensor": {"name": "opened_sum"}}

    evil = edit_program(clean["printer"], sandbox.root / "evil.pt2", change)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil).model(torch.randn(2, 3, 8, 8)), UnsafePickleError)

    assert "from_file" in message
    sandbox.assert_untouched()


def test_graph_input_name_cannot_inject_code(clean: dict[str, Path], sandbox: Sandbox) -> None:
    """torch.fx pastes placeholder names into the Python source it generates and runs on load."""
    evil_name = f"x=__import__('os').system({f'touch {shlex.quote(str(sandbox.marker))}'!r})"

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            return {(evil_name if k == "x" else k): rename(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rename(v) for v in node]
        return evil_name if node == "x" else node

    def change(doc: dict) -> None:
        doc["graph_module"]["graph"] = rename(doc["graph_module"]["graph"])
        doc["graph_module"]["signature"] = rename(doc["graph_module"]["signature"])

    evil = edit_program(clean["net"], sandbox.root / "evil.pt2", change)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "name" in message
    sandbox.assert_untouched()


@pytest.mark.parametrize("context", ["defaultdict", "enum"])
def test_pytree_spec_cannot_import_a_module(context: str, clean: dict[str, Path], sandbox: Sandbox,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's treespec_loads imports the module a defaultdict factory or an ``__enum__`` context names;
    here one that sits in the current directory (on sys.path, as the CLI's cwd is)."""
    module = f"ns_pt2_spec_payload_{context}"
    (sandbox.root / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(sandbox.marker)!r}).touch()\nfactory = dict\n")
    monkeypatch.syspath_prepend(str(sandbox.root))
    if context == "defaultdict":
        kwargs = {"type": "collections.defaultdict", "children_spec": [],
                  "context": {"default_factory_module": module, "default_factory_name": "factory",
                              "dict_context": []}}
    else:
        kwargs = {"type": "builtins.dict", "children_spec": [],
                  "context": json.dumps([{"__enum__": True, "fqn": f"{module}:factory", "name": "x"}])}

    def change(doc: dict) -> None:
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        protocol, spec = json.loads(signature["in_spec"])
        spec["children_spec"][1] = kwargs
        signature["in_spec"] = json.dumps([protocol, spec])

    evil = edit_program(clean["net"], sandbox.root / "evil.pt2", change)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "pytree spec" in message
    sandbox.assert_untouched()
    assert module not in sys.modules


# --------------------------------------------------------------------------- 7. hangs


def _replace_size_expression(expression: str) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        size = graph(doc)["tensor_values"]["x"]["sizes"][0]
        size["as_expr"]["expr_str"] = expression

    return change


@pytest.mark.parametrize("expression", ["9**9**9", "Pow(Integer(9), Pow(Integer(9), Integer(9)))",
                                        "PowByNatural(Integer(9), Integer(387420489))", "9^9^9",
                                        "LShift(Integer(1), Integer(10**12))", "9" * 4000],
                         ids=["power", "nested-Pow", "PowByNatural", "xor-as-power", "shift", "long-literal"])
def test_sympy_expression_that_hangs_is_refused(expression: str, clean: dict[str, Path], sandbox: Sandbox) -> None:
    evil = edit_program(clean["net"], sandbox.root / "evil.pt2", _replace_size_expression(expression))
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "expression" in message
    sandbox.assert_untouched()


def test_range_constraint_with_a_huge_unbacked_symbol_index_is_refused(clean: dict[str, Path],
                                                                        sandbox: Sandbox) -> None:
    """torch counts up to the index of every ``u<N>`` range constraint, one Python loop step at a time."""

    def change(doc: dict) -> None:
        doc["range_constraints"]["u99999999999999"] = {"min_val": 0, "max_val": 4}

    evil = edit_program(clean["net"], sandbox.root / "evil.pt2", change)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "u99999999999999" in message
    sandbox.assert_untouched()


@pytest.mark.parametrize("guard", ["9**9**9 == 0", "math.factorial(10**9) == 1", "math.comb(10**9, 10**8) > 0",
                                   "(1 << 10**12) > 0", "L['x'].size()[0] ** L['x'].size()[0] ** 99 > 0"],
                         ids=["power", "factorial", "comb", "shift", "symbolic-power"])
def test_guard_that_hangs_is_refused(guard: str, clean: dict[str, Path], sandbox: Sandbox) -> None:
    """Guards are exec'd by ExportedProgram.module() and run on every call: fold would hang."""

    def change(doc: dict) -> None:
        doc["guards_code"] = [guard]

    evil = edit_program(clean["net"], sandbox.root / "evil.pt2", change)
    sandbox.snapshot()

    message = refused(lambda: load_model(evil), UnsafePickleError)

    assert "guard" in message
    sandbox.assert_untouched()


# --------------------------------------------------------------------------- the operator list


def test_operator_list_leaves_out_files_printing_and_unchecked_views() -> None:
    """``_reshape_alias`` and ``set_`` make views that read and write outside their storage; ``from_file``
    maps a file; ``save``/``_print`` write. Ordinary operators are in."""
    for op in ("from_file.default", "save.default", "_print.default", "set_.source_Tensor_storage_offset",
               "set_.source_Storage", "_reshape_alias.default", "record_stream.default",
               "_nested_view_from_buffer.default"):
        assert op not in ATEN_OVERLOADS
    for op in ("conv2d.default", "batch_norm.default", "_native_batch_norm_legit_no_training.default", "linear.default",
               "scaled_dot_product_attention.default", "add.Tensor", "sym_size.int", "_assert_scalar.default"):
        assert op in ATEN_OVERLOADS


def test_operator_list_is_what_the_generator_writes() -> None:
    """pt2_ops.py is generated (tools/gen_pt2_ops.py): a hand edit, or a torch whose operators differ, shows here."""
    import normsurgeon.io.pt2_ops as pt2_ops
    generator = pytest.importorskip("tools.gen_pt2_ops")
    if f"from torch {torch.__version__}:" not in (pt2_ops.__doc__ or ""):
        pytest.skip(f"pt2_ops.py was generated from another torch than {torch.__version__}")
    generated = {f"{packet}.{o}" for packet, overloads in generator.allowed_overloads().items() for o in overloads}
    assert generated == set(ATEN_OVERLOADS)


# --------------------------------------------------------------------------- the clean archives still load


def test_clean_archives_load_and_run(clean: dict[str, Path]) -> None:
    x = torch.randn(5, 3, 8, 8)
    loaded = load_model(clean["net"])
    torch.testing.assert_close(loaded.model(x), torch.export.load(clean["net"]).module()(x))


# --------------------------------------------------------------------------- fuzz


_byte_edits = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                                 st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=3)
_mutations = st.one_of(
    st.tuples(st.just("member"), st.floats(0, 1, exclude_max=True), _byte_edits),
    st.tuples(st.just("rename"), st.floats(0, 1, exclude_max=True),
              st.sampled_from(["version", "data/weights/weight_0", "models/other.json", "data/weights/WEIGHT_1",
                               "extra/x", "data/sample_inputs/model.pt", "DATA/weights/model_weights_config.json"])),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just([])),
)


def _apply(original: Path, mutation: tuple, path: Path) -> None:
    kind, where, how = mutation
    if kind == "truncate":
        data = original.read_bytes()
        path.write_bytes(data[:max(1, int(where * len(data)))])
        return
    with zipfile.ZipFile(original) as zin:
        chosen = zin.infolist()[int(where * len(zin.infolist()))].filename.split("/", 1)[1]
    if kind == "member":
        rewrite(original, path, lambda n, d: mutate(d, how) if n == chosen else d)
    else:
        data = zipfile.ZipFile(original).read(f"net/{chosen}")
        rewrite(original, path, lambda n, d: None if n == chosen else d, extra={how: data})


def _safe_targets(program: torch.export.ExportedProgram) -> bool:
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace != "aten" or f"{node.target._opname}.{node.target._overloadname}" not in \
                    ATEN_OVERLOADS:
                return False
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations)
def test_mutated_archives_load_or_are_refused(mutation: tuple, clean: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "mutated.pt2"
    _apply(clean["net"], mutation, path)
    start = time.perf_counter()
    try:
        loaded = load_model(path)
    except LoadError as error:
        assert "\n" not in str(error)
    else:
        assert loaded.exported_program is not None and _safe_targets(loaded.exported_program)
    assert time.perf_counter() - start < TIME_LIMIT_S
