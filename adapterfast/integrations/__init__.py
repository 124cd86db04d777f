"""Integrations that put adapterfast adapters into real models (transformers, PEFT, AdapterHub).

- ``hf``: ``add_adapters``/``save_adapters``/``load_adapters``/``remove_adapters`` for transformers
  models without PEFT, ``AdapterOptions``, and the table of where adapters go per architecture.
- ``sites``: the rule that finds default adapter sites (MLP output projection, attention output,
  MLP block) in architectures without an entry in ``hf.ARCHITECTURES``.
- ``peft``: ``AdapterConfig``, a PEFT config (``get_peft_model``, ``PeftModel.from_pretrained``),
  and its registration with PEFT.

Importing this package is cheap (it imports neither transformers nor PEFT). The names below are
loaded on first use. ``AdapterConfig`` is the PEFT config when PEFT is installed, else the plain
``AdapterOptions`` (same fields), which ``add_adapters`` takes as well.

``install_peft_registration()`` (called by ``import adapterfast``) makes the PEFT method known to
PEFT without importing PEFT: at once if PEFT is already imported, otherwise right after PEFT is
first imported (a one-shot ``sys.meta_path`` finder that runs PEFT's own loader and then imports
``adapterfast.integrations.peft``, then removes itself). So ``PeftModel.from_pretrained`` finds
``"peft_type": "ADAPTERFAST"`` in a fresh process with nothing more than ``import adapterfast``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

from .._log import logger

_HF_NAMES = ("AdapterOptions", "add_adapters", "save_adapters", "load_adapters", "remove_adapters")
_PEFT_MODULE = __name__ + ".peft"


def _adapter_config_class():
    try:
        return importlib.import_module(_PEFT_MODULE).AdapterConfig
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in ("peft", "transformers"):
            raise
        return importlib.import_module(__name__ + ".hf").AdapterOptions


def __getattr__(name: str):
    if name == "AdapterConfig":
        return _adapter_config_class()
    if name in _HF_NAMES:
        return getattr(importlib.import_module(__name__ + ".hf"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_with_peft() -> None:
    module = sys.modules.get(_PEFT_MODULE)
    if module is not None and not getattr(module, "_READY", False):
        return  # being imported right now; it registers itself when done
    try:
        importlib.import_module(_PEFT_MODULE)
    except Exception as error:  # never break `import peft` for the user
        logger.warning("adapterfast: could not register with PEFT (%s: %s); `from adapterfast import "
                       "AdapterConfig` shows the full error", type(error).__name__, error)


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
            _register_with_peft()

        loader.exec_module = exec_then_register
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterPeftImport)]


def install_peft_registration() -> None:
    """Registers adapterfast with PEFT now if PEFT is imported, else as soon as it is (see above)."""
    if sys.modules.get("peft") is not None:
        _register_with_peft()
    elif not any(isinstance(f, _RegisterAfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeftImport())
