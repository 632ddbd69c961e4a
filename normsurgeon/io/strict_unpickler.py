"""An unpickler that builds only what ``torch.save(model)`` writes, and calls no code of the file's choosing.

Python's unpickler calls whatever the file names: REDUCE calls a global with arguments, NEWOBJ
calls ``cls.__new__``, BUILD calls ``__setstate__``. This one is an opcode loop of its own (as
torch's weights-only unpickler is) that does each of those only for objects a :class:`Policy`
lets through:

* REDUCE: torch's reviewed rebuild functions and containers (torch's weights-only allowlist),
  with the few of them that allocate or call an argument checked first; enum members (looked up,
  never constructed); ``functools.partial`` of an allowed function; and vetted replacements for
  the rebuild helpers that real libraries pickle (``kernels``' ``_rebuild_kernel_func``,
  ``copyreg._reconstructor``), which never import or call what the file names.
* NEWOBJ: classes the policy accepted (``nn.Module`` subclasses and plain data classes), built
  with the ``__new__`` of a built-in base (``object``, ``dict``) — never a class's own ``__new__``.
* BUILD: ``nn.Module.__setstate__`` (torch.nn's own, reviewed), or a plain ``__dict__`` update;
  a class with a ``__setstate__`` of its own is refused.
* persistent ids: storages only, whose claimed size must fit in the bytes the file really has.

Anything else (INST/OBJ, the copyreg extension opcodes, out-of-band buffers, an unknown global)
raises :class:`Refused` before it runs. Used as the ``pickle_module`` of ``torch.load``, so torch
still reads the archive, the storages, map_location and byte order.
"""

from __future__ import annotations

import codecs
import copyreg
import enum
import functools
import io
import os
import pickle
import struct
import sys
import types
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from torch import nn


class Refused(pickle.UnpicklingError):
    """The file asks for something the policy does not allow; nothing of it was run."""


@dataclass
class Policy:
    """What one file may use, decided before unpickling (see :mod:`normsurgeon.io.pickle_safety`).

    ``globals`` maps ``"module.name"`` to the object a GLOBAL resolves to; ``callables`` are the
    ones REDUCE may call; ``classes`` the ones NEWOBJ may build. ``storage_bytes`` bounds the
    bytes a storage may claim (the archive member's size, or the whole file for legacy files).
    """

    globals: dict[str, Any] = field(default_factory=dict)
    callables: set[int] = field(default_factory=set)  # ids: functions are not all hashable by value
    classes: set[type] = field(default_factory=set)
    storage_bytes: Callable[[str], int | None] = lambda key: None
    total_storage_bytes: int = 0


def torch_allowed_globals() -> dict[str, Any]:
    """torch's weights-only allowlist: tensor/storage rebuild functions, dtypes, containers."""
    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed["builtins.frozenset"] = frozenset
    allowed["builtins.slice"] = slice
    return allowed


def pickle_module(policy: Policy) -> types.SimpleNamespace:
    """A ``pickle_module`` for ``torch.load`` that unpickles under ``policy``."""

    class BoundUnpickler(StrictUnpickler):
        def __init__(self, file: IO[bytes], **kwargs: Any) -> None:
            super().__init__(file, policy, **kwargs)

    def load(file: IO[bytes], **kwargs: Any) -> Any:
        return BoundUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="normsurgeon.strict_unpickler", Unpickler=BoundUnpickler, load=load,
                                 UnpicklingError=pickle.UnpicklingError)


def loads(data: bytes, policy: Policy) -> Any:
    """Unpickle bytes under ``policy`` (no persistent ids allowed)."""
    return StrictUnpickler(io.BytesIO(data), policy).load()


# --------------------------------------------------------------------------- the opcode loop

