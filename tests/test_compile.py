"""``torch.compile`` over models that use ``adapterfast.Adapter``.

- No graph breaks (``torch._dynamo.explain``), in training mode with dropout (the seed is drawn with
  ``torch.randint`` inside ``fused_adapter``), in eval mode and under autocast.
- ``fullgraph=True`` gives eager's outputs and gradients: with ``aot_eager`` (Dynamo + AOTAutograd +
  the fake implementations, cheap) for every backend, and with inductor (slow: it compiles C++).
- ``torch.library.opcheck`` passes on both custom ops with realistic inputs.
- Dynamic shapes: a varying number of tokens does not recompile per shape.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch.library import opcheck

import adapterfast
from adapterfast import dropout as dropout_rng
from helpers import backend_params, rel_err
from training_models import grads, make_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _step(model, x, target):
    """Forward and backward; returns the output and the trainable parameters' gradients."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model(x)
    torch.nn.functional.mse_loss(y, target).backward()
    return y.detach(), {**grads(getattr(model, "_orig_mod", model)), "x": x.grad}


def _inputs(n=5, d=16, batch=3):
    return torch.randn(batch, n, d), torch.randn(batch, n, 2)


@pytest.mark.parametrize("mode", ["train", "eval", "autocast"])
def test_no_graph_breaks(mode):
    model = make_model(dropout=0.2)
    model.train(mode != "eval")
    x, _ = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        explanation = dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_fullgraph_aot_eager_matches_eager(backend):
    """Dynamo and AOTAutograd run the random seed draw as eager does, so even dropout matches bitwise-ish."""
    model = make_model(dropout=0.25, freeze_base=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        x, target = _inputs()
        torch.manual_seed(7)
        y_eager, g_eager = _step(model, x, target)
        torch.manual_seed(7)
        y_comp, g_comp = _step(compiled, x, target)
        assert rel_err(y_comp, y_eager) < 1e-6
        assert g_comp.keys() == g_eager.keys()
        for name in g_eager:
            assert rel_err(g_comp[name], g_eager[name]) < 1e-6, name


@pytest.mark.slow
def test_fullgraph_inductor_matches_eager():
    """Inductor with ``fallback_random`` draws the dropout seed from torch's generator, as eager does."""
    _check_inductor_matches_eager("cpu", 1e-5)


def _check_inductor_matches_eager(device: str, tol: float) -> None:
    """A fullgraph-compiled training step with dropout gives eager's output and gradients when inductor
    draws its seeds as eager does (``fallback_random``)."""
    model = make_model(dropout=0.25, freeze_base=False).to(device)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        x, target = (t.to(device) for t in _inputs())
        torch.manual_seed(7)
        y_eager, g_eager = _step(model, x, target)
        torch.manual_seed(7)
        y_comp, g_comp = _step(compiled, x, target)
    assert rel_err(y_comp, y_eager) < tol
    for name in g_eager:
        assert rel_err(g_comp[name], g_eager[name]) < tol, name


@pytest.mark.slow
def test_inductor_rng_dropout_backward_uses_forward_mask():
    """With inductor's own RNG (the default) the seed differs from eager's, as for ``nn.Dropout``, but the
    backward regenerates the very mask the forward used: the up-bias gradient of a sequential adapter is
    ``sum_rows(g * keep) * scale / (1 - p)``, with ``keep`` read off the forward (dropped where y == x)."""
    p, scale, d = 0.5, 2.0, 16
    adapter = adapterfast.Adapter(d, 4, bias=True, dropout=p, scale=scale)
    compiled = torch.compile(adapter, fullgraph=True)
    x = torch.randn(64, d)
    g = torch.randn(64, d)
    y = compiled(x)
    (y * g).sum().backward()
    keep = y != x
    assert 0.3 < keep.float().mean().item() < 0.7
    expected = (g * keep).sum(0) * (scale / (1 - p))
    assert rel_err(adapter.up.bias.grad, expected) < 1e-5


def _op_samples():
    """Realistic inputs for ``adapterfast::forward``: biases or None, residual separate or None, a
    dropout seed or None, fp32 and bf16 activations with fp32 weights."""
    d, r, n = 12, 5, 7
    cases = []
    for bias, residual, dropout, dtype in [
        (True, False, False, torch.float32),
        (False, False, False, torch.float32),
        (True, True, True, torch.float32),
        (False, True, False, torch.float32),
        (True, False, True, torch.float32),
        (True, False, True, torch.bfloat16),
        (False, True, False, torch.bfloat16),
    ]:
        x = torch.randn(n, d, dtype=dtype, requires_grad=True)
        wd = (torch.randn(r, d) / d**0.5).requires_grad_(True)
        wu = (torch.randn(d, r) / r**0.5).requires_grad_(True)
        bd = (torch.randn(r) * 0.1).requires_grad_(True) if bias else None
        bu = (torch.randn(d) * 0.1).requires_grad_(True) if bias else None
        res = torch.randn(n, d, dtype=dtype, requires_grad=True) if residual else None
        seed = dropout_rng.new_seed() if dropout else None
        p = 0.3 if dropout else 0.0
        cases.append((x, wd, wu, bd, bu, "gelu" if bias else "relu", 0.7, p, seed, res))
    return cases


@pytest.mark.parametrize("case", range(7))
def test_opcheck_forward(backend, case):
    args = _op_samples()[case]
    opcheck(torch.ops.adapterfast.forward.default, args)
    # inputs that do not require grad: the call the op sees inside a no-grad region (inference)
    opcheck(torch.ops.adapterfast.forward.default, tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                          for a in args))


