"""Integrations that put adapterfast adapters into real models (transformers, PEFT, AdapterHub).

- ``hf``: the entry for transformers models without PEFT (``add_adapters``, ``save_adapters``,
  ``load_adapters``, ``remove_adapters``, ``AdapterOptions``); it documents the placements and
  re-exports the modules below, one job each:
  ``options`` (the option fields, dtype, initialisation, ``new_adapter``), ``architectures`` (the
  table of sites per architecture, target-name rules), ``sites`` (the rule for architectures not
  in the table), ``site_forward`` (how an adapter meets its site), ``hooks`` (``add_adapters``),
  ``saving`` (safetensors).
- ``peft``: ``AdapterConfig``, a PEFT config (``get_peft_model``, ``PeftModel.from_pretrained``);
  ``peft_mixed``: PEFT's mixed-batch ``adapter_names=``.
- ``adapterhub``/``adapterhub_grouped``: AdapterHub ``adapters`` models on the fused op.
- ``registration``: ``register()``/``unregister()``, everything adapterfast changes in PEFT and
  AdapterHub (``import adapterfast`` calls ``register()``).

Importing this package is cheap (it imports neither transformers nor PEFT). The names below are
loaded on first use. ``AdapterConfig`` is the PEFT config when PEFT is installed, else the plain
``AdapterOptions`` (same fields), which ``add_adapters`` takes as well.
"""
from __future__ import annotations

import importlib

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
