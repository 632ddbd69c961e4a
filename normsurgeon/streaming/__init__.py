"""Surgery on a save_pretrained folder one decoder block at a time (see :mod:`.run`)."""

from .run import StreamedSurgery, stream_surgery

__all__ = ["StreamedSurgery", "stream_surgery"]
