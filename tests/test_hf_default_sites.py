"""Default adapter sites (``integrations/sites.py``) for every architecture of PEFT's own decoder,
feature-extraction and sequence-classification tests, on tiny random models built from configs;
and the PEFT layer's ``in_features``/``out_features``/``repr``, the parallel-site check, the
``adapter_names=`` refusal in training and the load hint saved in ``adapter_config.json``."""
import json
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402

from adapterfast import AdapterConfig  # noqa: E402
from adapterfast.integrations import hf, sites  # noqa: E402
from adapterfast.integrations.peft import AdapterfastLayer  # noqa: E402
from helpers import rel_err  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)
# model_type: (config keywords, MLP output projection, attention output, MLP block or None) in block 0.
ARCHS = {
    "opt": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=128,
                 word_embed_proj_dim=32), "model.decoder.layers.0.fc2", "model.decoder.layers.0.self_attn.out_proj",
            None),
    "gpt2": (dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128), "transformer.h.0.mlp.c_proj",
             "transformer.h.0.attn.c_proj", "transformer.h.0.mlp"),
    "bloom": (dict(hidden_size=32, n_layer=2, n_head=2, vocab_size=128), "transformer.h.0.mlp.dense_4h_to_h",
              "transformer.h.0.self_attention.dense", "transformer.h.0.mlp"),
    "gpt_neo": (dict(hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
                     vocab_size=128), "transformer.h.0.mlp.c_proj", "transformer.h.0.attn.attention.out_proj",
                "transformer.h.0.mlp"),
    "gptj": (dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=4, vocab_size=128), "transformer.h.0.mlp.fc_out",
             "transformer.h.0.attn.out_proj", "transformer.h.0.mlp"),
    "gpt_bigcode": (dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128), "transformer.h.0.mlp.c_proj",
                    "transformer.h.0.attn.c_proj", "transformer.h.0.mlp"),
    "llama": (dict(SMALL, num_key_value_heads=2), "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj",
              "model.layers.0.mlp"),
    "mistral": (dict(SMALL, num_key_value_heads=2), "model.layers.0.mlp.down_proj",
                "model.layers.0.self_attn.o_proj", "model.layers.0.mlp"),
    "qwen2": (dict(SMALL, num_key_value_heads=2), "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj",
              "model.layers.0.mlp"),
    "gemma3_text": (dict(SMALL, num_key_value_heads=2, head_dim=16), "model.layers.0.mlp.down_proj",
                    "model.layers.0.self_attn.o_proj", "model.layers.0.mlp"),
    "bert": (SMALL, "bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.attention.output.dense",
             "bert.encoder.layer.0.output"),
    "roberta": (SMALL, "roberta.encoder.layer.0.output.dense", "roberta.encoder.layer.0.attention.output.dense",
                "roberta.encoder.layer.0.output"),
    "deberta": (SMALL, "deberta.encoder.layer.0.output.dense", "deberta.encoder.layer.0.attention.output.dense",
                "deberta.encoder.layer.0.output"),
    "deberta-v2": (SMALL, "deberta.encoder.layer.0.output.dense", "deberta.encoder.layer.0.attention.output.dense",
                   "deberta.encoder.layer.0.output"),
}
ENCODERS = ("bert", "roberta", "deberta", "deberta-v2")


