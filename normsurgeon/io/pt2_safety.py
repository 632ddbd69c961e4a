"""Check a ``.pt2`` archive (torch.export.save) before ``torch.export.load`` may read it.

``torch.export.load`` is not weights-only: it unpickles payloads with ``weights_only=False``,
parses the program's symbolic expressions with ``sympy.sympify`` (an ``eval``) and ``exec``s
its guards when ``ExportedProgram.module()`` is built. Each of these runs whatever the archive
says, so :func:`check_pt2_archive` reads the archive as data first and refuses it unless:

* every pickled member references only what :mod:`normsurgeon.io.pickle_safety` allows
  (members declared as raw tensor bytes, archive metadata and the user's ``extra/`` files
  are not scanned); an archive with compiled ``aotinductor/`` code is refused;
* every graph call target is one torch.export emits: ``torch.ops`` operators (not
  ``load_library`` and friends), torch's ``sym_*``/``_check*``/``_assert*`` helpers, grad-mode
  and autocast switches, ``_operator`` arithmetic and ``math`` functions; no dunders;
* every symbolic expression is srepr-style arithmetic: known sympy/torch function names,
  symbol names, keyword arguments and plain literals, nothing else;
* every guard is size/stride arithmetic on the inputs (an AST allowlist).

Anything else raises :class:`UnsafePickleError` listing what was found; nothing is executed.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from normsurgeon.errors import LoadError

from .pickle_safety import (
    LEGACY_PICKLES,
    PickleScan,
    classify,
    one_line,
    raise_for_missing,
    refusal,
    scan_stream,
    scan_zip_pickles,
)

_PT2_METADATA = frozenset({"archive_format", "archive_version", "version", "byteorder", "serialization_id"})


def check_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 whose pickles, graph targets, expressions or guards are not plain torch.

    Raises UnsafePickleError naming the offending references, LoadError for a corrupt archive
    or a pickled class that cannot be imported; returns quietly when the archive is safe to load.
    """
    payloads = PickleScan()
    issues: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            raw = _raw_payloads(zf)
            for name in zf.namelist():
                if _is_compiled_code(name):
                    issues.append(f"compiled AOTInductor code {name} (native code runs on load)")
                elif name.endswith(".json"):
                    issues += _json_issues(zf.read(name))
                elif not _skipped(name, raw):
                    member = _scan_member(zf.read(name), f"{path}:{name}")
                    payloads.add_refs(member.refs)
                    issues += [f"unreadable pickle {name}"] if member.problem else []
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise LoadError(f"{path}: corrupt .pt2 archive ({one_line(exc, 120)}); re-export the model") from exc
    verdict = classify(payloads.refs, allow_classes=True)
    if verdict.refused or issues:
        what = "not torch types, torch operators or nn.Module classes"
        raise refusal(path, verdict.refused + issues, what, verb="load")
    raise_for_missing(path, verdict.missing)


# --------------------------------------------------------------------------- pickled members


def _raw_payloads(zf: zipfile.ZipFile) -> set[str]:
    """Members that the payload configs declare only as raw tensor bytes (never unpickled).

    A member that any entry declares as pickled is not raw, whatever other entries say.
    """
    raw: set[str] = set()
    pickled: set[str] = set()
    for name in zf.namelist():
        if not name.endswith("_config.json"):
            continue
        config = json.loads(zf.read(name)).get("config", {})
        folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        for entry in config.values():
            if isinstance(entry, dict) and entry.get("path_name"):
                (raw if entry.get("use_pickle") is False else pickled).add(folder + entry["path_name"])
    return raw - pickled


def _skipped(name: str, raw: set[str]) -> bool:
    """Members not scanned as pickles: folders, raw payloads, metadata, the user's extra files.

    Extra files (``<archive>/extra/<name>``, written by ``torch.export.save(extra_files=...)``)
    are handed back as strings, never unpickled; anything deeper in the tree is scanned.
    """
    base = name.rsplit("/", 1)[-1]
    if name.endswith("/") or name in raw or base in _PT2_METADATA:
        return True
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "extra"


def _is_compiled_code(name: str) -> bool:
    """AOTInductor payloads: torch.export.load hands them to a loader of native code."""
    return "aotinductor/" in name


def _scan_member(data: bytes, label: str) -> PickleScan:
    """A member is a nested torch.save zip or a (legacy) pickle stream."""
    if data.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            return scan_zip_pickles(inner, label)
    return scan_stream(io.BytesIO(data), label, max_pickles=LEGACY_PICKLES)


# --------------------------------------------------------------------------- serialized program


