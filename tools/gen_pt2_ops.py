"""Regenerate normsurgeon/io/pt2_ops.py: the ATen operators a .pt2 graph may call without --trust-pickle.

    python tools/gen_pt2_ops.py > normsurgeon/io/pt2_ops.py   # then review the diff

The rule (run against the installed torch; the result is frozen in pt2_ops.py, so a newer torch
adds nothing by itself):

1. Candidates are ATen overloads that torch.export emits for ordinary models: the core ATen opset
   (``torch.Tag.core``, what ``run_decompositions()`` lowers to), the ops behind torch's public API
   (``torch.X``, ``Tensor.X``, ``torch.nn.functional.X``, ``torch.linalg/special/fft``: what the
   training IR records when a model calls them), and EXTRA below (private ops that export itself
   inserts).
2. Every argument and return of the overload is a tensor, a number, a bool, a dtype/layout/
   device/memory format, a generator slot, or a list/optional of those. A ``str`` is allowed only
   for the enum-like arguments in STR_ARGS (``reduce``, ``rounding_mode``, ``padding`` ...), never
   as a file name, a message to print or a TorchScript string/list/dict builtin; no ``Storage``,
   ``Stream``, ``Any``, script classes or generic ``t``.
3. Nothing whose name says it touches files, storages, printing, other processes or devices'
   private memory (DENY_NAME), and nothing in DENY: operators known to create views without
   checking them against the storage (``set_``, ``_reshape_alias``: they read and write memory
   outside the tensor), to read files (``from_file``) or to interpret a tensor's bytes as a packed
   structure (``fbgemm_*``, ``*pack*``, mkldnn/cudnn/miopen kernels).
"""

from __future__ import annotations

import re
import sys

import torch
import torch.nn.functional as F

SAFE_TYPES = frozenset(
    "Tensor int float bool number complex Device Generator Layout ScalarType MemoryFormat".split()
)
STR_ARGS = frozenset(
    "UPLO approximate driver equation indexing interpolation mode norm ord p pad_mode padding padding_side "
    "reduce rounding_mode side assert_msg".split()
)
EXTRA = frozenset(
    "_assert_tensor_metadata _assert_scalar _functional_assert_scalar _assert_async _functional_assert_async "
    "_to_copy _local_scalar_dense sym_size sym_stride sym_numel sym_storage_offset sym_constrain_range "
    "sym_constrain_range_for_size _functional_sym_constrain_range _functional_sym_constrain_range_for_size "
    "_softmax _log_softmax _safe_softmax _softmax_backward_data _log_softmax_backward_data "
    "_native_batch_norm_legit _native_batch_norm_legit_no_training _native_batch_norm_legit_functional "
    "_weight_norm _weight_norm_interface _unsafe_view _unsafe_index _unsafe_index_put _unsafe_masked_index "
    "_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention "
    "_scaled_dot_product_flash_attention _scaled_dot_product_cudnn_attention _fused_sdp_choice "
    "_upsample_bilinear2d_aa _upsample_bicubic2d_aa _upsample_nearest_exact1d _upsample_nearest_exact2d "
    "_upsample_nearest_exact3d _adaptive_avg_pool2d _adaptive_avg_pool3d _cdist_forward _pdist_forward "
    "_embedding_bag _embedding_bag_forward_only _linalg_det _linalg_slogdet _linalg_eigh _linalg_svd "
    "_linalg_solve_ex _prelu_kernel _euclidean_dist "
    "_fft_r2c _fft_c2r _fft_c2c _convolution _trilinear _pad_circular _pad_enum _reshape_copy "
    "_to_dim_order_copy lift_fresh lift_fresh_copy alias alias_copy".split()
)
DENY = frozenset(
    # views not checked against their storage, files, printing, effects on the process
    "set_ set _reshape_alias _reshape_alias_copy from_file save _print warn _linalg_check_errors record_stream "
    "_make_dep_token manual_seed seed initial_seed set_grad_enabled Generator backward grad retain_grad cuda "
    # sparse matrix products whose names do not say sparse; autograd/functorch internals
    "smm hspmm sspaddmm coalesce _add_batch_dim _remove_batch_dim _make_dual _lazy_clone".split()
)
DENY_NAME = re.compile(
    r"file|save|load|print|warn|storage|share|pin_memory|stream|ipc|sparse|nested|jagged|pack|"
    r"fbgemm|mkldnn|cudnn(?!_attention)|miopen|nnpack|cslt|_cufft|quantize|_make_per|_dequant|_fake_quant|"
    r"fused_moving_avg|mps|xpu|_cuda|cuda_|_amp_|_foreach|_dimI|_dimV|_nnz|_indices|_values|ccol|crow|"
    r"_coalesce|_cast_|_test_|_foobar|_triton|_dyn_quant|_scaled_(grouped_)?mm|_grouped_mm|_fused_(adam|sgd|adagrad)|"
    r"_sobol|_copy_from"
)


