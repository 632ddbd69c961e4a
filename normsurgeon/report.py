"""What a pass did: the changes it made, what it skipped and why, and the numerical check.

Every pass returns a :class:`Report`. The CLI renders it as a table or as JSON; tests assert
on its fields. A skip always carries a :class:`SkipReason` member plus a detail sentence, so
the user sees *why* a norm was left alone — never a silent ``continue``; a change names its
:class:`Action`. The JSON (``Report.to_dict``) is what ``--json`` prints: README.md lists its keys.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SkipReason(enum.Enum):
    """Why a pass left a module as it was. The value is the short, user-facing explanation."""

    TRAINING_MODE = "in training mode: it normalizes with batch statistics"
    NO_RUNNING_STATS = "track_running_stats=False: it uses batch statistics even in eval mode"
    NONFINITE_STATS = "running statistics contain NaN or inf"
    NEVER_UPDATED = "running statistics were never updated (num_batches_tracked=0, mean 0, var 1)"
    NOT_CALLED = "not called on the example inputs"
    UNKNOWN_BEHAVIOUR = "subclass overrides forward(): what it computes is not known"
    NO_FOLDABLE_NEIGHBOUR = "no neighbouring conv/linear it can be folded into exactly"
    SHARED_PARAMETER = "a weight it would change is shared with another module"
    PARAMETRIZED_WEIGHT = "the neighbour's weight or bias is parametrized in a way the fold cannot keep"
    HOOKED = "a forward hook on it or its neighbour would be dropped or see different values"
    FUNCTIONAL_USE = "its parameters or buffers are also used outside its own forward()"
    UNSUPPORTED_DTYPE = "non-floating-point parameters"
    NOT_A_NORM = "looks like a norm but does not compute a known norm formula"
    NO_AFFINE = "it has no affine parameters to fold"
    NO_CONVERSION = "normsurgeon has no conversion between these kinds"
    UNSUPPORTED_STRUCTURE = "the model's structure does not allow this conversion"
    ALREADY_WEIGHT_NORMED = "its weight is already weight-normalized"
    LAZY_UNINITIALIZED = "a lazy module whose weight is not initialized yet"
    NOT_AFTER_WEIGHT_NORM = "its input does not come straight from a weight-normed layer"
    OPSET_TOO_OLD = "the model's opset has no native op for it"
    BRANCHES_NOT_MERGEABLE = "its parallel branches cannot be merged into one conv exactly"


class Action(str, enum.Enum):
    """What a pass did to a module. The value is the word reports and ``--json`` show.

    A new pass that does something new adds its member here: a free string would let two passes
    spell one action two ways, and a typo would silently match nothing in ``Report.changed``.
    """

    FOLDED = "folded"
    FOLDED_AFFINE = "folded-affine"
    FUSED = "fused"
    REPLACED = "replaced"
    CONVERTED = "converted"
    CENTRED = "centred"
    MEAN_ONLY = "mean-only"
    WEIGHT_NORMED = "weight-normed"
    WEIGHT_NORM_REMOVED = "weight norm removed"
    INITIALISED = "initialised"
    RECALIBRATED = "recalibrated"
    GROUPED = "grouped"
    REPARAMETERIZED = "reparameterized"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__
    __hash__ = str.__hash__  # equal to its value, so it must hash like it (``Action.FOLDED in {"folded"}``)

    @classmethod
    def _missing_(cls, value: object) -> Action:
        """``Action("fold")``: a ValueError that lists the known actions."""
        known = ", ".join(repr(a.value) for a in cls)
        raise ValueError(f"unknown change action {value!r}: the actions are {known} "
                         "(a pass that does something new adds it to normsurgeon.report.Action)")


@dataclass(frozen=True)
class Change:
    """One edit a pass made: ``module`` (e.g. a norm) was ``action``-ed, ``into`` another module.

    ``action`` may be given as its word (``Change("folded", ...)``): it is stored as the :class:`Action`.
    """

    action: Action
    module: str
    into: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "module": self.module, "into": self.into, "detail": self.detail}


@dataclass(frozen=True)
class _Because:
    """A module (its path) and why a pass did not do to it what it does: a reason and a detail."""

    module: str
    reason: SkipReason
    detail: str = ""

    @property
    def message(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "reason": self.message, "code": self.reason.name}


@dataclass(frozen=True)
class Skip(_Because):
    """A module the pass looked at and left as it was."""


@dataclass(frozen=True)
class LeftOut(_Because):
    """A module a pass was asked to handle exactly and could not, though it may still be handled
    another way (convert: a LayerNorm that centring cannot make an exact RMSNorm, converted
    approximately or not at all). Callers read these instead of searching the notes' text."""


