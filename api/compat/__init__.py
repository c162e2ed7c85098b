"""The seed dialects: five public job APIs answered from the same read models (section 8).

Each module maps routing, status words, field names, envelopes and time formats onto the
native read models; ``create_app`` adds every module's ``routes``.
"""

from __future__ import annotations

from types import ModuleType

from api.compat import mcrit, mentionlab, mindcase, mintlify, useapi

DIALECTS: list[ModuleType] = [mindcase, useapi, mcrit, mentionlab, mintlify]
