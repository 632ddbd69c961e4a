"""Let torchvision (and so timm and transformers) import beside a torch it was not built for.

PyPI's torchvision wheels are built against CUDA torch. Beside torch's CPU build their C++
operators cannot load, and ``import torchvision`` then fails while registering fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` ("operator torchvision::nms does not exist"); since
transformers imports torchvision when it is installed, so would a ``BertModel``. When (and only
when) torchvision is installed and its operators cannot load, :func:`declare_missing_torchvision_ops`
declares those two schemas, without kernels: importing works, calling them raises. normsurgeon
never calls a torchvision operator. A torchvision that loads is left alone.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

_FAKED_OPS = ("nms", "qnms")  # the operators torchvision registers fake kernels for without checking _has_ops()
_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_library: list[Any] = []  # keeps the declaring fragment alive


def declare_missing_torchvision_ops() -> bool:
    """Declare torchvision's NMS schemas if torchvision is installed but its operators cannot load; True if declared."""
    if _library or "torchvision" in sys.modules:
        return bool(_library)
    extension = _extension_library()
    if extension is None:
        return False
    try:
        torch.ops.load_library(str(extension))
        return False
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901  (schemas only, no kernels)
    for name in _FAKED_OPS:
        if not hasattr(torch.ops.torchvision, name):
            library.define(name + _SCHEMA)
    _library.append(library)
    return True


def _extension_library() -> Path | None:
    """torchvision's compiled operators (``_C.so``), found without importing torchvision."""
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(Path(folder).glob("_C*.so")) + sorted(Path(folder).glob("_C*.pyd"))
        if found:
            return found[0]
    return None
