"""The package logger, and a way to say a thing once per process instead of once per call."""
from __future__ import annotations

import logging

logger = logging.getLogger("adapterfast")
_said: set[str] = set()


def warn_once(message: str) -> None:
    """Logs ``message`` as a warning the first time it is seen."""
    if message not in _said:
        _said.add(message)
        logger.warning(message)
