"""One click command per file; ``COMMANDS`` is what ``normsurgeon`` offers, in help order."""

from .convert import convert
from .export import export, verify
from .fold import fold
from .inspect import inspect
from .optimize import optimize
from .recalibrate import recalibrate
from .weightnorm import weightnorm

COMMANDS = (inspect, fold, convert, export, verify, optimize, weightnorm, recalibrate)