def tiny(model_type):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **ARCHS[model_type][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_type in ENCODERS:
            config.num_labels = 3
            return transformers.AutoModelForSequenceClassification.from_config(config).eval(), "SEQ_CLS"
        return transformers.AutoModelForCausalLM.from_config(config).eval(), "CAUSAL_LM"


def inputs():
    return {"input_ids": torch.randint(3, 128, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, AdapterfastLayer))


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_rule_finds_the_blocks_sites(model_type):
    model, _ = tiny(model_type)
    _, ffn_output, attention_output, ffn = ARCHS[model_type]
    found = sites.find_sites(model)
    for key, expected in (("ffn_output", ffn_output), ("attention_output", attention_output), ("ffn", ffn)):
        names = [n for n, _ in model.named_modules() if found[key] and re.fullmatch(found[key], n)]
        assert names == ([expected, expected.replace(".0.", ".1.", 1)] if expected else []), key


@pytest.mark.parametrize("model_type", sorted(ARCHS))
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_default_sites_with_peft(model_type, placement):
    model, task = tiny(model_type)
    _, ffn_output, attention_output, ffn = ARCHS[model_type]
    x = inputs()
    with torch.no_grad():
        base = model(**x).logits.double()
    config = AdapterConfig(task_type=task, r=4, init="bert", placement=placement)
    if placement == "parallel" and ffn is None:
        with pytest.raises(ValueError, match="no default adapter sites for placement 'parallel'.*inlined"):
            get_peft_model(model, config)
        return
    peft_model = get_peft_model(model, config)
    prefix = "base_model.model."
    expected = {"pfeiffer": [ffn_output], "houlsby": [ffn_output, attention_output], "parallel": [ffn]}[placement]
    expected = sorted(prefix + e.replace(".0.", f".{i}.", 1) for e in expected for i in (0, 1))
    assert adapted(peft_model) == expected
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "adapterfast_" in name:
                p.normal_(0, 0.5)
    out = peft_model(**x).logits.double()
    assert torch.isfinite(out).all()
    assert rel_err(out, base) > 1e-3  # the adapters are in the forward
    with peft_model.disable_adapter(), torch.no_grad():
        assert torch.equal(peft_model(**x).logits.double(), base)


@pytest.mark.parametrize("model_type", ["opt", "gptj", "gemma3_text", "deberta"])
def test_default_sites_without_peft(model_type):
    model, task = tiny(model_type)
    hf.add_adapters(model, r=4, task_type=task, placement="houlsby")
    assert len(hf.adapted_modules(model)) == 4


def test_table_entries_agree_with_the_rule():
    for model_type in ("llama", "mistral", "qwen2", "gpt2", "bert", "roberta"):
        model, _ = tiny(model_type)
        found = sites.find_sites(model)
        table = hf.ARCHITECTURES[model_type]
        for key in ("ffn_output", "attention_output", "ffn"):
            by_table = [n for n, _ in model.named_modules() if re.fullmatch(getattr(table, key), n)]
            by_rule = [n for n, _ in model.named_modules() if re.fullmatch(found[key], n)]
            assert by_table == by_rule, (model_type, key)


def test_layer_features_and_repr():
    model, _ = tiny("gptj")
    peft_model = get_peft_model(model, AdapterConfig(task_type="CAUSAL_LM", r=4, alpha=8, activation="gelu"))
    layer = peft_model.base_model.model.transformer.h[0].mlp.fc_out
    assert (layer.in_features, layer.out_features) == (128, 32)
    text = repr(layer)
    for part in ("r=4", "activation=gelu", "placement=pfeiffer", "scale=2"):
        assert part in text
    parallel = get_peft_model(tiny("gptj")[0], AdapterConfig(task_type="CAUSAL_LM", r=4, placement="parallel"))
    block = parallel.base_model.model.transformer.h[0].mlp
    assert (block.in_features, block.out_features) == (32, 32)


def test_parallel_on_a_resizing_layer_is_refused_at_creation():
    model, _ = tiny("gptj")
    config = AdapterConfig(task_type="CAUSAL_LM", r=4, placement="parallel", target_modules=["fc_out"])
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.fc_out .*128 -> 32.*input and output sizes"):
        get_peft_model(model, config)
    with pytest.raises(ValueError, match=r"fc_out .*128 -> 32"):
        hf.add_adapters(tiny("gptj")[0], r=4, placement="parallel", target_modules=["fc_out"])


def test_mixed_batch_adapter_names_refused_in_training():
    model, _ = tiny("llama")
    peft_model = get_peft_model(model, AdapterConfig(task_type="CAUSAL_LM", r=4, init="bert"))
    peft_model.train()
    with pytest.raises(ValueError, match="adapter_names=.*eval mode"):
        peft_model(**inputs(), adapter_names=["default", "default"])


def test_saved_config_names_the_package(tmp_path):
    model, _ = tiny("llama")
    get_peft_model(model, AdapterConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTERFAST"
    assert "import adapterfast" in saved["requires"] and "KeyError: 'ADAPTERFAST'" in saved["requires"]


def test_init_weights_false_is_a_non_identity_init():
    assert AdapterConfig(init_weights=False).init == "bert"
    assert AdapterConfig(init_weights=False, init="houlsby").init == "houlsby"
    assert AdapterConfig().init == "zero"
    with pytest.raises(TypeError, match="init_weights"):
        AdapterConfig(init_weights="no")
