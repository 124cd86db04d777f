"""adapterfast as a PEFT method: registration, config, named adapters, disabling, merging, unloading,
gradient checkpointing, save/load (also in a fresh process) and Trainer with mixed precision."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from adapterfast import AdapterConfig  # noqa: E402
from adapterfast.integrations import peft as af_peft  # noqa: E402
from peft import PeftConfig, PeftModel, TaskType, get_peft_model  # noqa: E402
from adapterfast import reference  # noqa: E402
from helpers import fp16_unsupported_reason, ids, rel_err, tiny_bert, tiny_llama  # noqa: E402
from hf_compat import checkpointing_argument, checkpointing_enable, is_checkpointing  # noqa: E402

def adapter_layers(model):
    return [m for m in model.modules() if isinstance(m, af_peft.AdapterfastLayer)]


def differs(a, b):
    return not torch.allclose(a, b, rtol=0, atol=1e-7)


def randomize_adapters(model, adapter_name="default", seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"adapterfast_up.{adapter_name}." in name:
                p.copy_(torch.randn(p.shape, generator=g))


# -- registration and config ---------------------------------------------------------------------

def test_registered_with_peft():
    from peft import mapping

    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["ADAPTERFAST"] is AdapterConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["ADAPTERFAST"] is af_peft.AdapterfastModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["ADAPTERFAST"] == "adapterfast_"
    af_peft.register()  # idempotent
    assert isinstance(AdapterConfig(), PeftConfig)
    assert AdapterConfig().peft_type.value == "ADAPTERFAST"


def test_config_fields_and_json_round_trip(tmp_path):
    config = AdapterConfig(task_type=TaskType.SEQ_CLS, r=16, alpha=32, dropout=0.1, activation="gelu", bias=True,
                           placement="houlsby", init="bert", target_modules=["dense"], modules_to_save=["pooler"])
    assert config.scale == 2.0 and AdapterConfig(r=8).scale == 1.0
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTERFAST" and saved["alpha"] == 32 and saved["bias"] is True
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is AdapterConfig
    for name in ("r", "alpha", "dropout", "activation", "bias", "placement", "init", "target_modules",
                 "modules_to_save", "task_type"):
        assert getattr(loaded, name) == getattr(config, name), name


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(r=0), ValueError, "r "),
    (dict(r=True), ValueError, "r "),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(bias="none"), TypeError, "bias"),
    (dict(placement="sideways"), ValueError, "placement"),
    (dict(init="ones"), ValueError, "init"),
    (dict(activation="softplus"), ValueError, "activation"),
    (dict(target_modules=3), TypeError, "target_modules"),
])
def test_config_rejects_bad_values(kwargs, error, words):
    with pytest.raises(error, match=words):
        AdapterConfig(**kwargs)


def test_unknown_architecture_needs_target_modules():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(model, AdapterConfig(r=4))
    model = get_peft_model(model, AdapterConfig(r=4, target_modules=["2"], init="bert"))
    randomize_adapters(model)
    x = torch.randn(3, 8)
    y = model(x)
    (layer,) = adapter_layers(model)
    with model.disable_adapter():
        h = model(x)
    a = layer.adapterfast_settings["default"]
    assert a.down.bias is None and a.up.bias is None  # the config's default
    want = reference.adapter(h.double(), a.down.weight.double(), a.up.weight.double(), activation=a.activation,
                             scale=a.scale)
    assert rel_err(y, want) < 1e-5  # the adapter runs on the output of "2", added to it


# -- named adapters, disabling, merging, unloading ------------------------------------------------

def test_two_named_adapters_set_and_disable():
    base = tiny_bert()
    x = ids()
    with torch.no_grad():
        base_logits = base(x).logits
    model = get_peft_model(base, AdapterConfig(task_type=TaskType.SEQ_CLS, r=8))
    model.add_adapter("other", AdapterConfig(task_type=TaskType.SEQ_CLS, r=4, placement="houlsby"))
    randomize_adapters(model, "default", seed=3)
    randomize_adapters(model, "other", seed=4)
    model.eval()
    with torch.no_grad():
        out_default = model(x).logits
        model.set_adapter("other")
        out_other = model(x).logits
        with model.disable_adapter():
            out_disabled = model(x).logits
        out_other_again = model(x).logits
    assert differs(out_default, base_logits) and differs(out_other, out_default)
    torch.testing.assert_close(out_disabled, base_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_other_again, out_other, rtol=0, atol=0)
    # only the active adapter trains
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable if "adapterfast" in n)
    assert any("adapterfast" in n for n in trainable)
    # houlsby puts "other" after attention too; "default" only after the FFN
    layers = adapter_layers(model)
    assert sum("default" in m.adapterfast_down for m in layers) == 2
    assert sum("other" in m.adapterfast_down for m in layers) == 4
    model.set_adapter("default")
    model.delete_adapter("other")
    assert all("other" not in m.adapterfast_down for m in adapter_layers(model))


def test_two_active_adapters_run_in_order():
    base = tiny_llama()
    x = ids()
    model = get_peft_model(base, AdapterConfig(r=4, init="bert"))
    model.add_adapter("b", AdapterConfig(r=4, init="bert"))
    model.base_model.set_adapter(["default", "b"])
    site = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(site, af_peft.AdapterfastLayer)
    h = torch.randn(2, 5, 64)
    with torch.no_grad():
        got = site(h)
        y = site.base_layer(h)
        for name in ("default", "b"):
            down, up = site.adapterfast_down[name], site.adapterfast_up[name]
            y = y + up(torch.relu(down(y)))
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(model(x).logits).all()


def test_generate_with_adapters():
    model = get_peft_model(tiny_llama(), AdapterConfig(task_type=TaskType.CAUSAL_LM, r=4, init="bert"))
    prompt = ids()
    out = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    greedy = prompt
    with torch.no_grad():
        for _ in range(3):  # the same greedy decoding without generate's KV cache
            greedy = torch.cat([greedy, model(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (2, 10) and torch.equal(out, greedy)


def test_merge_and_unload_is_a_clear_error_and_unload_works():
    base = tiny_bert()
    x = ids()
    with torch.no_grad():
        base_logits = base(x).logits
    model = get_peft_model(base, AdapterConfig(task_type=TaskType.SEQ_CLS, r=8, init="bert"))
    for call in (model.merge_and_unload, model.merge_adapter, model.base_model.merge_and_unload):
        with pytest.raises(ValueError, match="nonlinear"):
            call()
    with pytest.raises(ValueError, match="nonlinear"):
        adapter_layers(model)[0].merge()
    unloaded = model.unload()
    assert not adapter_layers(unloaded)
    assert not any("adapterfast" in n for n, _ in unloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(x).logits, base_logits, rtol=0, atol=1e-6)


# -- gradient checkpointing ------------------------------------------------------------------------

@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_gradient_checkpointing(make, use_reentrant):
    def grads(checkpointing: bool):
        model = get_peft_model(make(), AdapterConfig(r=8, init="bert", dropout=0.1, placement="houlsby"))
        if checkpointing:
            checkpointing_enable(model, use_reentrant=use_reentrant)
            assert is_checkpointing(model.base_model.model)
        model.train()
        torch.manual_seed(5)
        out = model(input_ids=ids()).logits
        out.float().pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if "adapterfast" in n}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, g in plain.items():
        assert checkpointed[name] is not None, f"no gradient reached {name}"
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)


# -- save / load -------------------------------------------------------------------------------------

def test_save_pretrained_holds_only_adapters_and_head(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(tiny_bert(), AdapterConfig(task_type=TaskType.SEQ_CLS, r=8, bias=True))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all("adapterfast_" in k or ".classifier." in k for k in keys), keys
    assert not any(".default." in k for k in keys)  # the adapter name is not part of the checkpoint
    assert any(k.endswith("adapterfast_down.bias") for k in keys)


def test_load_in_process_also_under_another_name(tmp_path):
    model = get_peft_model(tiny_bert(), AdapterConfig(task_type=TaskType.SEQ_CLS, r=8, init="bert"))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    model.eval()
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert isinstance(loaded.peft_config["default"], AdapterConfig)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)

    other = get_peft_model(tiny_bert(), AdapterConfig(task_type=TaskType.SEQ_CLS, r=8))
    other.load_adapter(str(tmp_path), adapter_name="saved")
    other.set_adapter("saved")
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, expected, rtol=0, atol=0)


_FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    import adapterfast                      # must be enough: PEFT is imported only afterwards
    assert "peft" not in sys.modules
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    assert type(model.peft_config["default"]).__name__ == "AdapterConfig"
    x = torch.load(sys.argv[3])
    with torch.no_grad():
        torch.save(model(x).logits, sys.argv[4])
""")


def test_from_pretrained_in_a_fresh_process(tmp_path):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, AdapterConfig(task_type=TaskType.SEQ_CLS, r=8, init="bert", placement="parallel"))
    model.eval()
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "adapters")
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / "base"), str(tmp_path / "adapters"),
                             str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


# -- Trainer and mixed precision ---------------------------------------------------------------------

class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.x = ids(seed=7, batch=n, length=8)
        self.y = (self.x == 5).any(1).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_mixed_precision(tmp_path, precision):
    if precision == "fp16" and fp16_unsupported_reason():
        pytest.skip(fp16_unsupported_reason())
    model = get_peft_model(tiny_bert(), AdapterConfig(task_type=TaskType.SEQ_CLS, r=8, dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=not torch.cuda.is_available(),
        **{checkpointing_argument(): True, precision: True})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n].to(p.device))]
    assert any("adapterfast_up" in n for n in changed), changed
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "adapterfast" in n)