_MAX_PROTOCOL = 5
_NOT_SUPPORTED = {
    pickle.INST: "INST (calls a class with arguments)",
    pickle.OBJ: "OBJ (calls a class with arguments)",
    pickle.EXT1: "EXT1 (copyreg extension registry)",
    pickle.EXT2: "EXT2 (copyreg extension registry)",
    pickle.EXT4: "EXT4 (copyreg extension registry)",
    pickle.PERSID: "PERSID (text persistent id)",
    pickle.NEXT_BUFFER: "NEXT_BUFFER (out-of-band buffer)",
    pickle.READONLY_BUFFER: "READONLY_BUFFER (out-of-band buffer)",
}


class StrictUnpickler:
    """Unpickle one pickle from ``file`` under ``policy``; see the module docstring."""

    def __init__(self, file: IO[bytes], policy: Policy, *, encoding: str = "ASCII", errors: str = "strict",
                 **_ignored: Any) -> None:
        self._file = file
        self._policy = policy
        self._encoding, self._errors = encoding, errors
        self.persistent_load: Callable[[Any], Any] | None = None
        self._storage_seen: dict[Any, int] = {}

    # torch's UnpicklerWrapper overrides this and calls super() for names it does not map itself.
    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key not in self._policy.globals:
            raise Refused(f"global {key} is not allowed")
        return self._policy.globals[key]

    def load(self) -> Any:
        self._stack: list[Any] = []
        self._metastack: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        read = self._file.read
        dispatch = _DISPATCH
        while True:
            key = read(1)
            if not key:
                raise EOFError("pickle data was truncated")
            op = key[0]
            if op == pickle.STOP[0]:
                return self._stack.pop()
            handler = dispatch.get(op)
            if handler is None:
                what = _NOT_SUPPORTED.get(bytes([op]), f"opcode {key!r}")
                raise Refused(f"unsupported pickle instruction {what}")
            handler(self)

    # ------------------------------------------------------------------ reading

    def _read(self, n: int) -> bytes:
        data = self._file.read(n)
        if len(data) != n:
            raise EOFError("pickle data was truncated")
        return data

    def _readline(self) -> bytes:
        line = self._file.readline()
        if not line.endswith(b"\n"):
            raise EOFError("pickle data was truncated")
        return line[:-1]

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _push(self, value: Any) -> None:
        self._stack.append(value)

    def _pop_mark(self) -> list[Any]:
        items = self._stack
        if not self._metastack:
            raise pickle.UnpicklingError("unbalanced MARK")
        self._stack = self._metastack.pop()
        return items

    def _decode_string(self, data: bytes) -> Any:
        return data if self._encoding == "bytes" else data.decode(self._encoding, self._errors)

    # ------------------------------------------------------------------ the risky operations

    def _global(self, module: str, name: str) -> None:
        module, name = _map_python2(module, name)
        self._push(self.find_class(module, name))

    def _reduce(self) -> None:
        args = self._stack.pop()
        func = self._stack[-1]
        if not isinstance(args, tuple):
            raise Refused("REDUCE arguments are not a tuple")
        self._stack[-1] = call_allowed(func, args, self._policy)

    def _newobj(self, args: tuple, kwargs: dict) -> None:
        cls = self._stack.pop()
        self._push(new_object(cls, args, kwargs, self._policy))

    def _build(self) -> None:
        state = self._stack.pop()
        build_object(self._stack[-1], state, self._policy)

    def _persistent(self, pid: Any) -> None:
        if self.persistent_load is None:
            raise Refused("a persistent id outside a torch.save archive")
        self._check_storage(pid)
        self._push(self.persistent_load(pid))

    def _check_storage(self, pid: Any) -> None:
        """Only storages, as large as the bytes the file has for them (and legacy files' module classes)."""
        if isinstance(pid, tuple) and len(pid) == 4 and _ascii(pid[0]) == "module":
            if pid[1] not in self._policy.classes:  # legacy torch.save: (module, class, file, source)
                raise Refused(f"persistent id names class {_name_of(pid[1])}, which is not allowed")
            return
        if not (isinstance(pid, tuple) and pid and _ascii(pid[0]) == "storage"):
            raise Refused(f"persistent id {_short(pid)} is not a tensor storage")
        # zip format: (storage, type, key, location, numel); legacy: the same and the view metadata
        if len(pid) not in (5, 6):
            raise Refused(f"persistent id {_short(pid)} is not a tensor storage")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise Refused(f"storage {key!r} claims {numel!r} elements")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise Refused(f"storage {key!r} has no known element type")
        nbytes = numel * torch._utils._element_size(dtype)
        key = _ascii(key)
        if key in self._storage_seen:
            return
        self._storage_seen[key] = nbytes
        limit = self._policy.storage_bytes(key)
        total = sum(self._storage_seen.values())
        if (limit is not None and nbytes > limit) or total > self._policy.total_storage_bytes:
            raise StorageTooLarge(
                f"storage {key} claims {nbytes} bytes, more than the file holds for it "
                f"({limit if limit is not None else self._policy.total_storage_bytes} bytes)"
            )


