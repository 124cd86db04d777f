"""What adapterfast changes in other libraries, in one place: ``register()`` and ``unregister()``.

``import adapterfast`` calls ``register()`` once. It changes nothing of PEFT or AdapterHub until
they are used:

- PEFT: the method ``"ADAPTERFAST"`` is added to PEFT's config, tuner and prefix tables
  (``integrations.peft.register``; no PEFT class, function or enum is modified), so
  ``get_peft_model(model, AdapterConfig(...))`` and ``PeftModel.from_pretrained`` find it. So that
  ``import adapterfast`` does not import PEFT (seconds, and transformers with it), this happens at
  once only when PEFT is already imported; otherwise a one-shot ``sys.meta_path`` finder
  (``_RegisterAfterPeftImport``) runs PEFT's own loader when PEFT is first imported, registers
  right after it, and removes itself.
- AdapterHub: nothing at import. ``adapterhub.accelerate(model)`` puts its wrappers on the
  library's ``BottleneckLayer`` (``adapterhub.install()``); they act only on layers that
  ``accelerate`` switched on.

``unregister()`` undoes both: the pending finder is removed, PEFT's tables lose ``"ADAPTERFAST"``
(existing ``PeftModel``s keep working; new ones and ``from_pretrained`` of adapterfast checkpoints
raise PEFT's ``KeyError``) and ``BottleneckLayer`` gets its own methods back (accelerated models
run the library's code). ``register()`` again restores the PEFT side; ``accelerate`` the
AdapterHub side.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

from .._log import logger

_PEFT_MODULE = __package__ + ".peft"
_ADAPTERHUB_MODULE = __package__ + ".adapterhub"
_wanted = False  # register() was called and unregister() was not, since


def register() -> None:
    """Makes adapterfast known to PEFT, now or when PEFT is first imported (idempotent)."""
    global _wanted
    _wanted = True
    if sys.modules.get("peft") is not None:
        _register_with_peft()
    elif not any(isinstance(f, _RegisterAfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeftImport())


def unregister() -> None:
    """Undoes ``register()`` and the AdapterHub wrappers of ``adapterhub.accelerate`` (idempotent)."""
    global _wanted
    _wanted = False
    _remove_finder()
    module = sys.modules.get(_PEFT_MODULE)
    if module is not None and hasattr(module, "unregister"):
        module.unregister()
    module = sys.modules.get(_ADAPTERHUB_MODULE)
    if module is not None and hasattr(module, "uninstall"):
        module.uninstall()


def is_registered() -> bool:
    """Whether ``register()`` is in effect (PEFT registered, or to be registered on its import)."""
    return _wanted


def peft_module_loaded(module) -> None:
    """Called by ``integrations/peft.py`` when it has finished loading: registers it if wanted.

    Covers the case where that module's own ``import peft`` is the first import of PEFT (the
    finder fires while the module is still half loaded, so it leaves the registration to this).
    """
    if _wanted:
        module.register()


def _register_with_peft() -> None:
    module = sys.modules.get(_PEFT_MODULE)
    if module is not None and not getattr(module, "_LOADED", False):
        return  # being imported right now: peft_module_loaded registers it when done
    try:
        module = importlib.import_module(_PEFT_MODULE)
    except Exception as error:  # never break `import peft` for the user
        logger.warning("adapterfast: could not register with PEFT (%s: %s); `from adapterfast import "
                       "AdapterConfig` shows the full error", type(error).__name__, error)
        return
    module.register()


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds ``peft`` with the other finders and wraps its loader's ``exec_module`` so that,
    once PEFT's ``__init__`` has run, adapterfast registers itself and this finder goes away."""

    def __init__(self):
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" or self._searching:
            return None
        self._searching = True
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._searching = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _remove_finder()
            if _wanted:
                _register_with_peft()

        loader.exec_module = exec_then_register
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterPeftImport)]
