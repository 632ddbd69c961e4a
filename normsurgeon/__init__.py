"""normsurgeon: surgery on the normalization layers of trained PyTorch models."""

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
from .modules import MeanOnlyBatchNorm
from .param_groups import ParamGroups, param_groups
from .passes.fold_batchnorm import fold_batchnorm
from .passes.recalibrate import recalibrate
from .passes.weight_norm import apply_weight_norm, remove_weight_norm
from .report import Change, Check, Report, Skip, SkipReason
from .trace import trace

fold = fold_batchnorm

__all__ = [
    "Change",
    "Check",
    "ExportError",
    "LoadError",
    "MeanOnlyBatchNorm",
    "NormSurgeonError",
    "OutputError",
    "ParamGroups",
    "PreconditionError",
    "Report",
    "Skip",
    "SkipReason",
    "UnsafePickleError",
    "UsageError",
    "VerificationError",
    "apply_weight_norm",
    "compare_outputs",
    "fold",
    "fold_batchnorm",
    "param_groups",
    "recalibrate",
    "remove_weight_norm",
    "trace",
]