class StorageTooLarge(Refused):
    """A storage claims more bytes than the file can hold (a hostile or corrupt header)."""


def _ascii(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _map_python2(module: str, name: str) -> tuple[str, str]:
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


# --------------------------------------------------------------------------- calls, objects, state


def call_allowed(func: Any, args: tuple, policy: Policy) -> Any:
    """REDUCE: call ``func(*args)`` only for the reviewed callables, after checking the arguments."""
    vetted = _VETTED_CALLS.get(id(func))
    if vetted is not None:
        return vetted(args, policy)
    if isinstance(func, type) and issubclass(func, enum.Enum) and func in policy.classes:
        return _enum_member(func, args)
    if id(func) not in policy.callables:
        raise Refused(f"calling {_name_of(func)} is not allowed")
    if isinstance(func, type) and func in _tensor_types() and args:
        raise Refused(f"calling {_name_of(func)} with arguments (it allocates) is not allowed")
    return func(*args)


def new_object(cls: Any, args: tuple, kwargs: dict, policy: Policy) -> Any:
    """NEWOBJ: an instance of an accepted class, from the ``__new__`` of a built-in base."""
    if cls is nn.Parameter:
        return nn.Parameter(*args, **kwargs)
    if not isinstance(cls, type) or cls not in policy.classes:
        raise Refused(f"creating {_name_of(cls)} is not allowed")
    if args or kwargs:
        raise Refused(f"creating {_name_of(cls)} with arguments is not allowed")
    return _builtin_new(cls)(cls)


def build_object(inst: Any, state: Any, policy: Policy) -> None:
    """BUILD: restore ``inst``'s state with reviewed code only."""
    kind = type(inst)
    if kind is torch.Tensor:  # legacy files: an empty tensor set to a storage
        inst.set_(*state)
        return
    if kind is nn.Parameter or kind is OrderedDict:
        if kind is nn.Parameter:
            inst.__setstate__(state)
        else:
            _update_dict(inst, state)
        return
    if kind not in policy.classes:
        raise Refused(f"restoring the state of {_name_of(kind)} is not allowed")
    setstate = _defining_class(kind, "__setstate__")
    if setstate is None:
        _restore_plain(inst, state)
    elif _is_torch_nn_code(vars(setstate)["__setstate__"]):
        setstate.__setstate__(inst, state)  # type: ignore[attr-defined]
        _require_module_state(inst)
    elif setstate is functools.partial:
        _partial_setstate(inst, state, policy)
    elif _is_kernel_func_class(setstate):
        _kernel_func_setstate(inst, state, policy)
    else:
        raise Refused(f"{_name_of(kind)} restores itself with its own __setstate__ "
                      f"({setstate.__module__}.{setstate.__qualname__})")


_TORCH_NN_DIR = os.path.join(os.path.dirname(torch.__file__), "nn", "")


def _is_torch_nn_code(function: Any) -> bool:
    """True for a function written in torch/nn (nn.Module.__setstate__ and torch.nn layers' own)."""
    filename = getattr(getattr(function, "__code__", None), "co_filename", "")
    return os.path.abspath(filename).startswith(_TORCH_NN_DIR)


_MODULE_STATE = ("_parameters", "_buffers", "_modules")


def _require_module_state(inst: Any) -> None:
    """A corrupt file can restore an nn.Module without the dicts every walk over it reads."""
    if isinstance(inst, nn.Module):
        own = object.__getattribute__(inst, "__dict__")
        missing = [name for name in _MODULE_STATE if not isinstance(own.get(name), dict)]
        if missing:
            raise pickle.UnpicklingError(f"{_name_of(type(inst))} is restored without {', '.join(missing)}")


def _restore_plain(inst: Any, state: Any) -> None:
    """What ``pickle`` does for a class without ``__setstate__``, without the class's own hooks."""
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if state:
        _update_dict(inst, state)
    if slots:
        if not isinstance(slots, dict) or not all(isinstance(k, str) for k in slots):
            raise Refused("slot state is not a dict of names")
        for name, value in slots.items():
            object.__setattr__(inst, name, value)


def _update_dict(inst: Any, state: Any) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise Refused(f"the state of {_name_of(type(inst))} is not a dict of attribute names")
    object.__getattribute__(inst, "__dict__").update(state)


def _defining_class(cls: type, attribute: str) -> type | None:
    """The first class in ``cls``'s MRO that defines ``attribute`` (None for object's own)."""
    for klass in cls.__mro__:
        if attribute in vars(klass):
            return None if klass is object else klass
    return None


_BUILTIN_BASES = (object, dict, list, set, OrderedDict)


def _builtin_new(cls: type) -> Callable[[type], Any]:
    """``object.__new__`` or a built-in container's; refuse a class that defines its own."""
    owner = _defining_class(cls, "__new__") or object
    if owner not in _BUILTIN_BASES:
        raise Refused(f"{_name_of(cls)} is created by its own __new__ ({owner.__module__}.{owner.__qualname__})")
    return owner.__new__


def _enum_member(cls: type[enum.Enum], args: tuple) -> enum.Enum:
    """``EnumClass(value)`` as a lookup: an existing member (or a flag combination), never ``_missing_``."""
    if len(args) != 1:
        raise Refused(f"{_name_of(cls)} called with {len(args)} arguments")
    value = args[0]
    member = cls._value2member_map_.get(value) if _hashable(value) else None
    if member is not None:
        return member
    if issubclass(cls, enum.Flag) and isinstance(value, int) and _defining_class(cls, "_missing_") is enum.Flag:
        return cls(value)
    raise Refused(f"{value!r} is not a member of {_name_of(cls)}")


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _name_of(obj: Any) -> str:
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj.__name__)}"
    return f"an object of type {type(obj).__module__}.{type(obj).__qualname__}"


