"""Bottleneck adapters in Hugging Face transformers models, without PEFT: ``add_adapters``.

    model = AutoModelForSequenceClassification.from_pretrained(...)
    model = adapterfast.add_adapters(model, AdapterOptions(task_type="SEQ_CLS", r=16, alpha=16))
    ...train...
    adapterfast.save_adapters(model, "out/adapters.safetensors")
    adapterfast.load_adapters(fresh_model, "out/adapters.safetensors")   # injects, then loads

This module is the user-facing entry and documents the behaviour; the code lives in modules
named for their job, shared with the PEFT tuner (``integrations/peft.py``), so an
``AdapterConfig`` puts the same adapters in the same places whether it goes through
``get_peft_model`` or ``add_adapters``:

- ``options.py``: the option fields (``AdapterFields``, ``AdapterOptions``), their checks, the
  adapter's dtype and initialisation, and ``new_adapter`` (options -> ``adapterfast.Adapter``);
- ``architectures.py``: the table of sites per architecture (``ARCHITECTURES``) and PEFT's
  target-name rules; ``sites.py``: the rule for architectures not in the table;
- ``site_forward.py``: how an adapter meets its site (mode, feature size) and the forward;
- ``hooks.py``: ``add_adapters``/``remove_adapters`` (forward hooks);
- ``saving.py``: ``save_adapters``/``load_adapters`` (safetensors).

Placements (``placement=``), each adapter being ``y = residual + s * up(act(down(x)))``, s = alpha / r:

- ``"pfeiffer"`` (default): one adapter per layer on the FFN output. In post-LN encoders (BERT,
  RoBERTa, DistilBERT) it acts on the output projection's result before the residual add and
  LayerNorm, as AdapterHub's ``seq_bn`` does; in pre-LN decoders (GPT-2, Llama, Mistral, Qwen2) on
  the MLP's output projection, before the residual add.
- ``"houlsby"``: the same plus one on the attention output projection.
- ``"parallel"`` (He et al. 2022): beside the whole FFN block, ``h = FFN(x) + s * f(x)`` with x the
  FFN input, computed by ``fused_adapter(x, ..., residual=FFN(x))``. BERT-style output blocks
  (``BertOutput(hidden_states, input_tensor)``, whose LayerNorm sits inside the block) get the
  same sum by adapting the block's residual input: ``input_tensor -> x + s * f(x)``.
  He et al. use s = 4 for parallel adapters: pass ``alpha = 4 * r``.

Default sites: ``ARCHITECTURES`` by ``model.config.model_type`` (overrides), else the rule in
``sites.py`` (each block's MLP output projection and attention output, found by shape), which
covers every decoder, encoder and sequence-classification architecture of PEFT's own test suite
(OPT, GPT-2, BLOOM, GPT-Neo, GPT-J, GPTBigCode, Llama, Mistral, Qwen2, Gemma3, BERT, RoBERTa,
DeBERTa, DeBERTa-v2). ``target_modules`` (a list of module-name suffixes, or one regular expression
matched against the full module name, as in PEFT) overrides both.

``init``: ``"zero"`` (default: up-projection zero, so the adapted model computes exactly what the
base model computes until the first update; down-projection as ``nn.Linear``), ``"bert"`` (both
weights normal(0, 0.02), biases zero) or ``"houlsby"`` (both weights truncated normal(0, 0.01),
biases zero: near-identity).

Without PEFT the adapters are attached by forward hooks: each adapted module keeps its type and
its parameter names and gets an ``adapterfast`` child (an ``adapterfast.Adapter``), so the base
model's state dict keys do not change. ``add_adapters`` freezes every base parameter except the
task head (``classifier``/``score`` for SEQ_CLS and TOKEN_CLS, ``qa_outputs`` for QUESTION_ANS, and
``modules_to_save``), and makes the input embeddings' output require grad so that reentrant
gradient checkpointing (``gradient_checkpointing_enable()``, transformers' default) still reaches
the adapters. Adapter weights are float32 when the model is float16/bfloat16 (as PEFT does by
default); the op takes fp32 weights with half-precision activations, so nothing needs casting.
"""
from __future__ import annotations

from .architectures import (ARCHITECTURES, Sites, default_target_modules, is_head, matches, model_type_of,
                            resolve_target_modules)
from .hooks import ATTACHED_NAME, adapted_modules, add_adapters, describe, remove_adapters
from .options import (HEAD_MODULES, INITS, PLACEMENTS, TASK_TYPES, AdapterFields, AdapterOptions, adapter_dtype,
                      adapter_scale, as_options, check_options, init_adapter_, new_adapter)
from .saving import SAFETENSORS_NAME, adapter_state_dict, load_adapters, save_adapters
from .site_forward import (OUTPUT, PARALLEL, PARALLEL_INPUT, adapt_inputs, adapt_output, base_device_dtype,
                           check_site, feature_size, linear_sizes, run_site, site_mode)

__all__ = [
    "ARCHITECTURES", "ATTACHED_NAME", "AdapterFields", "AdapterOptions", "HEAD_MODULES", "INITS", "OUTPUT",
    "PARALLEL", "PARALLEL_INPUT", "PLACEMENTS", "SAFETENSORS_NAME", "Sites", "TASK_TYPES", "adapt_inputs",
    "adapt_output", "adapted_modules", "add_adapters", "adapter_dtype", "adapter_scale", "adapter_state_dict",
    "as_options", "base_device_dtype", "check_options", "check_site", "default_target_modules", "describe",
    "feature_size", "init_adapter_", "is_head", "linear_sizes", "load_adapters", "matches", "model_type_of",
    "new_adapter", "remove_adapters", "resolve_target_modules", "run_site", "save_adapters", "site_mode",
]
