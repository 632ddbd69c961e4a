"""The module passes by name, and the pipelines built from them.

Adding a pass: write it under ``passes/`` as a :class:`~normsurgeon.pipeline.ModulePass` and list
its class here; :func:`~normsurgeon.pipeline.run` does the rest (docs/design.md, "Adding a pass").
"""

from __future__ import annotations

from ..pipeline import ModulePass, Sequential
from .bake_weight_standardization import BakeWeightStandardization
from .fold_batchnorm import FoldBatchNorm, fold_passes
from .fold_norm_affine import FoldNormAffines
from .reparameterize import Reparameterize
from .weight_norm import RemoveWeightNorm

MODULE_PASSES: dict[str, type[ModulePass]] = {
    cls.name: cls
    for cls in (FoldBatchNorm, FoldNormAffines, RemoveWeightNorm, Reparameterize, BakeWeightStandardization)
}


def pre_export_passes(*, fold: bool) -> Sequential:
    """What export runs on its copy of the model before exporting, in order (one trace for all).

    Weight norm and weight standardization are always baked into plain weights (the file then
    ships the weight, not the ops that recompute it at run time); unless ``fold`` is False, summed
    conv+BN branches are merged into one conv and the BatchNorms left are folded, as ``fold`` does
    (:func:`~normsurgeon.passes.fold_batchnorm.fold_passes`, which bakes weight standardization too).
    """
    return Sequential(RemoveWeightNorm(), fold_passes() if fold else BakeWeightStandardization())
