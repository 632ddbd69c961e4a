"""``timm:NAME`` as MODEL: the architecture from timm, the weights from a file (never downloaded).

timm imports torchvision; :mod:`normsurgeon.torchvision_compat` lets that import work beside a
torch the torchvision wheel was not built for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from normsurgeon.errors import LoadError

PREFIX = "timm:"


def is_timm_spec(path: str | Path) -> bool:
    return str(path).startswith(PREFIX)


def import_timm() -> Any:
    """``import timm``, with torchvision's operators declared first where they cannot load."""
    from ..torchvision_compat import declare_missing_torchvision_ops

    declare_missing_torchvision_ops()
    try:
        import timm
    except ImportError as exc:
        raise LoadError(f"timm:NAME needs timm ({exc}); pip install timm") from exc
    except RuntimeError as exc:
        raise LoadError(f"importing timm failed ({exc}); install a torchvision built for this torch") from exc
    return timm


def build_timm(spec: str) -> tuple[nn.Module, str]:
    """The architecture ``timm:NAME`` (no download; timm's random initialisation) and timm's version."""
    timm = import_timm()
    name = spec[len(PREFIX):]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise LoadError(f"{spec}: timm has no model named {name!r}{hint}")
    return timm.create_model(name, pretrained=False), timm.__version__
