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
from .passes.fold_batchnorm import fold_batchnorm
from .report import Change, Check, Report, Skip, SkipReason
from .trace import trace

fold = fold_batchnorm

__all__ = [
    "Change",
    "Check",
    "ExportError",
    "LoadError",
    "NormSurgeonError",
    "OutputError",
    "PreconditionError",
    "Report",
    "Skip",
    "SkipReason",
    "UnsafePickleError",
    "UsageError",
    "VerificationError",
    "compare_outputs",
    "fold",
    "fold_batchnorm",
    "trace",
]
