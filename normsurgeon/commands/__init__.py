"""One click command per file; ``COMMANDS`` is what ``normsurgeon`` offers, in help order."""

from .fold import fold

COMMANDS = (fold,)
