"""One click command per file; ``COMMANDS`` is what ``normsurgeon`` offers, in help order."""

from .fold import fold
from .recalibrate import recalibrate
from .weightnorm import weightnorm

COMMANDS = (fold, weightnorm, recalibrate)
