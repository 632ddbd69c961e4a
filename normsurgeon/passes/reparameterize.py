"""Merge parallel linear branches into one conv (structural reparameterization), proven by the trace.

RepVGG, MobileOne and FastViT (MobileOneBlock, RepMixer, RepConditionalPosEnc, large-kernel convs)
train with branches that read one tensor ``x`` and are summed, e.g.

    y = act(BN_a(conv3x3(x)) + BN_b(conv1x1(x)) + BN_c(x))

Each branch is linear up to its BatchNorm, so the sum is one conv of ``x`` (maths in
:mod:`normsurgeon.maths`): with BN_i(v) = s_i·v + t_i,

    W = Σ s_i · pad(W_i),   b = Σ (s_i · b_i + t_i)

where ``x`` itself is the conv with the identity kernel, a 1×1 kernel is zero-padded to the largest
(when the paddings line up), an average pool is a depthwise conv with kernel 1/k, and branches with
different group counts are written with their greatest common divisor. No per-architecture code:

1. The trace is read once, in order, writing every value that is linear in an earlier value (its
   *root*) as a :class:`Form`: terms (a conv, the identity or an average pool of the root, scaled per
   channel) plus a bias. Convs of the root, BatchNorms (a BatchNorm+act whose act is nothing, see
   :func:`~normsurgeon.norms.split_batchnorm_act`), per-channel scales (a parameter, or a leaf module
   that behaves as one on a probe), sums, differences, numbers and passthrough ops extend a form. A
   value read by several nodes is a root of its own.
2. A value whose form has two or more terms, and that nothing extends, is a *site*; when a
   BatchNorm+act module ends it, the merge takes the norm and keeps the act.
3. The site is replaced where the module tree holds it: the smallest module whose calls in the trace
   are all the site's (and the modules after it, up to where that module ends), and whose forward, run
   on a random tensor of the root's shape, equals ``tail(merged conv)``. It becomes the conv (or
   ``nn.Sequential(conv, *tail)``).

A sum whose branches cannot be merged (one goes through a non-linear op, strides differ, kernels do
not line up) is reported as skipped, with why. The runner checks the result against the original.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..check import compare_outputs
from ..dataflow import Refusal, describe, is_passthrough
from ..inputs import InputsLike
from ..maths import batchnorm_scale_shift, pad_kernel, regroup_kernel
from ..norms import is_batchnorm_like, split_batchnorm_act
from ..pipeline import Edit, ModulePass, PassContext, run
from ..report import Change, Report, Skip, SkipReason
from ..surgery import hooks_lost_by_replacing, replace_module
from ..trace import Node, Trace, Value

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADD = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
_SUB = frozenset({"sub", "sub_", "__sub__", "__isub__", "subtract"})
_RSUB = frozenset({"__rsub__", "rsub"})
_MUL = frozenset({"mul", "mul_", "__mul__", "__imul__", "__rmul__", "multiply"})
_DIV = frozenset({"div", "div_", "__truediv__", "__itruediv__", "true_divide"})
_NEG = frozenset({"neg", "neg_", "__neg__", "negative"})


# ------------------------------------------------------------------------------- linear forms


@dataclass(frozen=True)
class Geometry:
    """What a conv does to positions: its channels, kernel, stride, padding, dilation and groups."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def merged(self, other: Geometry) -> Geometry:
        """One conv that holds both, their kernels centred on each other; Refusal when none does."""
        if self.stride != other.stride:
            raise _unmergeable(f"strides differ ({self.stride} and {other.stride})")
        kernel, padding, dilation = [], [], []
        for k1, k2, p1, p2, d1, d2 in zip(self.kernel, other.kernel, self.padding, other.padding,
                                          self.dilation, other.dilation):
            d = d2 if k1 == 1 else d1  # a 1-tap kernel has no dilation of its own
            if k2 != 1 and d2 != d:
                raise _unmergeable(f"dilations differ ({self.dilation} and {other.dilation})")
            p = max(p1, p2)
            if (p - p1) % d or (p - p2) % d or k1 + 2 * (p - p1) // d != k2 + 2 * (p - p2) // d:
                raise _unmergeable(f"kernels {self.kernel} (padding {self.padding}) and {other.kernel} "
                                   f"(padding {other.padding}) are not centred on the same position")
            kernel.append(k1 + 2 * (p - p1) // d)
            padding.append(p)
            dilation.append(d)
        return Geometry(self.in_channels, self.out_channels, tuple(kernel), self.stride, tuple(padding),
                        tuple(dilation), math.gcd(self.groups, other.groups))


@dataclass(frozen=True)
class Term:
    """One branch: a conv-like map of the root (``kernel()``, float64), times ``scale`` per output channel."""

    label: str
    geometry: Geometry
    kernel: Callable[[], torch.Tensor]
    scale: torch.Tensor


@dataclass(frozen=True)
class Form:
    """A value written as ``Σ term(root) + bias``: one conv of ``root``, proven by the ``nodes`` between."""

    root: Value
    terms: tuple[Term, ...]
    bias: torch.Tensor  # float64, per output channel
    geometry: Geometry  # of the merged conv
    nodes: tuple[Node, ...]  # every node from the root to this value
    like: torch.Tensor | None  # a tensor of the model whose dtype and device the merged conv takes

    def affine(self, scale: torch.Tensor | float, shift: torch.Tensor | float, node: Node,
               like: torch.Tensor | None = None) -> Form:
        """``scale · self + shift`` (per output channel, or one number), computed by ``node``."""
        scale = torch.as_tensor(scale, dtype=torch.float64).expand_as(self.bias)
        terms = tuple(replace(t, scale=t.scale * scale) for t in self.terms)
        return replace(self, terms=terms, bias=self.bias * scale + shift, nodes=(*self.nodes, node),
                       like=self.like if self.like is not None else like)

    def plus(self, other: Form, node: Node, sign: float) -> Form:
        """``self + sign · other``, computed by ``node``; Refusal when the two are not one conv."""
        if other.root is not self.root:
            raise _unmergeable("its operands are computed from different tensors")
        terms = self.terms + tuple(replace(t, scale=t.scale * sign) for t in other.terms)
        return Form(self.root, terms, self.bias + sign * other.bias, self.geometry.merged(other.geometry),
                    (*self.nodes, *other.nodes, node), self.like if self.like is not None else other.like)

    def conv(self) -> nn.Module:
        """The one conv this form is (float64 sums, cast once to the model's dtype)."""
        g = self.geometry
        ones = [1] * (len(g.kernel) + 1)
        weight = sum(
            pad_kernel(regroup_kernel(t.kernel() * t.scale.view(-1, *ones), t.geometry.groups, g.groups),
                       tuple((p - tp) // d for p, tp, d in zip(g.padding, t.geometry.padding, g.dilation)))
            for t in self.terms
        )
        like = self.like if self.like is not None else torch.empty(0)
        conv = _CONVS[len(g.kernel)](g.in_channels, g.out_channels, g.kernel, stride=g.stride, padding=g.padding,
                                     dilation=g.dilation, groups=g.groups, bias=True, dtype=like.dtype,
                                     device=like.device)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(self.bias)
        return conv


def _unmergeable(detail: str) -> Refusal:
    return Refusal(SkipReason.BRANCHES_NOT_MERGEABLE, detail)


def _identity(value: Value) -> Form | None:
    """``value`` as the identity conv of itself (None when it has no (N, C, spatial...) layout)."""
    if not 3 <= len(value.shape) <= 5:
        return None
    channels, dims = value.shape[1], len(value.shape) - 2
    geometry = Geometry(channels, channels, (1,) * dims, (1,) * dims, (0,) * dims, (1,) * dims, channels)
    term = Term("identity", geometry, lambda: torch.ones(channels, 1, *[1] * dims, dtype=torch.float64),
                torch.ones(channels, dtype=torch.float64))
    return Form(value, (term,), torch.zeros(channels, dtype=torch.float64), geometry, (), None)


def _conv_geometry(conv: nn.Module, dims: int) -> Geometry | None:
    """A plain zero-padded conv's geometry (None for one that is not: transposed, reflect, own forward)."""
    if type(conv).forward is not _CONVS.get(dims, nn.Conv2d).forward or conv.padding_mode != "zeros":
        return None
    padding = conv.padding
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":
        if any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
            return None  # torch pads such a kernel more on one side
        padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return Geometry(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                    tuple(padding), tuple(conv.dilation), conv.groups)


def _pool_geometry(pool: nn.Module, channels: int, dims: int) -> Geometry | None:
    """An average pool that is exactly a depthwise conv (no ceil mode, no divisor override, padded zeros counted)."""
    base = next((cls for cls in _POOLS if isinstance(pool, cls)), None)
    if base is None or type(pool).forward is not base.forward:
        return None
    spread = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims)
    kernel, stride, padding = spread(pool.kernel_size), spread(pool.stride or pool.kernel_size), spread(pool.padding)
    if pool.ceil_mode or getattr(pool, "divisor_override", None) or (any(padding) and not pool.count_include_pad):
        return None
    return Geometry(channels, channels, kernel, stride, padding, (1,) * dims, channels)


# ------------------------------------------------------------------------------- reading the trace


@dataclass(frozen=True)
class Site:
    """A sum of branches to merge: ``value``'s ``form``, and the act a BatchNorm+act ``end`` applies after it."""

    value: Value
    form: Form
    act: nn.Module | None = None
    end: Node | None = None

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (*self.form.nodes, *([self.end] if self.end is not None else []))

    @property
    def norms(self) -> list[nn.Module]:
        """The BatchNorm(-like) modules the merge takes away (their act, if any, stays)."""
        return [n.module for n in self.nodes if n.kind == "module" and is_batchnorm_like(n.module)]


class FormReader:
    """Every value of a trace that is one conv of an earlier value, the sites, and the sums that do not merge."""

    def __init__(self, flow: Trace) -> None:
        self.flow = flow
        self.forms: dict[Value, Form] = {}
        self.extended: set[Value] = set()  # values whose form a later node took over
        self.ends: list[Site] = []
        self.unmergeable: list[tuple[tuple[Node, ...], str]] = []  # the nodes of a sum that does not merge, and why
        self.refused: dict[Node, str] = {}  # BatchNorm nodes that are not linear, and why
        for node in flow.nodes:
            form = self._read(node)
            if form is not None and len(node.outputs) == 1:
                self.forms[node.outputs[0]] = form

    def sites(self) -> list[Site]:
        """The sums of two or more branches that no later node extends, in trace order."""
        found = [Site(v, f) for v, f in self.forms.items() if v not in self.extended and len(f.terms) > 1]
        found += [s for s in self.ends if len(s.form.terms) > 1]
        return sorted(found, key=lambda s: s.nodes[-1].index)

    def operand(self, value: Value) -> Form | None:
        """How a node reading ``value`` sees it: its form if only that node reads it, else a root."""
        form = self.forms.get(value)
        return form if form is not None and len(value.users) == 1 else _identity(value)

    def _extend(self, node: Node, form: Form | None) -> Form | None:
        """``form`` for ``node``'s output; the forms of its inputs it took over are no longer sites."""
        if form is not None:
            self.extended.update(v for v in node.inputs if v in self.forms and len(v.users) == 1 and v is not form.root)
        return form

    def _read(self, node: Node) -> Form | None:
        if len(node.outputs) != 1 or not node.inputs:
            return None
        if node.kind == "module":
            return self._extend(node, self._module(node))
        if node.kind == "function":
            return self._extend(node, self._function(node))
        return None

    def _module(self, node: Node) -> Form | None:
        module, value = node.module, node.inputs[0]
        if len(node.inputs) != 1:
            return None
        form = self.operand(value)
        if form is None:
            return None
        if is_passthrough(node):
            return replace(form, nodes=(*form.nodes, node))
        dims = len(value.shape) - 2
        geometry = _conv_geometry(module, dims) if isinstance(module, nn.modules.conv._ConvNd) else \
            _pool_geometry(module, value.shape[1], dims)
        if geometry is not None:  # a conv of its input (a conv of a conv is not one conv)
            return _conv_form(node, _identity(value), geometry)
        if is_batchnorm_like(module):
            return self._batchnorm(node, form)
        if not form.nodes or next(module.children(), None) is not None:
            return None
        scale_shift = _channel_affine(module, value.shape, form.like)
        return form.affine(*scale_shift, node) if scale_shift is not None else None

    def _batchnorm(self, node: Node, form: Form) -> Form | None:
        try:
            stats, act = split_batchnorm_act(node.module, node.inputs[0].shape)
        except Refusal as refusal:
            self.refused[node] = refusal.detail or refusal.reason.value
            return None
        scale, shift = batchnorm_scale_shift(stats.mean, stats.var, stats.eps, stats.weight, stats.bias)
        normed = form.affine(scale, shift, node, like=stats.mean)
        if isinstance(act, nn.Identity):
            return normed
        self.ends.append(Site(node.outputs[0], replace(normed, nodes=normed.nodes[:-1]), act, node))
        self._extend(node, normed)
        return None

    def _function(self, node: Node) -> Form | None:
        if node.kwargs:
            return None
        numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        name, values = node.name, node.inputs
        if len(values) == 2 and not numbers and not node.used_parameters and name in _ADD | _SUB:
            return self._sum(node, -1.0 if name in _SUB else 1.0)
        form = self.operand(values[0]) if len(values) == 1 else None
        if form is None:
            return None
        if is_passthrough(node):
            return replace(form, nodes=(*form.nodes, node))
        if not numbers and not node.used_parameters and name in _NEG:
            return form.affine(-1.0, 0.0, node)
        if len(numbers) == 1 and not node.used_parameters:
            return _with_number(form, name, float(numbers[0]), node)
        if not numbers and len(node.used_parameters) == 1 and name in _MUL | _ADD:
            vector = _per_channel(node.used_parameters[0], values[0].shape)
            if vector is not None:
                like = node.used_parameters[0]
                return form.affine(vector, 0.0, node, like) if name in _MUL else form.affine(1.0, vector, node, like)
        return None

    def _sum(self, node: Node, sign: float) -> Form | None:
        a, b = node.inputs
        left, right = self.operand(a), self.operand(b)
        if left is None or right is None or a.shape != b.shape:
            return None
        try:
            return left.plus(right, node, sign)
        except Refusal as refusal:
            if left.root is right.root:
                self.unmergeable.append(((*left.nodes, *right.nodes), refusal.detail))
            else:
                self._non_linear_branch(a, right)
                self._non_linear_branch(b, left)
            return None

    def _non_linear_branch(self, value: Value, other: Form) -> None:
        """Note a sum operand that is one op away from a branch of the other operand's tensor.

        ``relu(bn(conv(x))) + bn(conv(x))`` is a RepVGG block with a non-linear branch; a residual
        ``bn(conv(relu(...))) + x`` is no branch structure and is not noted.
        """
        producer = value.producer
        inner = self.forms.get(producer.inputs[0]) if len(producer.inputs) == 1 else None
        if inner is not None and inner.root is other.root and inner.nodes:
            why = self.refused.get(producer, "it is not linear")
            self.unmergeable.append(((*inner.nodes, producer, *other.nodes),
                                     f"one branch goes through {describe(producer)}: {why}"))


def _conv_form(node: Node, root: Form, geometry: Geometry) -> Form:
    """The conv (or average pool) ``node`` of ``root``'s value, as a form of one term."""
    module = node.module
    if isinstance(module, nn.modules.conv._ConvNd):
        label = f"conv {'x'.join(map(str, geometry.kernel))}"
        kernel = lambda: module.weight.detach().double()  # noqa: E731  (read when merged, not before)
        bias = module.bias.detach().double() if module.bias is not None else torch.zeros(geometry.out_channels,
                                                                                           dtype=torch.float64)
        like = module.weight
    else:
        label = f"avg-pool {'x'.join(map(str, geometry.kernel))}"
        shape, tap = (geometry.out_channels, 1, *geometry.kernel), 1 / math.prod(geometry.kernel)
        kernel = lambda: torch.full(shape, tap, dtype=torch.float64)  # noqa: E731
        bias, like = torch.zeros(geometry.out_channels, dtype=torch.float64), None
    term = Term(label, geometry, kernel, torch.ones(geometry.out_channels, dtype=torch.float64))
    return Form(root.root, (term,), bias, geometry, (node,), like if like is not None else root.like)


def _with_number(form: Form, name: str, number: float, node: Node) -> Form | None:
    if name in _ADD:
        return form.affine(1.0, number, node)
    if name in _SUB:
        return form.affine(1.0, -number, node)
    if name in _RSUB:
        return form.affine(-1.0, number, node)
    if name in _MUL:
        return form.affine(number, 0.0, node)
    if name in _DIV and number != 0:
        return form.affine(1.0 / number, 0.0, node)
    return None


def _per_channel(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``tensor`` as one float64 value per channel (dim 1) of a value of ``shape`` (None: it broadcasts otherwise)."""
    if not tensor.is_floating_point() or tensor.dim() > len(shape):
        return None
    full = (1,) * (len(shape) - tensor.dim()) + tuple(tensor.shape)
    if any(n != 1 for i, n in enumerate(full) if i != 1) or full[1] not in (1, shape[1]):
        return None
    return tensor.detach().double().reshape(-1).expand(shape[1])


def _channel_affine(module: nn.Module, shape: tuple[int, ...], like: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) per channel when the leaf ``module`` behaves as ``scale · x + shift`` on probes (layer scale)."""
    own = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), like)
    dtype, device = (own.dtype, own.device) if own is not None else (torch.float32, None)
    probe = (2, shape[1], *[3] * (len(shape) - 2))
    x = torch.randn(probe, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=device)
    try:
        with torch.no_grad():
            zero, one, got = (module(v) for v in (torch.zeros_like(x), torch.ones_like(x), x.clone()))
    except Exception:  # the probe is our input, not the user's
        return None
    if not all(isinstance(v, torch.Tensor) and v.shape == x.shape for v in (zero, one, got)):
        return None
    shift = zero.double()[0].reshape(shape[1], -1)[:, 0]
    scale = one.double()[0].reshape(shape[1], -1)[:, 0] - shift
    view = (1, -1, *[1] * (len(shape) - 2))
    check = compare_outputs(got, (x.double() * scale.view(view) + shift.view(view)).to(dtype), label="probe")
    return (scale, shift) if check.passed else None


# ------------------------------------------------------------------------------- where a site is replaced


@dataclass(frozen=True)
class Merge:
    """Replace ``container`` (at ``path``) by ``replacement``: the merged conv, then ``tail``."""

    replacement: nn.Module
    detail: str


def plan_site(ctx: PassContext, site: Site, paths: dict[str, nn.Module]) -> Edit:
    """Where ``site`` is replaced and by what, or :class:`Refusal` with why not."""
    flow = ctx.flow
    # Passthrough ops after the last real one (an nn.Identity ``se`` beside the block) may stay where they are.
    last = max(i for i, n in enumerate(site.nodes) if not is_passthrough(n))
    region = [n for n in site.nodes[:last + 1] if n.kind == "module"]
    for node in region:
        _check_removable(ctx, node)
    conv = site.form.conv()
    tried = []
    for path in _containers(region, paths):
        container = paths[path]
        tail = _tail(flow, site, path, paths)
        if tail is None:
            break
        if hooked := hooks_lost_by_replacing(container):
            raise Refusal(SkipReason.HOOKED, f"{path}: {hooked}")
        parts = [*([site.act] if site.act is not None else []), *tail]
        replacement = nn.Sequential(conv, *parts) if parts else conv
        if _behaves_as(container, replacement, site.form.root.shape, conv.weight):
            return Edit(path, container, Merge(replacement, _describe(site, conv)))
        tried.append(path)
    if not tried:
        raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, "its branches are summed where no submodule holds only them "
                      "(in the model's own forward(), or beside other layers): nothing can be replaced by one conv")
    raise Refusal(SkipReason.UNKNOWN_BEHAVIOUR, f"{', '.join(tried)}: its forward() does not compute the merged conv "
                  "(then the layers after it) on a probe input")


