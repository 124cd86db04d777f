"""Every architecture with default adapter sites, through PEFT and through add_adapters.

Small random models (hidden 32, 2 layers, vocab 100), never downloaded. For each architecture,
path (``peft``: get_peft_model(AdapterConfig); ``hf``: add_adapters) and placement: the expected
sites get adapters, only adapters and the task head train, the adapted model equals the base at
init, gradients reach every adapter, one optimizer step changes the output, the reference and the
default backend agree, and a bf16 model runs.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import adapterfast  # noqa: E402
from adapterfast.integrations import hf  # noqa: E402
from helpers import rel_err  # noqa: E402

VOCAB = 100
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, max_position_embeddings=64)

# model_type -> (config class, model class, config kwargs, task type)
ARCHS = {
    "bert": ("BertConfig", "BertForSequenceClassification", dict(_ENCODER, max_position_embeddings=64), "SEQ_CLS"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                dict(_ENCODER, max_position_embeddings=66, pad_token_id=1), "SEQ_CLS"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification",
                    dict(_ENCODER, max_position_embeddings=66, pad_token_id=1), "SEQ_CLS"),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification",
                dict(_ENCODER, embedding_size=32, max_position_embeddings=64), "SEQ_CLS"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0,
                        seq_classif_dropout=0.0, attention_dropout=0.0, max_position_embeddings=64), "SEQ_CLS"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0), "CAUSAL_LM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER, "CAUSAL_LM"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=None), "CAUSAL_LM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER, "CAUSAL_LM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=16), "CAUSAL_LM"),
}
REQUIRED = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2")
HEADS = ("classifier", "score")
SITES_PER_LAYER = {"pfeiffer": 1, "houlsby": 2, "parallel": 1}


def tiny_model(arch: str, dtype=torch.float32):
    config_cls, model_cls, kwargs, task = ARCHS[arch]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**kwargs)
    if hasattr(config, "num_labels") and task == "SEQ_CLS":
        config.num_labels = 2
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(dtype)
    return model.eval(), task


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def adapt(model, path: str, **options):
    if path == "peft":
        from peft import get_peft_model

        return get_peft_model(model, adapterfast.AdapterConfig(**options))
    return adapterfast.add_adapters(model, hf.AdapterOptions(**options))


def logits(model, inputs):
    return model(**inputs).logits


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if "adapterfast" in n}


def is_part(name: str, part: str) -> bool:
    """Whether a parameter name belongs to an adapter's ``down`` or ``up`` projection (either path)."""
    return f"adapterfast_{part}." in name or f"adapterfast.{part}." in name


def test_every_architecture_has_default_sites():
    assert set(ARCHS) == set(hf.ARCHITECTURES), "test every architecture in the table, and only those"
    assert set(REQUIRED) <= set(ARCHS)


@pytest.mark.parametrize("placement", hf.PLACEMENTS)
@pytest.mark.parametrize("path", ["peft", "hf"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sites_trainable_and_identity_at_init(arch, path, placement):
    model, task = tiny_model(arch)
    inputs = batch()
    with torch.no_grad():
        expected = logits(model, inputs)
    model = adapt(model, path, task_type=task, r=8, alpha=16, placement=placement)
    model.eval()
    # where: one adapter per layer (two for houlsby)
    params = adapter_params(model)
    downs = [n for n in params if is_part(n, "down") and n.endswith("weight")]
    assert len(downs) == 2 * SITES_PER_LAYER[placement], downs
    # what trains: the adapters, and the head for encoders (SEQ_CLS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("adapterfast" in n or any(h in n for h in HEADS) for n in trainable), trainable
    assert set(params) <= set(trainable)
    if task == "SEQ_CLS":
        assert any(any(h in n for h in HEADS) for n in trainable)
    # init="zero": the adapted model is the base model
    with torch.no_grad():
        got = logits(model, inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # gradients reach every adapter (the up-projections at zero init)
    model.train()
    logits(model, inputs).float().pow(2).mean().backward()
    for name, p in params.items():
        if is_part(name, "up") and name.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def _step_and_grads(model, inputs):
    model.train()
    out = logits(model, inputs)
    loss = out.float().pow(2).mean() + out.float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in adapter_params(model).items()}
    return out.detach(), grads


@pytest.mark.parametrize("path", ["peft", "hf"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_step_changes_output_and_backends_agree(arch, path):
    model, task = tiny_model(arch)
    model = adapt(model, path, task_type=task, r=8, alpha=8, placement="houlsby", init="bert", bias=True)
    inputs = batch()
    twin = copy.deepcopy(model)
    with adapterfast.use_backend("reference"):
        ref_out, ref_grads = _step_and_grads(twin, inputs)
    out, grads = _step_and_grads(model, inputs)
    assert rel_err(out, ref_out) < 1e-5
    assert set(grads) == set(ref_grads) and grads
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name
    model.eval()
    with torch.no_grad():
        before = logits(model, inputs)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        after = logits(model, inputs)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("path", ["peft", "hf"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_model_runs(arch, path):
    model, task = tiny_model(arch, torch.bfloat16)
    inputs = batch()
    with torch.no_grad():
        expected = logits(model, inputs)
    model = adapt(model, path, task_type=task, r=8, placement="houlsby")
    # fp32 adapter weights (PEFT's default and add_adapters'), bf16 activations, no casting by the user
    assert {p.dtype for p in adapter_params(model).values()} == {torch.float32}
    model.eval()
    with torch.no_grad():
        got = logits(model, inputs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    model.train()
    logits(model, inputs).float().pow(2).mean().backward()
    grads = [p.grad for n, p in adapter_params(model).items() if is_part(n, "up")]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
