"""The private APIs of third-party libraries that the project relies on (listed in one place,
agent/core/thirdparty.py) still exist in the locked versions, and nothing else uses one."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from agent.core.thirdparty import PRIVATE_APIS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("module", "cls", "attr"), PRIVATE_APIS,
                         ids=[f"{m}.{c}.{a}" for m, c, a in PRIVATE_APIS])
def test_private_api_still_exists(module: str, cls: str, attr: str) -> None:
    """An upgrade that drops one fails here, not on a gateway."""
    assert callable(getattr(getattr(importlib.import_module(module), cls), attr))


def test_no_other_module_calls_them() -> None:
    """The calls go through agent.core.thirdparty; only the overridden hook is named elsewhere
    (the gated transport in drivers/coap/server.py, which subclasses aiocoap's)."""
    calls = {attr for _, _, attr in PRIVATE_APIS if attr.startswith("_")}
    found = []
    for top in ("agent", "drivers"):
        for p in (ROOT / top).rglob("*.py"):
            if p.name == "thirdparty.py":
                continue
            text = p.read_text()
            found += [f"{p.relative_to(ROOT)}: {a}" for a in calls
                      if re.search(rf"\.{re.escape(a)}\b", text)]
    assert found == []