@functools.lru_cache(maxsize=1)
def _tensor_types() -> frozenset[type]:
    return frozenset([torch.Tensor, *torch._tensor_classes])


# --------------------------------------------------------------------------- vetted replacements

_RAW_REBUILD_FROM_TYPE = torch._tensor._rebuild_from_type_v2


def _rebuild_from_type(args: tuple, policy: Policy) -> Any:
    """``_rebuild_from_type_v2(func, new_type, args, state)``: func must be a tensor rebuild function."""
    if len(args) != 4:
        raise Refused("_rebuild_from_type_v2 called with the wrong arguments")
    func, new_type = args[0], args[1]
    from torch import _weights_only_unpickler as wou

    if func not in wou._tensor_rebuild_functions():
        raise Refused(f"_rebuild_from_type_v2 asked to call {_name_of(func)}")
    if not (isinstance(new_type, type) and issubclass(new_type, torch.Tensor)
            and new_type in (torch.Tensor, nn.Parameter, *policy.classes)):
        raise Refused(f"_rebuild_from_type_v2 asked for type {_name_of(new_type)}")
    return _RAW_REBUILD_FROM_TYPE(*args)


def _bytearray(args: tuple, policy: Policy) -> bytearray:
    if len(args) > 2 or (args and not isinstance(args[0], (bytes, bytearray, str, list))):
        raise Refused("bytearray() with a size (it allocates) is not allowed")
    return bytearray(*args)