def _public_names() -> set[str]:
    names = set(dir(torch)) | set(dir(torch.Tensor)) | set(dir(F))
    names |= {f"linalg_{n}" for n in dir(torch.linalg)} | {f"special_{n}" for n in dir(torch.special)}
    names |= {f"fft_{n}" for n in dir(torch.fft)}
    # public names only (Tensor.__and__ is aten::__and__); a private op must be core or in EXTRA
    return {n for n in names if not n.startswith("_") or (n.startswith("__") and n.endswith("__"))}


def _type_ok(type_str: str, arg_name: str) -> bool:
    for part in re.split(r"[\[\], ]+", type_str):
        if part in ("", "Optional", "List") or part in SAFE_TYPES:
            continue
        if part == "str" and arg_name in STR_ARGS:
            continue
        return False
    return True


def allowed_overloads() -> dict[str, list[str]]:
    public = _public_names()
    result: dict[str, list[str]] = {}
    for schema in torch._C._jit_get_all_schemas():
        if not schema.name.startswith("aten::"):
            continue
        packet = schema.name[len("aten::"):]
        overload = schema.overload_name or "default"
        if packet in DENY or packet.rstrip("_") in DENY or DENY_NAME.search(packet):
            continue
        if not all(_type_ok(str(a.type), a.name) for a in schema.arguments):
            continue
        if not all(_type_ok(str(r.type), "") for r in schema.returns):
            continue
        try:
            op = getattr(getattr(torch.ops.aten, packet), overload)
        except (AttributeError, RuntimeError):
            continue
        core = torch.Tag.core in op.tags
        if not (core or packet in EXTRA or packet in public or packet.rstrip("_") in public):
            continue
        result.setdefault(packet, []).append(overload)
    return {k: sorted(set(v)) for k, v in sorted(result.items())}


HEADER = '''"""The ATen operators a .pt2 graph may call without --trust-pickle (generated; do not edit by hand).

Generated by ``python tools/gen_pt2_ops.py`` from torch {version}: {packets} operators,
{count} overloads. The rule that chose them is in that script's docstring; review the diff of this
file when regenerating. Each line is ``packet: overload overload ...`` (``default`` is the
overload without a name): ``torch.ops.aten.add.Tensor`` is allowed when ``add`` lists ``Tensor``.
"""

from __future__ import annotations

_TABLE = """
{lines}
"""

ATEN_OVERLOADS: frozenset[str] = frozenset(
    f"{{packet}}.{{overload}}"
    for line in _TABLE.strip().splitlines()
    for packet, _, overloads in [line.partition(": ")]
    for overload in overloads.split()
)
'''


def main() -> None:
    ops = allowed_overloads()
    lines = "\n".join(f"{packet}: {' '.join(overloads)}" for packet, overloads in ops.items())
    sys.stdout.write(HEADER.format(version=torch.__version__, packets=len(ops),
                                   count=sum(len(v) for v in ops.values()), lines=lines))


if __name__ == "__main__":
    main()
