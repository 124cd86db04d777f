"""Where adapters go in a transformers model that has no entry in ``hf.ARCHITECTURES``: a rule.

A transformer is a stack of identical blocks (the longest ``nn.ModuleList`` whose items share one
class). In each block:

- the *attention output* is the last linear layer (``nn.Linear`` or transformers' ``Conv1D``, in
  registration order) inside the block's attention submodule (a child whose name contains
  ``attn``/``attention``) that writes ``hidden_size`` features (q/k/v come before it; a fused
  qkv writes ``3 * hidden_size``);
- the *MLP output projection* is the last linear layer outside the attention submodule that writes
  ``hidden_size`` features (``down_proj``, ``fc2``, ``c_proj``, ``dense_4h_to_h``, BERT's
  ``output.dense``...);
- the *FFN block* (parallel placement) is the module holding that projection, when it is not the
  block itself (``mlp``, ``ffn``, BERT's ``output``); blocks whose MLP is inlined (OPT) have none.

The sites come back as one regular expression over module names, with the block index generalised
to ``\\d+`` (``model\\.layers\\.\\d+\\.mlp\\.down_proj``), which is what ``target_modules`` holds and
what PEFT saves in ``adapter_config.json``.
"""
from __future__ import annotations

import re
from typing import Optional

import torch.nn as nn


def hidden_size(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        size = getattr(config, key, None)
        if isinstance(size, int):
            return size
    return None


def _out_features(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and weight is not None and weight.dim() == 2:  # transformers Conv1D: [in, out]
        return weight.shape[1]
    return None


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"adapterfast has no default adapter sites for {type(model).__name__}: it has no stack of "
                         "identical blocks (an nn.ModuleList of layers); pass target_modules")
    return best


def _is_attention(name: str) -> bool:
    return re.search(r"attn|attention", name.split(".")[0]) is not None


def _last_projection(block: nn.Module, size: int, in_attention: bool) -> Optional[str]:
    found = None
    for name, module in block.named_modules():
        if name and _is_attention(name) == in_attention and _out_features(module) == size:
            found = name
    return found


def _pattern(prefix: str, local: str) -> str:
    return r"(?:.*\.)?" + (re.escape(f"{prefix}.") if prefix else "") + r"\d+" + re.escape(f".{local}")


def find_sites(model: nn.Module) -> dict[str, Optional[str]]:
    """``{"ffn_output", "attention_output", "ffn"}``: a regex each (None where the block has no such site)."""
    size = hidden_size(model)
    if size is None:
        raise ValueError(f"adapterfast has no default adapter sites for {type(model).__name__}: its config (if any) "
                         "has no hidden_size/n_embd/d_model to find them by; pass target_modules")
    prefix, blocks = _blocks(model)
    block = blocks[0]
    ffn_output = _last_projection(block, size, in_attention=False)
    attention_output = _last_projection(block, size, in_attention=True)
    ffn = ffn_output.rsplit(".", 1)[0] if ffn_output and "." in ffn_output else None
    return {key: (_pattern(prefix, local) if local else None)
            for key, local in (("ffn_output", ffn_output), ("attention_output", attention_output), ("ffn", ffn))}


def for_placement(model: nn.Module, placement: str) -> str:
    """The default ``target_modules`` regex for ``placement``, or a ``ValueError`` saying which site is missing."""
    sites = find_sites(model)
    needed = {"pfeiffer": ("ffn_output",), "houlsby": ("attention_output", "ffn_output"), "parallel": ("ffn",)}[placement]
    missing = [key for key in needed if sites[key] is None]
    if missing:
        what = {"ffn_output": "an MLP output projection", "attention_output": "an attention output projection",
                "ffn": "an MLP block module (its MLP is inlined in the layer)"}
        raise ValueError(f"adapterfast has no default adapter sites for placement {placement!r} in {type(model).__name__}: its blocks have "
                         f"no {' and no '.join(what[k] for k in missing)}; pass target_modules")
    patterns = [sites[key] for key in needed]
    return patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)