def _codecs_encode(args: tuple, policy: Policy) -> bytes:
    """Protocol 2 writes bytes as ``_codecs.encode(text, 'latin1')``: allow exactly that."""
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode() other than the latin1 bytes encoding is not allowed")
    return codecs.encode(args[0], "latin1")


def _partial(args: tuple, policy: Policy) -> functools.partial:
    """``functools.partial(func)`` for an allowed function (its arguments come with BUILD)."""
    if not args or not _allowed_value_function(args[0], policy):
        raise Refused(f"functools.partial of {_name_of(args[0]) if args else 'nothing'} is not allowed")
    return functools.partial(*args)


def _partial_setstate(inst: Any, state: Any, policy: Policy) -> None:
    if not (isinstance(state, tuple) and len(state) == 4 and _allowed_value_function(state[0], policy)):
        raise Refused("functools.partial state names a function that is not allowed")
    inst.__setstate__(state)


def _allowed_value_function(func: Any, policy: Policy) -> bool:
    """A function the file may store (torch operators, torch.nn.functional, accepted classes)."""
    return any(value is func for value in policy.globals.values()) and (
        isinstance(func, (types.BuiltinFunctionType, types.FunctionType)) or func in policy.classes
    )


def _reconstructor(args: tuple, policy: Policy) -> Any:
    """``copyreg._reconstructor(cls, object, None)`` (protocol 0/1 objects): ``object.__new__(cls)``."""
    if len(args) != 3 or args[1] is not object or args[2] is not None:
        raise Refused("copyreg._reconstructor with a base other than object is not allowed")
    return new_object(args[0], (), {}, policy)


def _rebuild_kernel_func(args: tuple, policy: Policy) -> nn.Module:
    """``kernels``' ``_rebuild_kernel_func(module, func)``: a fresh instance of a kernel-function module.

    The real one imports ``module`` (any module the file names). This one only looks at modules
    already imported (the verdict imported the model's own modules) and only at attributes that
    are kernels' generated function modules, as ``kernels`` itself pickles them.
    """
    if len(args) != 2 or not all(isinstance(a, str) for a in args):
        raise Refused("_rebuild_kernel_func called with the wrong arguments")
    module_name, func_name = args
    module = sys.modules.get(module_name)
    if module is None or not func_name.isidentifier():
        raise Refused(f"_rebuild_kernel_func names {module_name}.{func_name}, which is not part of the model")
    template = vars(module).get(func_name)
    cls = type(template)
    if not (isinstance(template, nn.Module) and _is_kernel_func_class(cls) and cls.__module__ == module_name):
        raise Refused(f"_rebuild_kernel_func names {module_name}.{func_name}, which is not a kernels function")
    policy.classes.add(cls)
    return object.__new__(cls)


def _is_kernel_func_class(cls: type) -> bool:
    """A class made by kernels' ``_create_func_module`` (its __setstate__ is kernels' code)."""
    layer = sys.modules.get("kernels._internals.layer.layer")
    setstate = vars(cls).get("__setstate__")
    return (layer is not None and cls.__qualname__ == "_create_func_module.<locals>.Func"
            and getattr(getattr(setstate, "__code__", None), "co_filename", None) == layer.__file__)


def _kernel_func_setstate(inst: Any, state: Any, policy: Policy) -> None:
    """``Func.__setstate__((state, forward_func))`` with ``forward_func`` None (a method rebinding runs code)."""
    if not (isinstance(state, tuple) and len(state) == 2 and state[1] is None):
        raise Refused("a kernels function module whose forward was replaced is not allowed")
    nn.Module.__setstate__(inst, state[0])


