"""Errors of the page core, raised alike by the compiled core and the Python reference."""


class FrameError(ValueError):
    """A frame is truncated, corrupt or does not fit the destination: the message says which."""


class DeltaError(ValueError):
    """An xor delta is malformed (runs past the page end, bad varint, empty literal)."""
