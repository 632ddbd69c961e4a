"""normsurgeon: surgery on the normalization layers of trained PyTorch models."""

from .interrupt import cli_import_interruptible as _cli_import_interruptible

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
    from .passes.bake_weight_standardization import bake_weight_standardization
    from .passes.convert import convert_norms
    from .passes.fold_batchnorm import fold_batchnorm
    from .passes.fold_norm_affine import fold_norm_affines
    from .passes.inspect import InspectReport, inspect_norms
    from .passes.recalibrate import recalibrate
    from .passes.reparameterize import reparameterize
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
    "bake_weight_standardization",
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
    "reparameterize",
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
