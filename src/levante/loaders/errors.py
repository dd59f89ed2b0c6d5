"""The one error type every weights loader raises."""

from __future__ import annotations


class WeightsError(ValueError):
    """A weights file is missing, unsafe (pickle), truncated or corrupt. Message always names the file.

    Loaders turn every way a file can be wrong into this one type so that callers (the CLI, the model
    registry, the server's startup) can report "this file is bad" without knowing which format it was.
    """
