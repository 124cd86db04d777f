"""adapterfast: fused bottleneck adapters for PyTorch.

    y = residual + scale * dropout(up(act(down(x))))

``fused_adapter`` is the op, ``Adapter`` the drop-in module, ``replace_adapters`` swaps existing
eager adapters in a model for it. Triton kernels run CUDA tensors, C++ kernels CPU tensors, and
the eager reference everything else; ``backends()`` says which are available.

Importing the package calls ``register()`` once: adapterfast becomes a PEFT method (when PEFT is,
or gets, imported), so ``PeftModel.from_pretrained`` loads adapterfast checkpoints after a plain
``import adapterfast``. ``unregister()`` undoes everything adapterfast changed in PEFT and
AdapterHub (``adapterfast/integrations/registration.py`` lists it).
"""
from . import cpu as _cpu  # registers the C++ backend (the reference registers with dispatch itself)
from . import ops as _ops  # registers the custom ops
from .dispatch import backends, current as _current_backend, use_backend
from .functional import fused_adapter
from .modules import Adapter, replace_adapters
from .bank import AdapterBank, grouped_adapter

__version__ = "0.1.0"

_current_backend()  # a bad $ADAPTERFAST_BACKEND is an error now, naming the variable, not at the first call

__all__ = ["Adapter", "backends", "fused_adapter", "register", "replace_adapters", "unregister", "use_backend",
           "__version__"]

# Hugging Face integrations, loaded on first use so that `import adapterfast` needs neither
# transformers nor PEFT (see adapterfast/integrations).
from .integrations.registration import register, unregister  # noqa: E402

register()
_INTEGRATION_NAMES = ("AdapterConfig", "AdapterOptions", "add_adapters", "save_adapters", "load_adapters",
                      "remove_adapters")


def __getattr__(name: str):
    if name in _INTEGRATION_NAMES:
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