@dataclass(frozen=True)
class OutputDiff:
    """How one (flattened, named) output of the new model differs from the original's."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    cosine: float
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "cosine": self.cosine,
            "passed": self.passed,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Check:
    """The numerical comparison of a transformed model against the original on the same inputs.

    An output passes when ``max_abs_diff <= atol + rtol * max|reference|``; ``max_rel_diff`` is
    ``max_abs_diff / max|reference|`` (relative to the output's scale, not element-wise, so
    near-zero elements do not make it meaningless).
    """

    outputs: tuple[OutputDiff, ...]
    atol: float
    rtol: float
    label: str = "transformed vs original"
    informational: bool = False  # measured, not judged: the outputs are meant to differ (atol is then inf)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "passed": self.passed,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "min_cosine": self.min_cosine,
            "atol": self.atol,
            "rtol": self.rtol,
            "informational": self.informational,
            "outputs": [o.to_dict() for o in self.outputs],
        }


# The reports whose ``to_dict`` lists the folded BatchNorms under "folded" (the fold, export and
# optimize commands'); the key would be an always-empty list in the others.
FOLDING_PASSES = frozenset({"fold", "export", "optimize"})


@dataclass
class Report:
    """The result of one pass over one model."""

    pass_name: str
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # e.g. export time, file size, op counts
    model: Any = field(default=None, repr=False)  # the transformed nn.Module, for the caller
    left_out: list[LeftOut] = field(default_factory=list)

    @property
    def check(self) -> Check | None:
        """The first (for most passes, the only) numerical check."""
        return self.checks[0] if self.checks else None

    @check.setter
    def check(self, value: Check) -> None:
        self.checks = [value]

    @property
    def passed(self) -> bool:
        """True when every numerical check passed (or there was nothing to check)."""
        return all(c.passed for c in self.checks)

    def changed(self, action: Action | str) -> list[Change]:
        """The changes of one kind (an unknown action is a ValueError, not an empty list)."""
        action = Action(action)
        return [c for c in self.changes if c.action is action]

    def merge(self, other: Report) -> Report:
        """A new report of both, in order (a sequence of passes): this one's name and model, and of
        ``other``'s facts only the keys this one does not have."""
        return Report(
            self.pass_name,
            changes=[*self.changes, *other.changes],
            skipped=[*self.skipped, *other.skipped],
            checks=[*self.checks, *other.checks],
            notes=[*self.notes, *other.notes],
            facts={**self.facts, **{k: v for k, v in other.facts.items() if k not in self.facts}},
            model=self.model,
            left_out=[*self.left_out, *other.left_out],
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` payload: keys in a fixed order, "folded" for :data:`FOLDING_PASSES` only, and
        "left_out" only when something was."""
        payload: dict[str, Any] = {
            "pass": self.pass_name,
            "passed": self.passed,
            "changes": [c.to_dict() for c in self.changes],
        }
        if self.pass_name in FOLDING_PASSES:
            payload["folded"] = [
                {"norm": c.module, "into": c.into, "detail": c.detail} for c in self.changed(Action.FOLDED)
            ]
        payload["skipped"] = [s.to_dict() for s in self.skipped]
        if self.left_out:
            payload["left_out"] = [o.to_dict() for o in self.left_out]
        payload.update({
            "check": self.check.to_dict() if self.check else None,
            "checks": [c.to_dict() for c in self.checks],
            "facts": dict(self.facts),
            "notes": list(self.notes),
        })
        return payload