@pytest.mark.parametrize("case", range(7))
def test_opcheck_backward(backend, case):
    x, wd, wu, bd, bu, act, scale, p, seed, res = (a.detach() if isinstance(a, torch.Tensor) else a
                                                   for a in _op_samples()[case])
    _, h = torch.ops.adapterfast.forward(x, wd, wu, bd, bu, act, scale, p, seed, res)
    grad_y = torch.randn_like(x)
    opcheck(torch.ops.adapterfast.backward.default, (grad_y, x, wd, wu, bd, bu, h, act, scale, p, seed, res is None))


def _count_compiles(model, xs, *, mark_dynamic):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for x in xs:
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 1)
        x.requires_grad_(True)
        compiled(x).sum().backward()
    return counter.frame_count


def test_dynamic_shapes_mark_dynamic_compiles_once(backend):
    model = make_model(dropout=0.1)
    xs = [torch.randn(2, n, 16) for n in (3, 5, 8, 13, 21)]
    assert _count_compiles(model, xs, mark_dynamic=True) == 1


def test_dynamic_shapes_automatic_recompiles_once(backend):
    """Without hints Dynamo specialises on the first shape and then goes dynamic: 2 compiles, not 5."""
    model = make_model(dropout=0.1)
    xs = [torch.randn(2, n, 16) for n in (3, 5, 8, 13, 21)]
    assert _count_compiles(model, xs, mark_dynamic=False) == 2


def test_dynamic_shapes_under_autocast():
    """The autocast paths (cast x; branch on a zero residual when the residual stays fp32) trace symbolically."""
    model = make_model(dropout=0.1)
    adapter = adapterfast.Adapter(16, 4, dropout=0.1)
    counter = CompileCounterWithBackend("aot_eager")

    def f(x):
        return adapter(x), model(x)  # fp32 x: residual kept fp32 / blocks: bf16 branch and residual

    compiled = torch.compile(f, backend=counter, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for n in (3, 6, 10):
            x = torch.randn(2, n, 16, requires_grad=True)
            torch._dynamo.mark_dynamic(x, 1)
            y, z = compiled(x)
            assert y.dtype == torch.float32
            (y.sum() + z.sum()).backward()
    assert counter.frame_count == 1


def test_compiled_under_autocast_matches_eager_under_autocast(backend):
    model = make_model(freeze_base=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, target = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager, g_eager = _step(model, x, target)
        y_comp, g_comp = _step(compiled, x, target)
    assert y_comp.dtype == y_eager.dtype
    assert rel_err(y_comp, y_eager) < 1e-6
    for name in g_eager:
        assert g_comp[name].dtype == g_eager[name].dtype, name
        assert rel_err(g_comp[name], g_eager[name]) < 1e-6, name


@pytest.mark.gpu
@pytest.mark.slow
def test_fullgraph_inductor_cuda_matches_eager():
    """On CUDA the seed is still drawn on the CPU (a 0-dim CPU tensor inside the graph) while the op runs
    on the GPU; inductor with ``fallback_random`` matches eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _check_inductor_matches_eager("cuda", 1e-4)


STRIDED_BACKENDS = backend_params()


@pytest.mark.parametrize("name", STRIDED_BACKENDS)
@pytest.mark.parametrize("layout", ["expanded_x", "transposed_residual", "strided_weights"])
def test_compiled_matches_eager_on_strided_inputs(name, layout):
    """Every backend returns the contiguous y its fake kernel promises, so a compiled call on strided
    inputs gives eager's output and gradients."""
    d, r, n = 48, 4, 6
    torch.manual_seed(0)
    x = torch.randn(1, d).expand(n, d) if layout == "expanded_x" else torch.randn(n, d)
    residual = torch.randn(d, n).t() if layout == "transposed_residual" else None
    wd, wu = torch.randn(r, d) * 0.2, torch.randn(d, r) * 0.2
    if layout == "strided_weights":
        wd, wu = torch.randn(d, r).t() * 0.2, torch.randn(r, d).t() * 0.2
    leaves = [t.detach().clone().requires_grad_() for t in (wd, wu)]

    def f(x, wd, wu, residual):
        return adapterfast.fused_adapter(x, wd, wu, activation="gelu", residual=residual)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    with adapterfast.use_backend(name):
        for fn in (f, compiled):
            w = [t.detach().clone().requires_grad_() for t in leaves]
            y = fn(x, *w, residual)
            y.square().sum().backward()
            results.append((y.detach(), [t.grad for t in w]))
    (y_e, g_e), (y_c, g_c) = results
    assert y_c.is_contiguous() and y_e.is_contiguous()
    assert rel_err(y_c, y_e) < 1e-6
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b) < 1e-6
