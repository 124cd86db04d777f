"""AdapterHub ``adapters`` models on the fused op: same outputs, gradients and training as the library.

Tiny random BERT and GPT-2 models (no downloads). Adapter parameters are re-drawn non-zero
(the presets start near zero, which would hide errors). Every comparison runs the same model
with the library's code (fp32, and fp64 as the yardstick) and after ``accelerate``, under the
default backend and the reference (and the Triton kernels, in the interpreter or on a GPU, as a
slow test). A counting spy on the op proves which path ran.

(Past 400 lines on purpose: every test here uses the tiny models, the spy and the library comparison
defined at the top; the compositions that run on the grouped op are in test_adapterhub_grouped.py.)
"""
import copy
import logging
import os

import pytest
import torch

adapters = pytest.importorskip("adapters")

from adapters import BnConfig, SeqBnConfig  # noqa: E402
from adapters.composition import Average, BatchSplit, Fuse, Parallel, Stack  # noqa: E402
from adapters.methods.modeling import Adapter as LibAdapter  # noqa: E402
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model  # noqa: E402

import adapterfast  # noqa: E402
from adapterfast.integrations import adapterhub as ah  # noqa: E402
from helpers import rel_err  # noqa: E402

D, VOCAB, BATCH, SEQ = 32, 64, 2, 5
BACKENDS = ["auto", "reference"]
CONFIGS = {
    "seq_bn": "seq_bn[reduction_factor=4]",
    "double_seq_bn": "double_seq_bn[reduction_factor=4]",
    "par_bn": "par_bn",
    "scaled_par_bn": "scaled_par_bn",
    # per-channel / learned scaling, other activations, residual after the original LN, adapter residual before
    "seq_channel": BnConfig(mh_adapter=True, output_adapter=True, reduction_factor=4, non_linearity="gelu_new",
                            scaling="channel", original_ln_before=True, residual_before_ln=False),
    "seq_learned": BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=4, non_linearity="tanh",
                            scaling="learned", original_ln_before=True, adapter_residual_before_ln=True),
}
# adapter modules in the two-layer models (one per layer and location)
EXPECTED_MODULES = {"seq_bn": 2, "double_seq_bn": 4, "par_bn": 2, "scaled_par_bn": 2,
                    "seq_channel": 4, "seq_learned": 2}


def tiny_model(kind: str, dropout: float = 0.0):
    if kind == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=16,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        model = BertModel(config)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=16,
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        model = GPT2Model(config)
    adapters.init(model)
    return model


