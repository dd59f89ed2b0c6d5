"""Where Levante keeps its state: LEVANTE_HOME, default ~/.levante (read when asked, never at import)."""

from __future__ import annotations

import os
from pathlib import Path


def levante_home() -> Path:
    return Path(os.environ.get("LEVANTE_HOME") or Path.home() / ".levante").expanduser()
