"""The seed dialects: five public job APIs answered from the same read models (section 8)."""

from __future__ import annotations

from types import ModuleType

DIALECTS: list[ModuleType] = []
