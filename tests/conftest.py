"""Shared test set-up.

The scripts in entrypoints/ import their siblings flat (`import contract`), as they do inside a
SageMaker container, so the tests put that folder on sys.path to import them the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = REPO_ROOT / "entrypoints"
if str(ENTRYPOINTS) not in sys.path:
    sys.path.insert(0, str(ENTRYPOINTS))
