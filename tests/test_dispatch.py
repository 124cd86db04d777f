"""Backend choice: names, per-thread forcing, the backward on the forward's backend, the env variable."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import adapterfast
from adapterfast import dispatch

from helpers import adapter_inputs, backend_params, rel_err

AVAILABLE = [name for name in ("reference", "cpu", "triton") if dispatch.backends()[name].available]


def test_select_returns_a_registered_name():
    x = torch.randn(3, 8)
    with adapterfast.use_backend("reference"):
        assert dispatch.select(x, 4) == "reference"
    name = dispatch.select(x, 4)
    assert name in AVAILABLE
    assert dispatch.kernels(name).name == name
    assert callable(dispatch.kernels(name).forward) and callable(dispatch.kernels(name).backward)


def test_use_backend_is_per_thread():
    """Two threads whose blocks overlap in time each see their own choice, and auto afterwards."""
    entered = threading.Barrier(2)
    seen, after = {}, {}

    def work(name):
        with adapterfast.use_backend(name):
            entered.wait()
            seen[name] = dispatch.current()
            entered.wait()
        after[name] = dispatch.current()

    threads = [threading.Thread(target=work, args=(n,)) for n in ("reference", "cpu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"reference": "reference", "cpu": "cpu"}
    assert after == {"reference": "auto", "cpu": "auto"}
    assert dispatch.current() == "auto"


def test_use_backend_survives_an_exception():
    with pytest.raises(RuntimeError):
        with adapterfast.use_backend("reference"):
            raise RuntimeError("inside")
    assert dispatch.current() == "auto"


def _spy(monkeypatch, calls):
    for name in AVAILABLE:
        real = dispatch.kernels(name)

        def backward(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real.backward(*args, **kw)

        monkeypatch.setitem(dispatch._registry, name, dispatch.Kernels(name, real.forward, backward, real.dtypes,
                                                                       real.unavailable))


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs two backends")
@pytest.mark.parametrize("where", ["outside", "other_block"])
def test_backward_runs_on_the_forward_backend(monkeypatch, where):
    calls = []
    _spy(monkeypatch, calls)
    x, wd, wu, bd, bu, _ = adapter_inputs(6, 8, 4)
    x.requires_grad_()
    other = next(n for n in AVAILABLE if n != "reference")
    with adapterfast.use_backend("reference"):
        y = adapterfast.fused_adapter(x, wd, wu, bd, bu, dropout=0.3)
    if where == "outside":
        y.sum().backward()
    else:
        with adapterfast.use_backend(other):
            y.sum().backward()
    assert calls == ["reference"]


def test_bogus_env_variable_is_reported_at_import():
    env = dict(os.environ, ADAPTERFAST_BACKEND="bogus")
    result = subprocess.run([sys.executable, "-c", "import adapterfast"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "unknown adapterfast backend 'bogus' in the environment variable ADAPTERFAST_BACKEND" in result.stderr


def test_env_variable_read_again_when_it_changes(monkeypatch):
    monkeypatch.setenv("ADAPTERFAST_BACKEND", "reference")
    assert dispatch.current() == "reference"
    monkeypatch.setenv("ADAPTERFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ADAPTERFAST_BACKEND"):
        dispatch.current()
    monkeypatch.delenv("ADAPTERFAST_BACKEND")
    assert dispatch.current() == "auto"


@pytest.mark.parametrize("backend", backend_params())
def test_needs_input_grad_respected(backend):
    """Frozen x (no dx wanted): weight gradients still right, x gets none."""
    x, wd, wu, bd, bu, _ = adapter_inputs(5, 8, 4)
    wd.requires_grad_()
    with adapterfast.use_backend(backend):
        y = adapterfast.fused_adapter(x, wd, wu, bd, bu, activation="silu")
    g = torch.randn_like(y)
    (dwd,) = torch.autograd.grad(y, [wd], g)
    wd64 = wd.detach().double().requires_grad_()
    from adapterfast import reference

    y64 = reference.adapter(x.double(), wd64, wu.double(), bd.double(), bu.double(), activation="silu")
    (want,) = torch.autograd.grad(y64, [wd64], g.double())
    assert rel_err(dwd, want) < 1e-5


_AUTO_BELOW_AVX512 = r"""
import logging, torch, adapterfast
from adapterfast import cpu, dispatch
logging.basicConfig(level=logging.WARNING, format="%(message)s")
x = torch.randn(4, 16)
picks = {str(t): dispatch.select(x.to(t), 4) for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
picks["float32 again"] = dispatch.select(x, 4)
with adapterfast.use_backend("cpu"):
    picks["forced"] = dispatch.select(x, 4)
    y = adapterfast.fused_adapter(x, torch.randn(4, 16), torch.randn(16, 4))
print(picks, cpu.kernel_isa(torch.float32), cpu.kernel_isa(torch.float64), y.shape == x.shape)
"""


def _auto_below_avx512(switches: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", **switches)
    run = subprocess.run([sys.executable, "-c", _AUTO_BELOW_AVX512], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.skipif(not dispatch.backends()["cpu"].available, reason="the C++ backend is not built")
def test_auto_runs_the_cpu_kernels_on_blas_below_avx512():
    """Below AVX-512 (ATEN_CPU_CAPABILITY=avx2 makes any x86 CPU such a one) the C++ kernels run their
    products on PyTorch's BLAS (float64's on dgemm, as on every CPU), and auto runs them for every
    dtype, with nothing to say."""
    run = _auto_below_avx512({})
    picks = ("{'torch.float32': 'cpu', 'torch.bfloat16': 'cpu', 'torch.float16': 'cpu', 'torch.float64': 'cpu', "
             "'float32 again': 'cpu', 'forced': 'cpu'} blas blas True")
    assert run.stdout.strip() == picks, run.stdout
    assert "falling back to the eager reference" not in run.stderr, run.stderr


@pytest.mark.skipif(not dispatch.backends()["cpu"].available, reason="the C++ backend is not built")
def test_auto_runs_the_reference_where_the_cpu_kernels_have_only_portable_loops():
    """Below AVX-512 without BLAS (ADAPTERFAST_CPU_BLAS=0, or a PyTorch that exports no sgemm) the C++
    kernels run portable loops, several times slower than PyTorch's GEMMs: auto runs the reference for
    every dtype, saying so once per dtype; a forced cpu backend still runs the C++ kernels."""
    run = _auto_below_avx512({"ADAPTERFAST_CPU_BLAS": "0"})
    assert run.stdout.strip() == ("{'torch.float32': 'reference', 'torch.bfloat16': 'reference', 'torch.float16': "
                                  "'reference', 'torch.float64': 'reference', 'float32 again': 'reference', "
                                  "'forced': 'cpu'} generic generic True"), run.stdout
    said = [line for line in run.stderr.splitlines() if "falling back to the eager reference" in line]
    assert len(said) == 4, run.stderr
    assert all("only portable loops" in line and "AVX2" in line and "use_backend('cpu')" in line for line in said)


@pytest.mark.skipif(not dispatch.backends()["cpu"].available, reason="the C++ backend is not built")
def test_auto_runs_the_reference_for_float64_without_blas_on_any_cpu():
    """float64 has no hand-tiled kernels on any CPU: without BLAS (ADAPTERFAST_CPU_BLAS=0) its C++
    kernels are the portable loops, and auto runs the reference for it whatever PyTorch's capability
    (float32 keeps its AVX-512 kernels where PyTorch runs AVX-512)."""
    code = ("import torch; from adapterfast import cpu, dispatch; "
            "print(dispatch.select(torch.randn(4, 16, dtype=torch.float64), 4), cpu.kernel_isa(torch.float64))")
    env = dict(os.environ, ADAPTERFAST_CPU_BLAS="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["reference", "generic"], run.stdout
    assert "only portable loops for torch.float64" in run.stderr, run.stderr


@pytest.mark.skipif(not dispatch.backends()["cpu"].available, reason="the C++ backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_auto_on_this_cpu_follows_its_kernels(dtype):
    """Here, auto picks the C++ backend exactly where it has more than portable loops."""
    from adapterfast import cpu

    generic = cpu.kernel_isa(dtype) == "generic"
    assert dispatch.select(torch.randn(3, 8, dtype=dtype), 4) == ("reference" if generic else "cpu")