def _json_issues(blob: bytes) -> list[str]:
    """Unsafe call targets, sympy expressions and guard code in a serialized program."""
    try:
        doc = json.loads(blob)
    except ValueError:
        return []
    issues: list[str] = []
    for key, value, holder in _walk_json(doc):
        if key == "target" and isinstance(value, str) and {"inputs", "outputs"} <= holder.keys():
            if not _safe_target(value):
                issues.append(f"graph call {value}")
        elif key == "expr_str" and isinstance(value, str) and not _safe_sympy(value):
            issues.append(f"expression {one_line(value, 60)!r}")
        elif key == "guards_code" and isinstance(value, list):
            issues += [f"guard {one_line(g, 60)!r}" for g in value if not (isinstance(g, str) and _safe_guard(g))]
    return issues


def _walk_json(node: Any) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Every (key, value, dict holding it) in a JSON document, without recursion."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value, item
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


_OP_TARGET = re.compile(r"torch\.ops\.(?!(?:load_library|import_module|loaded_libraries)\.)\w+\.\w+(?:\.\w+)?")
_TORCH_TARGET = re.compile(
    r"torch\.(?:_?sym_\w+|_check\w*|_assert\w*|_C\._set_grad_enabled|amp\.autocast_mode\._(?:enter|exit)_autocast)"
)
_OPERATOR_NAMES = frozenset(
    "add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor not_ invert inv "
    "lshift rshift getitem matmul truth index".split()
)


def _safe_target(target: str) -> bool:
    """Graph call targets torch.export emits: operators, sym helpers, math and _operator."""
    if "__" in target:
        return False
    module, _, name = target.rpartition(".")
    return bool(
        _OP_TARGET.fullmatch(target)
        or _TORCH_TARGET.fullmatch(target)
        or (module == "_operator" and name in _OPERATOR_NAMES)
        or (module == "math" and re.fullmatch(r"[a-z]\w*", name))
    )


_SYMPY_NAMES = frozenset(
    "Symbol Integer Float Rational Add Mul Pow Mod Max Min Abs floor ceiling sqrt exp log Eq Ne Lt Le "
    "Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan And Or Not Xor "
    "BooleanTrue BooleanFalse true false True False Piecewise ExprCondPair ITE oo zoo nan Infinity "
    "NegativeInfinity NaN ComplexInfinity Half One Zero NegativeOne pi E int_oo IntInfinity "
    "NegativeIntInfinity FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv "
    "LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator "
    "TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity".split()
)
_SYMPY_STRING = re.compile(r"'(?:[A-Za-z_]\w*|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)'")
_SYMPY_OPS = frozenset("( ) , + - * / // % ** < > <= >= == != & | ~ ^ =".split())
_SYMPY_SYMBOL = re.compile(r"[a-z]+\d+")  # s0, u1, ...
_SYMPY_GENERATED_FN = re.compile(r"(?:OpaqueUnaryFn|BitwiseFn)_[a-z_]+")


def _safe_sympy(expr: str) -> bool:
    """True for srepr-style arithmetic: known sympy/torch names, symbol names, plain literals."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError):  # SyntaxError covers IndentationError
        return False
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if tok.type == tokenize.NAME:
            if not _safe_sympy_name(tok.string, nxt):
                return False
        elif tok.type == tokenize.STRING:
            if not _SYMPY_STRING.fullmatch(tok.string):
                return False
        elif tok.type == tokenize.OP:
            if tok.string not in _SYMPY_OPS:
                return False
        elif tok.type not in (tokenize.NUMBER, tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            return False
    return True


def _safe_sympy_name(name: str, next_token: str) -> bool:
    """A known function, a keyword argument (``integer=True``) or a symbol name."""
    return bool(
        name in _SYMPY_NAMES
        or next_token == "="
        or _SYMPY_SYMBOL.fullmatch(name)
        or _SYMPY_GENERATED_FN.fullmatch(name)
    )


_GUARD_NAMES = frozenset(
    {"L", "args", "math", "inf", "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"}
)
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel", "shape"})
_GUARD_NODES = (
    ast.Expression, ast.Compare, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Subscript, ast.Call, ast.Attribute,
    ast.Name, ast.Constant, ast.Load, ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.Tuple,
)


def _safe_guard(code: str) -> bool:
    """Guards are exec'd by ep.module(): allow only size/stride arithmetic on the inputs."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            return False
        if isinstance(node, ast.Name) and node.id not in _GUARD_NAMES:
            return False
        if isinstance(node, ast.Attribute) and not _safe_guard_attribute(node):
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.isidentifier():
            return False
    return True


def _safe_guard_attribute(node: ast.Attribute) -> bool:
    """``math.<anything public>`` or a size/stride method; never a private attribute."""
    if node.attr.startswith("_"):
        return False
    is_math = isinstance(node.value, ast.Name) and node.value.id == "math"
    return is_math or node.attr in _GUARD_METHODS