def plan_sites(ctx: PassContext, reader: FormReader) -> Iterator[tuple[Site, Edit | Skip]]:
    """Each site ``reader`` found, with where it is replaced (an :class:`Edit`) or why not (a :class:`Skip`).

    The pass's planning, public so that ``inspect`` says which norms ``fold`` merges away.
    """
    paths = {path: module for module, path in ctx.flow.module_paths.items()}
    for site in reader.sites():
        try:
            yield site, plan_site(ctx, site, paths)
        except Refusal as refusal:
            yield site, refusal.skip(_where(site.nodes))


def _check_removable(ctx: PassContext, node: Node) -> None:
    module, path = node.module, node.name
    if id(module) not in ctx.parents:  # taken out of the model by an earlier pass of the run
        raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{path} was already changed by an earlier pass: "
                      "reparameterize first")
    owned = [*module.parameters(), *module.buffers()]
    if owned and len(ctx.flow.calls_of(module)) != 1:
        raise Refusal(SkipReason.SHARED_PARAMETER, f"{path} is called {len(ctx.flow.calls_of(module))} times")
    if any(id(p) in ctx.shared for p in module.parameters()):
        raise Refusal(SkipReason.SHARED_PARAMETER, f"{path} shares its weight with another module")
    if any(ctx.flow.uses_outside(t) for t in owned):
        raise Refusal(SkipReason.FUNCTIONAL_USE, f"{path}'s tensors are also read outside {path}")
    if hooked := hooks_lost_by_replacing(module):
        raise Refusal(SkipReason.HOOKED, f"{path}: {hooked}")