def _rebuild_qtensor(args: tuple, policy: Policy) -> torch.Tensor:
    """torch allocates a quantized tensor of the claimed size before setting its storage: bound it first."""
    storage, size = (args[0], args[2]) if len(args) >= 3 else (None, None)
    if not isinstance(storage, torch.storage.TypedStorage) or not isinstance(size, (tuple, torch.Size)):
        raise Refused("_rebuild_qtensor called with the wrong arguments")
    if not all(isinstance(n, int) and n >= 0 for n in size) or _product(size) > storage.size():
        raise StorageTooLarge(f"a quantized tensor of size {tuple(size)} claims more than its storage holds")
    return torch._utils._rebuild_qtensor(*args)


def _product(values: Any) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def KERNELS_REBUILD_STANDIN(module_name: str, func_name: str) -> None:  # noqa: N802  (a marker object)
    """What a GLOBAL of ``kernels._internals.layer.layer._rebuild_kernel_func`` resolves to.

    kernels' own function is never imported from the file's reference; REDUCE on this marker
    runs :func:`_rebuild_kernel_func` instead.
    """
    raise Refused("kernels' rebuild helper is only called through the strict unpickler")


_DISPATCH: dict[int, Callable[[StrictUnpickler], None]] = {}
_VETTED_CALLS: dict[int, Callable[[tuple, Policy], Any]] = {
    id(_RAW_REBUILD_FROM_TYPE): _rebuild_from_type,
    id(torch._utils._rebuild_qtensor): _rebuild_qtensor,
    id(bytearray): _bytearray,
    id(codecs.encode): _codecs_encode,
    id(functools.partial): _partial,
    id(copyreg._reconstructor): _reconstructor,
    id(KERNELS_REBUILD_STANDIN): _rebuild_kernel_func,
}


# --------------------------------------------------------------------------- opcode table


def _op(code: bytes) -> Callable[[Callable[[StrictUnpickler], None]], Callable[[StrictUnpickler], None]]:
    def register(handler: Callable[[StrictUnpickler], None]) -> Callable[[StrictUnpickler], None]:
        _DISPATCH[code[0]] = handler
        return handler

    return register


@_op(pickle.PROTO)
def _proto(u: StrictUnpickler) -> None:
    proto = u._read(1)[0]
    if proto > _MAX_PROTOCOL:
        raise pickle.UnpicklingError(f"unsupported pickle protocol {proto}")


@_op(pickle.FRAME)
def _frame(u: StrictUnpickler) -> None:
    u._unpack("<Q")  # frames only group opcodes; the stream is read straight through


@_op(pickle.MARK)
def _mark(u: StrictUnpickler) -> None:
    u._metastack.append(u._stack)
    u._stack = []


@_op(pickle.POP)
def _pop(u: StrictUnpickler) -> None:
    u._stack.pop() if u._stack else u._pop_mark()


@_op(pickle.POP_MARK)
def _pop_mark_op(u: StrictUnpickler) -> None:
    u._pop_mark()


@_op(pickle.DUP)
def _dup(u: StrictUnpickler) -> None:
    u._push(u._stack[-1])


# constants and numbers
_DISPATCH[pickle.NONE[0]] = lambda u: u._push(None)
_DISPATCH[pickle.NEWTRUE[0]] = lambda u: u._push(True)
_DISPATCH[pickle.NEWFALSE[0]] = lambda u: u._push(False)
_DISPATCH[pickle.BININT[0]] = lambda u: u._push(u._unpack("<i"))
_DISPATCH[pickle.BININT1[0]] = lambda u: u._push(u._read(1)[0])
_DISPATCH[pickle.BININT2[0]] = lambda u: u._push(u._unpack("<H"))
_DISPATCH[pickle.BINFLOAT[0]] = lambda u: u._push(u._unpack(">d"))
_DISPATCH[pickle.LONG1[0]] = lambda u: u._push(pickle.decode_long(u._read(u._read(1)[0])))
_DISPATCH[pickle.LONG4[0]] = lambda u: u._push(pickle.decode_long(u._read(u._unpack("<i"))))
_DISPATCH[pickle.FLOAT[0]] = lambda u: u._push(float(u._readline()))
_DISPATCH[pickle.LONG[0]] = lambda u: u._push(int(u._readline().rstrip(b"L")))


