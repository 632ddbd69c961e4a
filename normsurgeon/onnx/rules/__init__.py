"""Rewrite rules for .onnx graphs (onnxscript rewriter, on onnx-ir), one module per family.

- :mod:`.fold_batchnorm`: BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it;
- :mod:`.fold_batchnorm_forward`: BatchNormalization into the unpadded Conv/Gemm/MatMul after it;
- :mod:`.fuse_norms`: decomposed LayerNorm/RMSNorm/GroupNorm into the native op, by opset.
- :mod:`.ort_fusions`: onnxruntime's own norm ops at any opset, and residual Add + norm into its Skip ops.
"""

from ._common import batchnorm_problem, describe, opset_version, take_changes
from .fold_batchnorm import FOLD_INTO_PRODUCER
from .fold_batchnorm_forward import FOLD_INTO_CONSUMER
from .fuse_norms import NORM_FUSIONS, NormFusion

__all__ = [
    "FOLD_INTO_CONSUMER",
    "FOLD_INTO_PRODUCER",
    "NORM_FUSIONS",
    "NormFusion",
    "batchnorm_problem",
    "describe",
    "opset_version",
    "take_changes",
]
