"""`python -m agent.security.audit verify|export [--file PATH] [--json]`."""

from __future__ import annotations

import sys

from agent.security.audit.cli import main

sys.exit(main())