@_op(pickle.INT)
def _int(u: StrictUnpickler) -> None:
    data = u._readline()
    u._push({b"00": False, b"01": True}.get(data) if data in (b"00", b"01") else int(data))


# strings and bytes
_DISPATCH[pickle.BINUNICODE[0]] = lambda u: u._push(str(u._read(u._unpack("<I")), "utf-8", "surrogatepass"))
_DISPATCH[pickle.SHORT_BINUNICODE[0]] = lambda u: u._push(str(u._read(u._read(1)[0]), "utf-8", "surrogatepass"))
_DISPATCH[pickle.BINUNICODE8[0]] = lambda u: u._push(str(u._read(u._unpack("<Q")), "utf-8", "surrogatepass"))
_DISPATCH[pickle.UNICODE[0]] = lambda u: u._push(str(u._readline(), "raw-unicode-escape"))
_DISPATCH[pickle.SHORT_BINSTRING[0]] = lambda u: u._push(u._decode_string(u._read(u._read(1)[0])))
_DISPATCH[pickle.BINSTRING[0]] = lambda u: u._push(u._decode_string(u._read(u._unpack("<i"))))
_DISPATCH[pickle.SHORT_BINBYTES[0]] = lambda u: u._push(u._read(u._read(1)[0]))
_DISPATCH[pickle.BINBYTES[0]] = lambda u: u._push(u._read(u._unpack("<I")))
_DISPATCH[pickle.BINBYTES8[0]] = lambda u: u._push(u._read(u._unpack("<Q")))
_DISPATCH[pickle.BYTEARRAY8[0]] = lambda u: u._push(bytearray(u._read(u._unpack("<Q"))))


@_op(pickle.STRING)
def _string(u: StrictUnpickler) -> None:
    data = u._readline()
    if len(data) < 2 or data[0] != data[-1] or data[:1] not in (b'"', b"'"):
        raise pickle.UnpicklingError("the STRING opcode argument must be quoted")
    u._push(u._decode_string(codecs.escape_decode(data[1:-1])[0]))


# containers
_DISPATCH[pickle.EMPTY_TUPLE[0]] = lambda u: u._push(())
_DISPATCH[pickle.EMPTY_LIST[0]] = lambda u: u._push([])
_DISPATCH[pickle.EMPTY_DICT[0]] = lambda u: u._push({})
_DISPATCH[pickle.EMPTY_SET[0]] = lambda u: u._push(set())
_DISPATCH[pickle.TUPLE[0]] = lambda u: u._push(tuple(u._pop_mark()))
_DISPATCH[pickle.LIST[0]] = lambda u: u._push(u._pop_mark())
_DISPATCH[pickle.FROZENSET[0]] = lambda u: u._push(frozenset(u._pop_mark()))


@_op(pickle.TUPLE1)
def _tuple1(u: StrictUnpickler) -> None:
    u._stack[-1] = (u._stack[-1],)


@_op(pickle.TUPLE2)
def _tuple2(u: StrictUnpickler) -> None:
    u._stack[-2:] = [(u._stack[-2], u._stack[-1])]


@_op(pickle.TUPLE3)
def _tuple3(u: StrictUnpickler) -> None:
    u._stack[-3:] = [(u._stack[-3], u._stack[-2], u._stack[-1])]


@_op(pickle.DICT)
def _dict(u: StrictUnpickler) -> None:
    items = u._pop_mark()
    u._push({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})


_MUTABLE_LISTS = (list,)
_MUTABLE_DICTS = (dict, OrderedDict, Counter)


def _target(u: StrictUnpickler, builtins: tuple[type, ...], method: str, op: str) -> Any:
    """The container an APPEND/SETITEM fills: a built-in one, or an accepted subclass that keeps its ``method``."""
    target = u._stack[-1]
    kind = type(target)
    if kind in builtins or (kind in u._policy.classes and _defining_class(kind, method) in builtins):
        return target
    raise Refused(f"{op} on a {_name_of(kind)} is not allowed")