def randomize(model, std: float = 0.1):
    """Non-zero adapter parameters: weights and biases ~ N(0, std), scaling parameters ~ N(1, 0.5)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                if name.endswith("scaling"):
                    p.copy_(1.0 + 0.5 * torch.randn_like(p))
                else:
                    p.copy_(std * torch.randn_like(p))


@pytest.fixture
def calls(monkeypatch):
    """Counts the adapter steps that ran on the fused op."""
    count = [0]
    original = ah.fused_adapter

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(ah, "fused_adapter", counting)
    return count


def rel(a, b):
    """``rel_err`` with the denominator bounded for gradients that are zero up to rounding
    (attention key biases: softmax is shift-invariant)."""
    return rel_err(a, b, floor=1e-3)


def forward_backward(model, embeds, weight):
    """Output and every gradient (parameters and input) for ``sum(out * weight)``."""
    model.zero_grad(set_to_none=True)
    x = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=x).last_hidden_state
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<inputs_embeds>"] = x.grad.clone()
    return out.detach(), grads


def assert_same(got, want, exact=None, tol=1e-5):
    """``got`` (accelerated, fp32) agrees with ``want`` (the library, fp32) for the output and every gradient.

    With ``exact`` (the library in float64), each tensor's error against it must be within ``tol`` or,
    for sums that cancel (the gradient of a learned scalar scaling), no more than 4x the library's own
    fp32 error; without it, the two fp32 results must agree within ``tol``.
    """
    for name in ["<output>"] + sorted(want[1]):
        a, b = (got[0], want[0]) if name == "<output>" else (got[1].get(name), want[1][name])
        assert a is not None, f"no gradient for {name}"
        assert torch.isfinite(a).all(), name
        if exact is None:
            assert rel(a, b) < tol, (name, rel(a, b))
        else:
            e = exact[0] if name == "<output>" else exact[1][name]
            assert rel(a, e) <= max(tol, 4 * rel(b, e)), (name, rel(a, e), rel(b, e))
    assert got[1].keys() == want[1].keys()


def with_adapter(config, kind: str = "bert", std: float = 0.1):
    """A tiny model of ``kind`` with one active adapter "a" of ``config``, its weights randomized."""
    model = tiny_model(kind)
    model.add_adapter("a", config=config)
    model.set_active_adapters("a")
    randomize(model, std)
    return model


def matches_library(model, embeds, weight, backend, tol=1e-5, calls=None) -> int:
    """Output and gradients with the library's code (fp64 and fp32), then accelerated: they must agree.
    Returns what ``accelerate`` counted; with ``calls``, checks that the library runs made no fused call."""
    exact = forward_backward(model.double(), embeds.double(), weight.double())
    want = forward_backward(model.float(), embeds, weight)
    if calls is not None:
        assert calls[0] == 0
    fused = ah.accelerate(model)
    with adapterfast.use_backend(backend):
        got = forward_backward(model, embeds, weight)
    assert_same(got, want, exact, tol=tol)
    return fused


def compare(model, n_fused, calls, backend, device="cpu", tol=1e-5):
    """``matches_library`` on random inputs, with ``n_fused`` adapter modules accelerated."""
    embeds, weight = torch.randn(BATCH, SEQ, D, device=device), torch.randn(BATCH, SEQ, D, device=device)
    assert matches_library(model, embeds, weight, backend, tol, calls) == n_fused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", list(CONFIGS))
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_presets_match_library(kind, preset, backend, calls):
    model = with_adapter(CONFIGS[preset], kind)
    compare(model, EXPECTED_MODULES[preset], calls, backend)
    assert calls[0] == EXPECTED_MODULES[preset]  # every adapter module ran fused, once


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["double_seq_bn", "scaled_par_bn", "seq_channel"])
def test_triton_backend_matches_library(preset, calls):
    """The Triton kernels: on CUDA when there is a GPU (tf32 dots: looser tolerance), else in
    Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest)."""
    cuda = torch.cuda.is_available()
    if not (cuda or os.environ.get("TRITON_INTERPRET") == "1") or not adapterfast.backends()["triton"].available:
        pytest.skip(f"triton backend unavailable: {adapterfast.backends()['triton'].reason}")
    device = "cuda" if cuda else "cpu"
    model = with_adapter(CONFIGS[preset]).to(device)
    compare(model, EXPECTED_MODULES[preset], calls, "triton", device=device, tol=5e-3 if cuda else 1e-5)
    assert calls[0] == EXPECTED_MODULES[preset]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["double_seq_bn", "scaled_par_bn"])
def test_training_gives_the_same_losses(preset, backend, calls):
    """A few AdamW steps from one seed, with the model's own dropout on: same losses and weights."""
    def train(accelerated):
        torch.manual_seed(1)
        model = adapters.BertAdapterModel(BertConfig(
            vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
        model.add_adapter("a", config=CONFIGS[preset])
        model.add_classification_head("a", num_labels=3)
        model.train_adapter("a")
        randomize(model)
        if accelerated:
            ah.accelerate(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids, labels = torch.randint(1, VOCAB, (4, SEQ)), torch.randint(0, 3, (4,))
        losses = []
        with adapterfast.use_backend(backend):
            for _ in range(4):
                loss = model(input_ids=ids, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return losses, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    want_losses, want_params = train(False)
    assert calls[0] == 0
    losses, params = train(True)
    assert calls[0] == 4 * EXPECTED_MODULES[preset]
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert len(set(losses)) > 1  # it did train
    for name in want_params:
        assert rel(params[name], want_params[name]) < 1e-4, name


@pytest.mark.parametrize("preset", ["seq_bn", "par_bn"])
def test_adapter_dropout_keeps_the_library_semantics(preset, calls):
    """Dropout acts on the scaled branch only: each element of it is kept (scaled by 1/(1-p)) or dropped."""
    p = 0.5
    model = with_adapter(f"{preset}[dropout={p}]", "gpt2", std=0.3)
    layer = model.h[0].output_adapters
    adapter = layer.adapters["a"]
    hidden, residual = torch.randn(BATCH, SEQ, D), torch.randn(BATCH, SEQ, D)
    x = hidden + residual if preset == "seq_bn" else residual  # what pre_forward hands the adapter (GPT-2: no LN)
    with torch.no_grad():
        branch = adapter.scaling * adapter.adapter_up(adapter.adapter_down(x))
        model.eval()
        library_eval = layer(hidden, residual, None)
        ah.accelerate(model)
        fused_eval = layer(hidden, residual, None)
        model.train()
        fused_train = layer(hidden, residual, None)
    assert calls[0] == 2
    # atol 1e-5: outputs of size ~1 summed in another order than the library's GEMMs (a 10-row call
    # takes dot products in 16 lanes) differ by a few ulps; both are within ~7e-6 of float64 here.
    torch.testing.assert_close(fused_eval, library_eval, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(library_eval - hidden - residual, branch, rtol=1e-5, atol=1e-5)
    delta = fused_train - hidden - residual
    dropped = delta.abs() < 1e-5
    kept = (delta - branch / (1 - p)).abs() < 1e-4
    assert bool((dropped | kept).all())
    assert 0.3 < kept.float().mean().item() < 0.7


FALLBACKS = {
    "ln_before": ("seq_bn[reduction_factor=4,ln_before=True]", "ln_before"),
    "ln_after": ("seq_bn[reduction_factor=4,ln_after=True]", "ln_after"),
    "gating": ("seq_bn[reduction_factor=4,use_gating=True]", "gating"),
    "compacter": ("compacter[reduction_factor=4]", "PHM/Compacter"),
    "mish": (SeqBnConfig(reduction_factor=4, non_linearity="mish"), "MishActivation"),
    "relu6": (SeqBnConfig(reduction_factor=4, non_linearity="relu6"), "ReLU6"),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_unfusable_configs_fall_back_and_still_match(name, calls, caplog):
    config, reason = FALLBACKS[name]
    model = with_adapter(config)
    with caplog.at_level(logging.INFO, logger="adapterfast"):
        compare(model, 0, calls, "auto")
        forward_backward(model, torch.randn(BATCH, SEQ, D), torch.randn(BATCH, SEQ, D))
    assert calls[0] == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "stays on" in r.getMessage()]
    assert len(said) == 1 and reason in said[0], said  # once, at accelerate, with the reason; never per call


def test_mixed_stack_runs_what_it_can(calls, caplog):
    """A fusable and an unfusable adapter stacked in one layer: one runs fused, both match the library."""
    model = tiny_model("bert")
    model.add_adapter("plain", config="seq_bn[reduction_factor=4]")
    model.add_adapter("gated", config="seq_bn[reduction_factor=4,use_gating=True]")
    model.set_active_adapters(Stack("plain", "gated"))
    randomize(model)
    for backend in BACKENDS:
        ah.restore(model)
        calls[0] = 0
        compare(model, 2, calls, backend)
        assert calls[0] == 2


COMPOSITIONS = {
    "stack_seq": (["seq_bn[reduction_factor=4]"] * 2, lambda: Stack("a0", "a1"), 4),
    "stack_par": (["par_bn", "par_bn"], lambda: Stack("a0", "a1"), 4),
    "average": (["par_bn", "seq_bn[reduction_factor=4]"], lambda: Average("a0", "a1"), 4),
    "batch_split": (["seq_bn[reduction_factor=4]", "scaled_par_bn"],
                    lambda: BatchSplit("a0", "a1", batch_sizes=[1, 1]), 4),
    # (the library itself cannot run a ParallelAdapter inside Parallel: its post_forward adds an unreplicated input)
    "parallel": (["seq_bn[reduction_factor=4]", "seq_bn[reduction_factor=4,non_linearity='gelu']"],
                 lambda: Parallel("a0", "a1"), 4),
    "fuse": (["seq_bn[reduction_factor=4]"] * 2, lambda: Fuse("a0", "a1"), 0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_compositions_match_library(name, backend, calls):
    configs, setup, n_calls = COMPOSITIONS[name]
    model = tiny_model("bert")
    for i, config in enumerate(configs):
        model.add_adapter(f"a{i}", config=config)
    if name == "fuse":
        model.add_adapter_fusion(Fuse("a0", "a1"))
    model.set_active_adapters(setup())
    randomize(model)
    embeds, weight = torch.randn(BATCH, SEQ, D), torch.randn(BATCH, SEQ, D)
    if name == "parallel":  # the model replicates the batch per parallel channel
        weight = torch.randn(2 * BATCH, SEQ, D)
    matches_library(model, embeds, weight, backend)
    assert calls[0] == n_calls


def test_save_load_round_trip_and_adapters_added_after_accelerate(tmp_path, calls):
    def build():
        torch.manual_seed(3)
        model = adapters.BertAdapterModel(BertConfig(
            vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        assert ah.accelerate(model) == 0  # no adapters yet; the ones added next are accelerated too
        return model

    model = build()
    keys_before = set(model.state_dict())
    model.add_adapter("task", config="scaled_par_bn")
    model.add_classification_head("task", num_labels=2)
    model.train_adapter("task")
    randomize(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    for _ in range(2):
        loss = model(input_ids=ids, labels=torch.tensor([0, 1])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert calls[0] == 4
    assert {k for k in model.state_dict() if ".adapters." not in k and "heads." not in k} == keys_before
    model.save_adapter(str(tmp_path / "task"), "task")
    model.eval()
    want = model(input_ids=ids).logits

    loaded = build()
    name = loaded.load_adapter(str(tmp_path / "task"))
    loaded.set_active_adapters(name)
    loaded.eval()
    calls[0] = 0
    got = loaded(input_ids=ids).logits
    assert calls[0] == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ah.restore(loaded)
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    assert calls[0] == 2


def test_restore_returns_to_the_library_code(calls):
    model = with_adapter("double_seq_bn[reduction_factor=4]", "gpt2")
    embeds = torch.randn(BATCH, SEQ, D)
    with torch.no_grad():
        want = model(inputs_embeds=embeds).last_hidden_state
        assert ah.accelerate(model) == 4
        assert ah.accelerate(model) == 4  # idempotent
        model(inputs_embeds=embeds)
        assert calls[0] == 4
        assert ah.restore(model) == 4  # two locations in each of two blocks
        assert not any(ah.is_accelerated(m) for m in model.modules())
        got = model(inputs_embeds=embeds).last_hidden_state
    assert calls[0] == 4
    assert torch.equal(got, want)
    assert ah.restore(model) == 0


def test_copies_stay_accelerated_on_their_own_parameters(calls):
    """A deepcopy (EMA, model soups) runs fused on its own parameters; restoring it leaves the original alone."""
    model = with_adapter("par_bn")
    ah.accelerate(model)
    embeds = torch.randn(BATCH, SEQ, D)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
        got = clone(inputs_embeds=embeds).last_hidden_state
        assert calls[0] == 2
        ah.restore(clone)
        want = clone(inputs_embeds=embeds).last_hidden_state
        assert calls[0] == 2
        model(inputs_embeds=embeds)
        assert calls[0] == 4  # the original is still accelerated
    assert rel(got, want) < 1e-5


FUSED_NAMES = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu", "silu": "silu", "tanh": "tanh",
               "sigmoid": "sigmoid", "leakyrelu": "leaky_relu", "quick_gelu": "quick_gelu", "linear": "identity"}


@pytest.mark.parametrize("non_linearity", list(FUSED_NAMES) + ["mish", "relu6", "gelu_10", "relu2"])
def test_non_linearity_names_map_to_the_op(non_linearity):
    adapter = LibAdapter("a", D, 4, SeqBnConfig(non_linearity=non_linearity))
    activation, reason = ah.plan(adapter)
    assert activation == FUSED_NAMES.get(non_linearity)
    assert (reason is None) == (non_linearity in FUSED_NAMES)


def test_gating_score_requests_use_the_library_path(calls):
    model = with_adapter("seq_bn[reduction_factor=4]")
    ah.accelerate(model)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        model(input_ids=ids, output_adapter_gating_scores=True)
        assert calls[0] == 0
        model(input_ids=ids)
        assert calls[0] == 2


def test_unfusable_adapter_added_after_accelerate_is_reported_once(calls, caplog):
    model = tiny_model("gpt2")
    ah.accelerate(model)
    model.add_adapter("late_gated", config="seq_bn[reduction_factor=4,use_gating=True]")
    model.set_active_adapters("late_gated")
    randomize(model)
    embeds = torch.randn(BATCH, SEQ, D)
    with caplog.at_level(logging.INFO, logger="adapterfast"), torch.no_grad():
        got = model(inputs_embeds=embeds).last_hidden_state
        model(inputs_embeds=embeds)
        ah.restore(model)
        want = model(inputs_embeds=embeds).last_hidden_state
    said = [r.getMessage() for r in caplog.records if "stays on" in r.getMessage()]
    assert len(said) == 1 and "late_gated" in said[0] and "gating" in said[0], said
    assert calls[0] == 0
    assert torch.equal(got, want)


def test_accelerate_and_restore_count_the_same_adapter_modules():
    """Two adapters in each layer, one of them unfusable: both calls count the fused modules."""
    model = tiny_model("gpt2")
    model.add_adapter("a", config="double_seq_bn[reduction_factor=4]")
    model.add_adapter("b", config="seq_bn[reduction_factor=4]")
    model.add_adapter("gated", config="seq_bn[reduction_factor=4,use_gating=True]")
    fused = ah.accelerate(model)
    assert fused == 4 + 2  # a: two locations in each of two blocks; b: one location each; gated: none
    assert ah.restore(model) == fused
    assert ah.restore(model) == 0
