"""add_adapters / save_adapters / load_adapters / remove_adapters, and what each placement computes
(checked against the formulas, for both add_adapters and the PEFT tuner, which share the code)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import adapterfast  # noqa: E402
from adapterfast.integrations import hf  # noqa: E402
from helpers import ids, tiny_bert, tiny_llama  # noqa: E402
from hf_compat import checkpointing_enable  # noqa: E402

def adapt(model, path, **options):
    if path == "peft":
        pytest.importorskip("peft")
        from peft import get_peft_model

        return get_peft_model(model, adapterfast.AdapterConfig(**options), autocast_adapter_dtype=False)
    return adapterfast.add_adapters(model, **options)


def site_adapter(module, path):
    """(down, up) of the adapter at a site, for either path."""
    if path == "peft":
        return module.adapterfast_down["default"], module.adapterfast_up["default"]
    return module.adapterfast.down, module.adapterfast.up


def branch(x, down, up, scale):
    return scale * up(torch.nn.functional.gelu(down(x)))


# -- one definition of an adapter for both routes ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_routes_build_the_same_adapter_modules(dtype):
    pytest.importorskip("peft")
    options = dict(r=4, alpha=8, activation="gelu", init="houlsby", bias=True, dropout=0.1, placement="houlsby")
    peft_model = adapt(tiny_bert(dtype=dtype), "peft", **options)
    hf_model = adapterfast.add_adapters(tiny_bert(dtype=dtype), autocast_adapter_dtype=False, **options)
    sites = [n for n, m in hf_model.named_modules() if n in hf.adapted_modules(hf_model)]
    assert len(sites) == 4
    for name in sites:
        ours = hf_model.get_submodule(name).adapterfast
        layer = peft_model.base_model.model.get_submodule(name)
        theirs = layer.adapterfast_settings["default"]
        assert type(ours) is type(theirs) and isinstance(theirs, adapterfast.Adapter)
        assert theirs.down is layer.adapterfast_down["default"] and theirs.up is layer.adapterfast_up["default"]
        assert (ours.activation, ours.scale, ours.dropout, ours.mode) == (theirs.activation, theirs.scale,
                                                                          theirs.dropout, theirs.mode)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert a.dtype == dtype and torch.equal(a, b)   # same init drawn in fp32 whatever the dtype
    assert not any("adapterfast_settings" in k for k in peft_model.state_dict())
    peft_model.train()
    assert all(a.training for m in peft_model.modules() for a in getattr(m, "adapterfast_settings", {}).values())
    peft_model.eval()
    assert not any(a.training for m in peft_model.modules() for a in getattr(m, "adapterfast_settings", {}).values())


def test_option_fields_are_declared_once():
    pytest.importorskip("peft")
    import dataclasses

    fields = [f.name for f in dataclasses.fields(hf.AdapterFields)]
    assert len(fields) == 9
    for cls in (hf.AdapterOptions, adapterfast.AdapterConfig):
        assert issubclass(cls, hf.AdapterFields)
        assert [f.name for f in dataclasses.fields(cls) if f.name in fields] == fields
        assert not any(name in vars(cls).get("__annotations__", {}) for name in fields)


# -- what each placement computes -----------------------------------------------------------------

@pytest.mark.parametrize("path", ["hf", "peft"])
def test_pfeiffer_on_bert_acts_on_the_output_dense(path):
    model = adapt(tiny_bert(dtype=torch.float64), path, r=4, alpha=8, activation="gelu", init="bert", bias=True)
    layer = (model.base_model.model if path == "peft" else model).bert.encoder.layer[0]
    dense = layer.output.dense
    down, up = site_adapter(dense, path)
    h = torch.randn(2, 5, 64, dtype=torch.float64)
    base = dense.base_layer if path == "peft" else torch.nn.Linear(64, 32).double()
    if path == "hf":
        base.load_state_dict({"weight": dense.weight, "bias": dense.bias})
    y = base(h)
    with torch.no_grad():
        torch.testing.assert_close(dense(h), y + branch(y, down, up, 2.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["hf", "peft"])
def test_parallel_on_llama_is_beside_the_mlp(path):
    model = adapt(tiny_llama(dtype=torch.float64), path, r=4, alpha=16, activation="gelu", init="bert",
                  placement="parallel")
    mlp = (model.base_model.model if path == "peft" else model).model.layers[1].mlp
    down, up = site_adapter(mlp, path)
    plain = mlp.base_layer if path == "peft" else None
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        if plain is None:
            expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        else:
            expected = plain(x)
        torch.testing.assert_close(mlp(x), expected + branch(x, down, up, 4.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["hf", "peft"])
def test_parallel_on_bert_adds_beside_the_ffn_before_the_layernorm(path):
    model = adapt(tiny_bert(dtype=torch.float64), path, r=4, alpha=16, activation="gelu", init="bert",
                  placement="parallel")
    output = (model.base_model.model if path == "peft" else model).bert.encoder.layer[0].output
    down, up = site_adapter(output, path)
    block = output.base_layer if path == "peft" else output
    h, x = torch.randn(2, 5, 64, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = block.LayerNorm(block.dense(h) + x + branch(x, down, up, 4.0))
        torch.testing.assert_close(output(h, x), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(output(h, input_tensor=x), expected, rtol=1e-10, atol=1e-12)


# -- add_adapters ----------------------------------------------------------------------------------

def test_add_adapters_keeps_the_base_state_dict_keys_and_freezes_the_base():
    model = tiny_bert()
    keys = set(model.state_dict())
    model = adapterfast.add_adapters(model, task_type="SEQ_CLS", r=8, placement="houlsby")
    assert isinstance(model.bert.encoder.layer[0].output.dense, torch.nn.Linear)
    new = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict()) and new and all(".adapterfast." in k for k in new)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == new | {"classifier.weight", "classifier.bias"}
    assert hf.describe(model)["sites"] == 4


def test_add_adapters_options_and_errors():
    model = adapterfast.add_adapters(tiny_llama(), hf.AdapterOptions(r=8), r=4, dropout=0.1)
    assert model.adapterfast_config.r == 4 and model.adapterfast_config.dropout == 0.1
    assert model.model.layers[0].mlp.down_proj.adapterfast.down.out_features == 4
    with pytest.raises(ValueError, match="already has adapterfast adapters"):
        adapterfast.add_adapters(model, r=4)
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="from PEFT"):
        adapterfast.add_adapters(peft.get_peft_model(tiny_llama(), adapterfast.AdapterConfig(r=4)), r=4)
    with pytest.raises(TypeError, match="unknown adapter option"):
        adapterfast.add_adapters(tiny_llama(), rank=4)
    with pytest.raises(ValueError, match="no default adapter sites"):
        adapterfast.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="matched no module"):
        adapterfast.add_adapters(tiny_llama(), target_modules=["nothing_here"])
    plain = adapterfast.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU()),
                                     target_modules=["0"], r=2, init="houlsby")
    assert plain[0].adapterfast.down.in_features == 6 and plain(torch.randn(3, 4)).shape == (3, 6)


def test_remove_adapters_restores_the_base():
    model = tiny_llama()
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    keys = set(model.state_dict())
    adapterfast.add_adapters(model, r=4, init="bert")
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, expected)
    adapterfast.remove_adapters(model)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("as_file", [False, True])
def test_save_and_load_adapters(tmp_path, as_file):
    from safetensors.torch import load_file

    model = adapterfast.add_adapters(tiny_bert(), task_type="SEQ_CLS", r=8, alpha=4, init="bert", bias=True,
                                     placement="parallel")
    with torch.no_grad():
        model.classifier.weight.mul_(5.0)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    target = tmp_path / ("a.safetensors" if as_file else "dir")
    written = adapterfast.save_adapters(model, target)
    assert os.path.exists(written)
    keys = set(load_file(written))
    assert keys and all(".adapterfast." in k or k.startswith("classifier.") for k in keys)

    fresh = adapterfast.load_adapters(tiny_bert(), target)  # injects from the saved options, then loads
    assert fresh.adapterfast_config == model.adapterfast_config
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, expected, rtol=0, atol=0)

    wrong = adapterfast.add_adapters(tiny_bert(), task_type="SEQ_CLS", r=8, bias=False, placement="parallel")
    with pytest.raises(ValueError, match="do not fit"):
        adapterfast.load_adapters(wrong, target)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_add_adapters_with_gradient_checkpointing(use_reentrant):
    def grads(checkpointing):
        model = adapterfast.add_adapters(tiny_llama(), r=8, init="bert", dropout=0.1, placement="houlsby")
        if checkpointing:
            checkpointing_enable(model, use_reentrant=use_reentrant)
        model.train()
        torch.manual_seed(5)
        model(input_ids=ids()).logits.pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, g in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)


def test_add_adapters_with_trainer_bf16(tmp_path):
    model = adapterfast.add_adapters(tiny_bert(), task_type="SEQ_CLS", r=8)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": ids(seed=i, batch=1)[0], "labels": torch.tensor(i % 2)}

    before = model.bert.encoder.layer[0].output.dense.adapterfast.up.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, bf16=True, use_cpu=not torch.cuda.is_available(),
                                          report_to=[], save_strategy="no", logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=Data()).train()
    after = model.bert.encoder.layer[0].output.dense.adapterfast.up.weight
    assert not torch.equal(before, after.detach().cpu()) and after.dtype == torch.float32


_WITHOUT_HF = textwrap.dedent("""
    import sys
    sys.modules["peft"] = None          # as if PEFT and transformers were not installed
    sys.modules["transformers"] = None
    import torch, adapterfast
    assert adapterfast.AdapterConfig is adapterfast.AdapterOptions
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    adapterfast.add_adapters(model, adapterfast.AdapterConfig(r=4, target_modules=["0", "2"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.adapterfast.down.weight", "0.adapterfast.up.weight", "2.adapterfast.down.weight", "2.adapterfast.up.weight"]
    print(model(torch.randn(2, 8)).shape)
""")


def test_import_is_light_and_add_adapters_works_without_transformers_or_peft():
    light = subprocess.run([sys.executable, "-c", "import sys, adapterfast; "
                            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=300)
    assert light.returncode == 0 and light.stdout.strip() == "[]", light.stderr[-2000:]
    result = subprocess.run([sys.executable, "-c", _WITHOUT_HF], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([2, 8])" in result.stdout