@_op(pickle.APPEND)
def _append(u: StrictUnpickler) -> None:
    item = u._stack.pop()
    list.append(_target(u, _MUTABLE_LISTS, "append", "APPEND"), item)


@_op(pickle.APPENDS)
def _appends(u: StrictUnpickler) -> None:
    items = u._pop_mark()
    list.extend(_target(u, _MUTABLE_LISTS, "extend", "APPENDS"), items)


@_op(pickle.SETITEM)
def _setitem(u: StrictUnpickler) -> None:
    value, key = u._stack.pop(), u._stack.pop()
    _set_items(_target(u, _MUTABLE_DICTS, "__setitem__", "SETITEM"), [key, value])


@_op(pickle.SETITEMS)
def _setitems(u: StrictUnpickler) -> None:
    items = u._pop_mark()
    _set_items(_target(u, _MUTABLE_DICTS, "__setitem__", "SETITEMS"), items)


def _set_items(target: dict, items: list[Any]) -> None:
    setitem = OrderedDict.__setitem__ if isinstance(target, OrderedDict) else dict.__setitem__
    for i in range(0, len(items) - 1, 2):
        setitem(target, items[i], items[i + 1])


@_op(pickle.ADDITEMS)
def _additems(u: StrictUnpickler) -> None:
    items = u._pop_mark()
    set.update(_target(u, (set,), "update", "ADDITEMS"), items)


# memo
def _put(u: StrictUnpickler, index: int) -> None:
    if index < 0:
        raise pickle.UnpicklingError("negative memo index")
    u._memo[index] = u._stack[-1]


def _get(u: StrictUnpickler, index: int) -> None:
    if index not in u._memo:
        raise pickle.UnpicklingError(f"memo key {index} was never stored")
    u._push(u._memo[index])


_DISPATCH[pickle.BINPUT[0]] = lambda u: _put(u, u._read(1)[0])
_DISPATCH[pickle.LONG_BINPUT[0]] = lambda u: _put(u, u._unpack("<I"))
_DISPATCH[pickle.PUT[0]] = lambda u: _put(u, int(u._readline()))
_DISPATCH[pickle.MEMOIZE[0]] = lambda u: _put(u, len(u._memo))
_DISPATCH[pickle.BINGET[0]] = lambda u: _get(u, u._read(1)[0])
_DISPATCH[pickle.LONG_BINGET[0]] = lambda u: _get(u, u._unpack("<I"))
_DISPATCH[pickle.GET[0]] = lambda u: _get(u, int(u._readline()))


# globals, objects and state
@_op(pickle.GLOBAL)
def _global_op(u: StrictUnpickler) -> None:
    module = u._readline().decode("utf-8")
    name = u._readline().decode("utf-8")
    u._global(module, name)


@_op(pickle.STACK_GLOBAL)
def _stack_global(u: StrictUnpickler) -> None:
    name, module = u._stack.pop(), u._stack.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
        raise pickle.UnpicklingError("STACK_GLOBAL requires two strings")
    u._global(module, name)


_DISPATCH[pickle.REDUCE[0]] = StrictUnpickler._reduce
_DISPATCH[pickle.BUILD[0]] = StrictUnpickler._build
_DISPATCH[pickle.BINPERSID[0]] = lambda u: u._persistent(u._stack.pop())


@_op(pickle.NEWOBJ)
def _newobj_op(u: StrictUnpickler) -> None:
    args = u._stack.pop()
    if not isinstance(args, tuple):
        raise Refused("NEWOBJ arguments are not a tuple")
    u._newobj(args, {})


@_op(pickle.NEWOBJ_EX)
def _newobj_ex(u: StrictUnpickler) -> None:
    kwargs, args = u._stack.pop(), u._stack.pop()
    if not isinstance(args, tuple) or not isinstance(kwargs, Mapping):
        raise Refused("NEWOBJ_EX arguments are not a tuple and a dict")
    u._newobj(args, dict(kwargs))
