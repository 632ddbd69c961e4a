"""normsurgeon: surgery on the normalization layers of trained PyTorch models."""

import contextlib as _contextlib
import os as _os
import sys as _sys


def _started_as_the_cli() -> bool:
    """Whether this import is the ``normsurgeon`` command starting (script or ``python -m``)."""
    program = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    return program == "normsurgeon" or program == "-m"  # "-m" while python -m imports the package


@_contextlib.contextmanager
def _cli_import_interruptible():
    """Imports of torch, onnx, onnxruntime take seconds: a Ctrl-C then is the CLI's, not a crash.

    Started as the ``normsurgeon`` command, it prints one line and exits 130; a program that
    imports normsurgeon keeps its own KeyboardInterrupt.
    """
    try:
        yield
    except KeyboardInterrupt:
        if not _started_as_the_cli():
            raise
        _sys.stderr.write("interrupted: nothing was read or written\n")
        raise SystemExit(130) from None


with _cli_import_interruptible():
    from .check import compare_outputs
    from .errors import (
        ExportError,
        LoadError,
        NormSurgeonError,
        OutputError,
        PreconditionError,
        UnsafePickleError,
        UsageError,
        VerificationError,
    )
    from .modules import ChannelsFirstLayerNorm, FrozenBatchNorm, MeanOnlyBatchNorm
    from .passes.param_groups import ParamGroups, param_groups
    from .passes.convert import convert_norms
    from .passes.fold_batchnorm import fold_batchnorm
    from .passes.fold_norm_affine import fold_norm_affines
    from .passes.inspect import InspectReport, inspect_norms
    from .passes.recalibrate import recalibrate
    from .passes.weight_norm import apply_weight_norm, remove_weight_norm
    from .placement import Placement
    from .recognize import NormKind, recognize_norms
    from .report import Change, Check, Report, Skip, SkipReason
    from .trace import trace
    from .torchvision_compat import declare_missing_torchvision_ops

    declare_missing_torchvision_ops()  # before transformers or timm import a torchvision that cannot load

fold = fold_batchnorm

__all__ = [
    "Change",
    "ChannelsFirstLayerNorm",
    "Check",
    "ExportError",
    "FrozenBatchNorm",
    "InspectReport",
    "LoadError",
    "MeanOnlyBatchNorm",
    "NormKind",
    "NormSurgeonError",
    "OutputError",
    "ParamGroups",
    "Placement",
    "PreconditionError",
    "Report",
    "Skip",
    "SkipReason",
    "UnsafePickleError",
    "UsageError",
    "VerificationError",
    "apply_weight_norm",
    "compare_outputs",
    "convert_norms",
    "export_onnx",
    "fold",
    "fold_batchnorm",
    "fold_norm_affines",
    "inspect_norms",
    "optimize_onnx",
    "param_groups",
    "recalibrate",
    "recognize_norms",
    "remove_weight_norm",
    "trace",
    "verify_onnx",
]

_LAZY = {
    "export_onnx": "normsurgeon.onnx.export",
    "optimize_onnx": "normsurgeon.onnx.optimize",
    "verify_onnx": "normsurgeon.onnx.verify",
}


def __getattr__(name: str):
    """ONNX entry points load onnx/onnxscript/onnxruntime only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normsurgeon' has no attribute {name!r}")
