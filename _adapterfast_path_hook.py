"""Keeps an adapterfast checkout's top-level ``kernels/`` folder from shadowing other packages.

The repository's ``kernels/`` is installed as ``adapterfast.kernels``, but a Python started in a
checkout (``python script.py``, ``python -m pytest``) has the checkout on ``sys.path``, where the
folder is also importable as a top-level ``kernels``: the name of Hugging Face's optional
``kernels`` package, which transformers 5 probes with ``importlib.util.find_spec("kernels")`` and
imports on every model import. Installing adapterfast adds ``adapterfast_path_hook.pth`` to
site-packages, which runs ``install()`` at interpreter start: a ``sys.path_hooks`` entry that
gives each adapterfast checkout on ``sys.path`` a finder that does not see its ``kernels``
(everything else there imports as usual), so ``find_spec("kernels")`` finds the real package if
one is installed and None otherwise. Nothing else is imported at start-up (only ``os``/``sys``/
``importlib.machinery``), and other ``sys.path`` entries keep the standard finder.
"""
import os
import sys
from importlib.machinery import FileFinder

HIDDEN = "kernels"


def is_checkout(entry: str) -> bool:
    """Whether ``entry`` (a sys.path entry) is an adapterfast source tree with a top-level kernels/."""
    root = entry or os.getcwd()
    return (os.path.isfile(os.path.join(root, HIDDEN, "__init__.py"))
            and os.path.isfile(os.path.join(root, "adapterfast", "__init__.py")))


class CheckoutFinder(FileFinder):
    """The standard finder for a checkout directory, blind to its top-level ``kernels``."""

    def find_spec(self, fullname, target=None):
        if fullname == HIDDEN:
            return None
        return super().find_spec(fullname, target)


def _loaders():
    from importlib.machinery import (BYTECODE_SUFFIXES, EXTENSION_SUFFIXES, SOURCE_SUFFIXES,
                                     ExtensionFileLoader, SourceFileLoader, SourcelessFileLoader)
    return [(ExtensionFileLoader, EXTENSION_SUFFIXES), (SourceFileLoader, SOURCE_SUFFIXES),
            (SourcelessFileLoader, BYTECODE_SUFFIXES)]


def path_hook(entry: str):
    if not isinstance(entry, str) or not is_checkout(entry):
        raise ImportError("not an adapterfast checkout")  # the next hook (the standard FileFinder) takes it
    return CheckoutFinder(entry or ".", *_loaders())


def install() -> None:
    """Adds ``path_hook`` in front of ``sys.path_hooks`` (once) and forgets cached finders of checkouts."""
    if path_hook in sys.path_hooks or any(getattr(h, "__module__", None) == __name__ for h in sys.path_hooks):
        return
    sys.path_hooks.insert(0, path_hook)
    for entry in [e for e in sys.path_importer_cache if isinstance(e, str)]:
        if is_checkout(entry):
            del sys.path_importer_cache[entry]

