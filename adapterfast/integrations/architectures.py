"""Where adapters go: the table of sites per architecture, and PEFT's rules for target names.

``ARCHITECTURES`` maps ``model.config.model_type`` to its sites (regular expressions fully
matching module names); a model without an entry gets the rule in ``sites.py``. ``target_modules``
set by the user overrides both. ``add_adapters`` and the PEFT tuner both resolve targets here.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import torch.nn as nn

from .options import PLACEMENTS


@dataclasses.dataclass(frozen=True)
class Sites:
    """Where adapters go in one architecture: regular expressions fully matching module names."""

    ffn_output: str         # the FFN's output projection (pfeiffer, houlsby)
    attention_output: str   # the attention block's output projection (houlsby)
    ffn: str                # the whole FFN block, input = FFN input (parallel)

    def for_placement(self, placement: str) -> str:
        if placement == "pfeiffer":
            return self.ffn_output
        if placement == "houlsby":
            return f"(?:{self.attention_output})|(?:{self.ffn_output})"
        if placement == "parallel":
            return self.ffn
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")


def _sites(layers: str, ffn_output: str, attention_output: str, ffn: str) -> Sites:
    layer = rf"(?:.*\.)?{layers}\.\d+\."
    return Sites(layer + ffn_output, layer + attention_output, layer + ffn)


_BERT_LIKE = _sites("layer", r"output\.dense", r"attention\.output\.dense", "output")
_LLAMA_LIKE = _sites("layers", r"mlp\.down_proj", r"self_attn\.o_proj", "mlp")

#: Default adapter sites by ``config.model_type``. Every entry is exercised by the test suite on a
#: small random model.
ARCHITECTURES: dict[str, Sites] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": _sites("layer", r"ffn\.lin2", r"attention\.out_lin", "ffn"),
    "gpt2": _sites("h", r"mlp\.c_proj", r"attn\.c_proj", "mlp"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}


def model_type_of(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_target_modules(model_type: Optional[str], placement: str, model: Optional[nn.Module] = None) -> str:
    """The default sites (a regular expression over module names): the ``ARCHITECTURES`` entry for
    ``model_type``, else what ``sites.for_placement`` finds in ``model``."""
    table = ARCHITECTURES.get(model_type)
    if table is not None:
        return table.for_placement(placement)
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if model is None:
        raise ValueError(
            f"adapterfast has no default adapter sites for model_type {model_type!r} without the model (table: "
            f"{', '.join(sorted(ARCHITECTURES))}); pass target_modules, e.g. the names of the modules whose "
            "output the adapter should act on (placement pfeiffer/houlsby) or the FFN blocks (parallel)")
    from . import sites
    return sites.for_placement(model, placement)


def resolve_target_modules(config, model_type: Optional[str], model: Optional[nn.Module] = None):
    """``config.target_modules`` if set, else the architecture's default for ``config.placement``."""
    if config.target_modules is not None:
        return config.target_modules
    return default_target_modules(model_type, config.placement, model)


def matches(target_modules, name: str) -> bool:
    """PEFT's rule: a string is a regular expression fully matching the name; a list holds names
    or suffixes (at a ``.`` boundary)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def is_head(name: str, heads: Sequence[str]) -> bool:
    """Whether module ``name`` is (inside) a head: PEFT's modules_to_save rule, ``endswith``, applied
    to the name and each of its ancestors (so DistilBERT's ``pre_classifier`` counts, as in PEFT)."""
    parts = name.split(".")
    return any(".".join(parts[:i]).endswith(h) for i in range(1, len(parts) + 1) for h in heads)
