"""Browser tests: Debian's chromium driven by playwright, against real `levante serve` processes.

The server fixtures are the integration tests' own (a real process on a loopback port);
playwright's browser downloads are never used: the system chromium is launched directly.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser


def _load_integration_conftest() -> Any:
    """tests/integration/conftest.py under its own module name: its server fixtures serve these tests too."""
    path = Path(__file__).parents[1] / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("levante_tests_integration_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_integration = _load_integration_conftest()
SMOLLM2_ARGS: list[str] = _integration.SMOLLM2_ARGS
server_factory = _integration.server_factory
smollm2_server = _integration.smollm2_server

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Module-scoped: playwright's sync API runs an event loop on this thread until it stops, and
    tests after these ones call asyncio.run (which refuses to run inside another loop)."""
    executable = chromium_path()
    if executable is None:
        reason = "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def keyed_server(server_factory: Callable[..., Any]) -> Any:
    """SmolLM2 served with the API key `k1` (a `Server` of tests/integration/conftest.py)."""
    return server_factory([*SMOLLM2_ARGS, "--api-key", "k1"])


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
