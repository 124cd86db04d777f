"""The package logger, and one way to say a thing once instead of once per call.

``first_time(key)`` is the record of what was said: per process, or per ``owner`` object for as
long as that object lives (an AdapterHub model's config, so a new model hears its own reasons).
``warn_once`` logs through it.
"""
from __future__ import annotations

import logging
import weakref
from typing import Hashable, Optional

logger = logging.getLogger("adapterfast")
_said: set = set()
_said_per_owner: dict[int, set] = {}  # by id(owner); an entry goes when its owner is collected


def first_time(key: Hashable, owner: Optional[object] = None) -> bool:
    """True the first time ``key`` is seen (for ``owner``, when given); records it."""
    if owner is None:
        seen = _said
    else:
        seen = _said_per_owner.get(id(owner))
        if seen is None:
            seen = _said_per_owner[id(owner)] = set()
            weakref.finalize(owner, _said_per_owner.pop, id(owner), None)
    if key in seen:
        return False
    seen.add(key)
    return True


def warn_once(message: str, *, level: int = logging.WARNING, owner: Optional[object] = None) -> None:
    """Logs ``message`` (a warning unless ``level`` says otherwise) the first time it is seen."""
    if first_time(message, owner):
        logger.log(level, message)