def _containers(region: list[Node], paths: dict[str, nn.Module]) -> Iterator[str]:
    """The modules that may hold the site, innermost first: the common parent of its layers, then upwards."""
    common = _common_parent(region)
    while common:
        path = ".".join(common)
        if path in paths:
            yield path
        common = common[:-1]


def _tail(flow: Trace, site: Site, path: str, paths: dict[str, nn.Module]) -> list[nn.Module] | None:
    """The children of the module at ``path`` that run after the site (an act, a squeeze-excite), in call order.

    None when a module call inside ``path`` that is not the site's runs before the site ends: the
    module computes more than the site, so it is no candidate (nor is any module above it). Whether
    the children really run one after another on the site's value is what the probe shows.
    """
    site_nodes, end = set(site.nodes), site.nodes[-1].index
    children: dict[str, None] = {}
    for node in flow.nodes:
        if node.kind != "module" or node in site_nodes or not node.name.startswith(path + "."):
            continue
        if node.index < end:
            return None
        children.setdefault(path + "." + node.name[len(path) + 1:].split(".")[0])
    return [paths[child] for child in children]


def _behaves_as(container: nn.Module, replacement: nn.Module, shape: tuple[int, ...], like: torch.Tensor) -> bool:
    """True when ``container`` computes what ``replacement`` does on a random input of ``shape``."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(like.dtype).to(like.device)
    try:
        with torch.no_grad():
            want, got = container(x.clone()), replacement(x.clone())
    except Exception:  # a container that takes other arguments, or fails on a probe: not this one
        return False
    return isinstance(want, torch.Tensor) and compare_outputs(want, got, label="probe").passed


def _describe(site: Site, conv: nn.Module) -> str:
    """``3 branches (conv 3x3, conv 1x1, identity) and 3 BatchNorm(s) -> one Conv2d 3x3``."""
    kernel = "x".join(map(str, conv.kernel_size))
    norms = len(site.norms)
    counts = Counter(t.label for t in site.form.terms)
    branches = ", ".join(label + (f" x{n}" if n > 1 else "") for label, n in counts.items())
    act = f", then its {type(site.act).__name__}" if site.act is not None else ""
    return (f"{len(site.form.terms)} branches ({branches}) and {norms} BatchNorm(s) "
            f"-> one {type(conv).__name__} {kernel}{act}")


# ------------------------------------------------------------------------------- the pass


class Reparameterize(ModulePass):
    """Merge summed linear branches (conv+BN, 1×1 conv+BN, identity BN, average pool) into one conv."""

    name = report_name = "reparameterize"
    check_label = "reparameterized vs original"
    subject = "the reparameterized model"
    rounding_noise_ok = True  # exact in float64; a deep net amplifies the one rounding of each merged weight
    check_if_unchanged = False  # nothing merged: nothing to check (fold and export run it on every model)

    def plan(self, ctx: PassContext) -> Iterator[Edit | Skip]:
        reader = FormReader(ctx.flow)
        yield from (planned for _, planned in plan_sites(ctx, reader))
        for nodes, detail in reader.unmergeable:
            yield Skip(_where(nodes), SkipReason.BRANCHES_NOT_MERGEABLE, detail)

    def apply(self, ctx: PassContext, edit: Edit) -> list[Change]:
        replace_module(ctx.model, edit.target, edit.plan.replacement, ctx.parents)
        return [Change("reparameterized", edit.path, None, edit.plan.detail)]


def _common_parent(nodes: list[Node] | tuple[Node, ...]) -> list[str]:
    """The path (as parts) of the deepest module that holds every module node of ``nodes``."""
    common: list[str] | None = None
    for node in nodes:
        if node.kind != "module":
            continue
        parent = node.name.split(".")[:-1]
        common = parent if common is None else [a for a, _ in zip(common, parent)][:_shared_length(common, parent)]
    return common or []


def _shared_length(a: list[str], b: list[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _where(nodes: list[Node] | tuple[Node, ...]) -> str:
    """The module a group of nodes belongs to, as reports name it (the model itself when none is deeper)."""
    return ".".join(_common_parent(nodes)) or "(the model)"


def reparameterize(model: nn.Module, example_inputs: InputsLike, *, inplace: bool = False,
                   atol: float | None = None, rtol: float | None = None) -> Report:
    """Merge every sum of parallel linear branches of ``model`` into one conv; return the report.

    The trace of ``example_inputs`` proves each merge; the result is checked against the original
    on them (:class:`VerificationError` when it differs). With ``inplace=False`` (the default) the
    model is copied first; ``report.model`` is the result. Run it before ``fold_batchnorm``.
    """
    return run(Reparameterize(), model, example_inputs, inplace=inplace, atol=atol, rtol=rtol)
