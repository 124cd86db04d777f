"""adapterfast: fused bottleneck adapters for PyTorch.

    y = residual + scale * dropout(up(act(down(x))))

``fused_adapter`` is the op, ``Adapter`` the drop-in module, ``replace_adapters`` swaps existing
eager adapters in a model for it. Triton kernels run CUDA tensors, C++ kernels CPU tensors, and
the eager reference everything else; ``backends()`` says which are available.
"""
from . import ops as _ops  # registers the custom ops
from .dispatch import backends, use_backend
from .functional import fused_adapter
from .modules import Adapter, replace_adapters

__version__ = "0.1.0"

__all__ = ["Adapter", "backends", "fused_adapter", "replace_adapters", "use_backend", "__version__"]
