"""PEFT mixed-batch inference (``model(..., adapter_names=[...])``) on ``AdapterConfig`` models, run by the
grouped op: each sample must equal the same sample run alone with its own adapter (or none)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from adapterfast import AdapterConfig  # noqa: E402
from peft import get_peft_model  # noqa: E402
from helpers import VOCAB, tiny_bert, tiny_llama  # noqa: E402


def randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapterfast_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def one_by_one(model, x, names):
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(x[i:i + 1]).logits)
            else:
                model.set_adapter(name)
                rows.append(model(x[i:i + 1]).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("make,configs", [
    (tiny_llama, [dict(r=4), dict(r=6, alpha=12), dict(r=4, activation="gelu", bias=True)]),
    (tiny_bert, [dict(r=4, bias=True), dict(r=4, placement="houlsby", bias=True), dict(r=8, placement="parallel")]),
])
def test_mixed_batch_matches_each_adapter_alone(make, configs):
    model = get_peft_model(make(), AdapterConfig(**configs[0]), adapter_name="a0")
    for i, cfg in enumerate(configs[1:], 1):
        model.add_adapter(f"a{i}", AdapterConfig(**cfg))
    randomize(model)
    model.eval()
    names = ["a0", "a1", "__base__", "a2", "a1", "a0"]
    x = torch.randint(3, VOCAB, (len(names), 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
    want = one_by_one(model, x, names)
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)
    # the adapters really differ, so the check above can fail
    model.set_adapter("a0")
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, want, atol=1e-4)


def test_mixed_batch_errors():
    model = get_peft_model(tiny_llama(), AdapterConfig(r=4), adapter_name="a0")
    x = torch.randint(3, VOCAB, (2, 5))
    model.eval()
    with pytest.raises(ValueError, match="unknown adapters"):
        model(x, adapter_names=["a0", "nope"])
    with pytest.raises(ValueError, match="one adapter name per sample"):
        model(x, adapter_names=["a0"])
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        model(x, adapter_names=["a0", "a0"])
