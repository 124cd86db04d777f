"""The malformed calls a user can make, each expected to raise a clear error that names the argument.

Every row is a call (``fused_adapter``, ``Adapter``, ``Adapter.forward``, ``use_backend``,
``replace_adapters``) with one thing wrong, the exception type it must raise, and words the
message must contain (the argument's name). ``classify`` sorts the outcome into clear (right type,
message names the argument), unclear (an error, but another type or a message that does not name
what was wrong), crash (an internal error: RuntimeError, AttributeError, ...) and silent (no
error at all). ``python tests/test_bad_inputs.py`` prints the counts and every row that is not
clear. Rows that are not clear because of code outside this file are marked
``xfail(strict=True)`` with the issue item and the branch that fixes them.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn as nn

import adapterfast
from adapterfast import Adapter, fused_adapter, replace_adapters, use_backend

N, D, R = 4, 8, 3


def _inputs(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).to(dtype=dtype, device=device)
    wd = (torch.randn(R, D, generator=g) / 3).to(dtype=dtype, device=device)
    wu = (torch.randn(D, R, generator=g) / 2).to(dtype=dtype, device=device)
    bd = torch.randn(R, generator=g).to(dtype=dtype, device=device)
    bu = torch.randn(D, generator=g).to(dtype=dtype, device=device)
    return x, wd, wu, bd, bu


def call(**changes):
    """``fused_adapter`` on good inputs with ``changes`` applied (positional names x, wd, wu, bd, bu)."""
    x, wd, wu, bd, bu = _inputs()
    args = dict(x=x, wd=wd, wu=wu, bd=bd, bu=bu)
    kwargs = {}
    for key, value in changes.items():
        if key in args:
            args[key] = value
        else:
            kwargs[key] = value

    def run():
        return fused_adapter(args["x"], args["wd"], args["wu"], args["bd"], args["bu"], **kwargs)
    return run


def forward(x, residual=None, **adapter_kwargs):
    def run():
        module = Adapter(D, R, **adapter_kwargs)
        return module(x() if callable(x) else x, residual)
    return run


def module(*args, **kwargs):
    return lambda: Adapter(*args, **kwargs)


def backend(name, dtype=None):
    def run():
        inputs = _inputs(dtype or torch.float32)
        with use_backend(name):
            return fused_adapter(*inputs)
    return run


def env_backend(value):
    def run():
        old = os.environ.get("ADAPTERFAST_BACKEND")
        os.environ["ADAPTERFAST_BACKEND"] = value
        try:
            return fused_adapter(*_inputs())
        finally:
            if old is None:
                del os.environ["ADAPTERFAST_BACKEND"]
            else:
                os.environ["ADAPTERFAST_BACKEND"] = old
    return run


def grad_of(run_forward, grad):
    def run():
        x, wd, wu, bd, bu = (t.requires_grad_() for t in _inputs())
        y = fused_adapter(x, wd, wu, bd, bu)
        return y.backward(grad(y))
    return run


def meta(*names, forced=None):
    def run():
        x, wd, wu, bd, bu = _inputs()
        t = dict(x=x, wd=wd, wu=wu, bd=bd, bu=bu)
        for name in names:
            t[name] = t[name].to("meta")
        if forced is None:
            return fused_adapter(t["x"], t["wd"], t["wu"], t["bd"], t["bu"])
        with use_backend(forced):
            return fused_adapter(t["x"], t["wd"], t["wu"], t["bd"], t["bu"])
    return run


def _replace_non_module():
    return replace_adapters("not a model")


x0, wd0, wu0, bd0, bu0 = _inputs()
I64 = torch.int64

# (id, call, exception types accepted as clear, words the message must contain (all, case-insensitive))
ROWS = [
    # --- x
    ("x_none", call(x=None), TypeError, ["x"]),
    ("x_list", call(x=x0.tolist()), TypeError, ["x"]),
    ("x_numpy", call(x=x0.numpy()), TypeError, ["x"]),
    ("x_scalar", call(x=1.0), TypeError, ["x"]),
    ("x_int", call(x=x0.to(I64)), TypeError, ["x", "int64"]),
    ("x_bool", call(x=x0 > 0), TypeError, ["x", "bool"]),
    ("x_complex", call(x=x0.to(torch.complex64)), TypeError, ["x"]),
    ("x_0d", call(x=torch.tensor(1.0)), ValueError, ["x"]),
    ("x_last_dim_0", call(x=torch.randn(4, 0)), ValueError, ["x"]),
    ("x_wrong_d", call(x=torch.randn(4, D + 1)), ValueError, ["x", str(D + 1)]),
    ("x_float8", call(x=x0.to(torch.float8_e4m3fn)), TypeError, ["x", "float8"]),
    ("x_nested_tuple", call(x=(x0,)), TypeError, ["x"]),
    # --- down_weight
    ("wd_none", call(wd=None), TypeError, ["down_weight"]),
    ("wd_list", call(wd=wd0.tolist()), TypeError, ["down_weight"]),
    ("wd_int", call(wd=wd0.to(I64)), TypeError, ["down_weight"]),
    ("wd_1d", call(wd=wd0[0]), ValueError, ["down_weight"]),
    ("wd_3d", call(wd=wd0[None]), ValueError, ["down_weight"]),
    ("wd_transposed_shape", call(wd=wd0.t()), ValueError, ["down_weight"]),
    ("wd_r0", call(wd=torch.randn(0, D), wu=torch.randn(D, 0)), ValueError, ["down_weight"]),
    ("wd_wrong_d", call(wd=torch.randn(R, D + 2)), ValueError, ["down_weight"]),
    ("wd_bf16_x_fp32", call(wd=wd0.bfloat16()), TypeError, ["down_weight", "bfloat16"]),
    ("wd_f64_x_fp32", call(wd=wd0.double()), TypeError, ["down_weight", "float64"]),
    ("wd_meta", meta("wd"), ValueError, ["down_weight", "meta"]),
    # --- up_weight
    ("wu_none", call(wu=None), TypeError, ["up_weight"]),
    ("wu_int", call(wu=wu0.to(I64)), TypeError, ["up_weight"]),
    ("wu_1d", call(wu=wu0[:, 0]), ValueError, ["up_weight"]),
    ("wu_wrong_r", call(wu=torch.randn(D, R + 1)), ValueError, ["up_weight"]),
    ("wu_wrong_d", call(wu=torch.randn(D + 1, R)), ValueError, ["up_weight"]),
    ("wu_transposed_shape", call(wu=wu0.t()), ValueError, ["up_weight"]),
    ("wu_bf16_x_fp32", call(wu=wu0.bfloat16()), TypeError, ["up_weight", "bfloat16"]),
    ("wu_f64_x_fp32", call(wu=wu0.double()), TypeError, ["up_weight", "float64"]),
    ("wu_meta", meta("wu"), ValueError, ["up_weight", "meta"]),
    ("wu_numpy", call(wu=wu0.numpy()), TypeError, ["up_weight"]),
    # --- biases
    ("bd_list", call(bd=bd0.tolist()), TypeError, ["down_bias"]),
    ("bd_int", call(bd=bd0.to(I64)), TypeError, ["down_bias"]),
    ("bd_wrong_len", call(bd=torch.randn(R + 1)), ValueError, ["down_bias"]),
    ("bd_2d", call(bd=bd0[None]), ValueError, ["down_bias"]),
    ("bd_0d", call(bd=torch.tensor(1.0)), ValueError, ["down_bias"]),
    ("bd_f64", call(bd=bd0.double()), TypeError, ["down_bias", "float64"]),
    ("bu_scalar", call(bu=0.5), TypeError, ["up_bias"]),
    ("bu_int", call(bu=bu0.to(I64)), TypeError, ["up_bias"]),
    ("bu_wrong_len", call(bu=torch.randn(D - 1)), ValueError, ["up_bias"]),
    ("bu_2d", call(bu=bu0[None]), ValueError, ["up_bias"]),
    ("bu_bf16", call(bu=bu0.bfloat16()), TypeError, ["up_bias", "bfloat16"]),
    ("bu_meta", meta("bu"), ValueError, ["up_bias", "meta"]),
    # --- residual
    ("res_list", call(residual=x0.tolist()), TypeError, ["residual"]),
    ("res_int", call(residual=x0.to(I64)), TypeError, ["residual"]),
    ("res_wrong_shape", call(residual=torch.randn(N + 1, D)), ValueError, ["residual"]),
    ("res_broadcastable", call(residual=torch.randn(1, D)), ValueError, ["residual"]),
    ("res_flat", call(residual=torch.randn(N * D)), ValueError, ["residual"]),
    ("res_bf16", call(residual=x0.bfloat16()), TypeError, ["residual", "bfloat16"]),
    ("res_f64", call(residual=x0.double()), TypeError, ["residual", "float64"]),
    ("res_meta", call(residual=x0.to("meta")), ValueError, ["residual", "meta"]),
    # --- scale
    ("scale_str", call(scale="0.5"), TypeError, ["scale"]),
    ("scale_none", call(scale=None), TypeError, ["scale"]),
    ("scale_bool", call(scale=True), TypeError, ["scale"]),
    ("scale_complex", call(scale=1j), TypeError, ["scale"]),
    ("scale_list", call(scale=[0.5]), TypeError, ["scale"]),
    ("scale_tensor_vec", call(scale=torch.ones(D)), TypeError, ["scale"]),
    # --- dropout
    ("dropout_str", call(dropout="0.1"), (TypeError, ValueError), ["dropout"]),
    ("dropout_neg", call(dropout=-0.1), ValueError, ["dropout"]),
    ("dropout_one", call(dropout=1.0), ValueError, ["dropout"]),
    ("dropout_big", call(dropout=5), ValueError, ["dropout"]),
    ("dropout_nan", call(dropout=float("nan")), ValueError, ["dropout"]),
    ("dropout_none", call(dropout=None), (TypeError, ValueError), ["dropout"]),
    ("dropout_bool", call(dropout=True), (TypeError, ValueError), ["dropout"]),
    # --- activation
    ("activation_unknown", call(activation="relu6"), ValueError, ["activation", "relu6"]),
    ("activation_none", call(activation=None), TypeError, ["activation"]),
    ("activation_module", call(activation=nn.ReLU()), TypeError, ["activation"]),
    ("activation_callable", call(activation=torch.relu), TypeError, ["activation"]),
    ("activation_empty", call(activation=""), ValueError, ["activation"]),
    # --- other keywords and positional misuse
    ("unknown_keyword", call(bias=True), TypeError, ["bias"]),
    ("training_str", call(training="yes", dropout=0.1), TypeError, ["training"]),
    # --- devices and backends
    ("x_meta_auto", meta("x", "wd", "wu", "bd", "bu"), None, []),  # meta tensors are supported: fake kernels
    # meta tensors go through the fake kernels whichever backend is forced: shapes only, no data to compute
    ("x_meta_forced_cpu", meta("x", "wd", "wu", "bd", "bu", forced="cpu"), None, []),
    ("backend_unknown", backend("fast"), ValueError, ["backend", "fast"]),
    ("backend_none", backend(None), (TypeError, ValueError), ["backend"]),
    ("backend_triton_float64", backend("triton", torch.float64), ValueError,
     ["triton", "float64"]),
    ("env_backend_bogus", env_backend("bogus"), ValueError, ["ADAPTERFAST_BACKEND", "bogus"]),
    # --- backward
    ("grad_wrong_shape", grad_of(None, lambda y: torch.ones(N + 1, D)), RuntimeError, ["shape"]),
    # autograd itself casts a grad of another float dtype to the output's, as for nn.Linear: accepted
    ("grad_wrong_dtype", grad_of(None, lambda y: torch.ones_like(y, dtype=torch.float64)), None, []),
    # --- Adapter constructor
    ("adapter_d_str", module("768", 16), TypeError, ["d_model"]),
    ("adapter_d_float", module(768.0, 16), TypeError, ["d_model"]),
    ("adapter_d_zero", module(0, 16), ValueError, ["d_model"]),
    ("adapter_r_negative", module(8, -1), ValueError, ["r"]),
    ("adapter_r_none", module(8, None), TypeError, ["r"]),
    ("adapter_dropout_str", module(8, 2, dropout="0.1"), TypeError, ["dropout"]),
    ("adapter_dropout_one", module(8, 2, dropout=1.0), ValueError, ["dropout"]),
    ("adapter_scale_str", module(8, 2, scale="x"), TypeError, ["scale"]),
    ("adapter_scale_none", module(8, 2, scale=None), TypeError, ["scale"]),
    ("adapter_activation_unknown", module(8, 2, activation="swiglu"), ValueError, ["activation", "swiglu"]),
    ("adapter_activation_module", module(8, 2, activation=nn.ReLU()), TypeError, ["activation"]),
    ("adapter_dtype_int", module(8, 2, dtype=torch.int64), (TypeError, ValueError), ["int64"]),
    # --- Adapter forward
    ("forward_wrong_d_model", forward(torch.randn(2, D + 4)), ValueError, ["d_model", str(D + 4)]),
    ("forward_list", forward([[1.0] * D]), TypeError, ["x"]),
    ("forward_int", forward(torch.ones(2, D, dtype=I64)), TypeError, ["x"]),
    ("forward_residual_shape", forward(torch.randn(2, D), torch.randn(3, D)), ValueError, ["residual"]),
    ("forward_f64_x_fp32_module", forward(torch.randn(2, D, dtype=torch.float64)), TypeError, ["float64"]),
    # --- replace_adapters
    ("replace_non_module", _replace_non_module, TypeError, ["model"]),
]


def _message_names(message: str, words) -> bool:
    low = message.lower()
    return all(w.lower() in low for w in words)


def classify(run, expected, words) -> tuple[str, str]:
    """``(outcome, detail)`` with outcome one of clear / unclear / crash / silent."""
    try:
        run()
    except Exception as error:  # noqa: BLE001 (what it raises is what is being classified)
        detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:240]
        if expected is None:
            return "crash", detail
        kinds = expected if isinstance(expected, tuple) else (expected,)
        if isinstance(error, kinds):
            return ("clear" if _message_names(str(error), words) else "unclear"), detail
        if isinstance(error, (TypeError, ValueError)):
            return "unclear", detail
        return "crash", detail
    return ("clear", "accepted, as documented") if expected is None else ("silent", "no error")


# Rows that are not clear yet, by id, with the reason (xfail, strict: one that becomes clear fails
# until its mark is dropped). Empty: every row is clear.
KNOWN: dict[str, str] = {}


@pytest.mark.parametrize("row", [pytest.param(row, id=row[0], marks=[pytest.mark.xfail(strict=True,
                                 reason=KNOWN[row[0]])] if row[0] in KNOWN else []) for row in ROWS])
def test_bad_input_raises_a_clear_error(row):
    name, run, expected, words = row
    outcome, detail = classify(run, expected, words)
    assert outcome == "clear", f"{name}: {outcome}: {detail}"


def test_table_is_large_and_ids_are_unique():
    assert len(ROWS) >= 80
    assert len({row[0] for row in ROWS}) == len(ROWS)
    assert set(KNOWN) <= {row[0] for row in ROWS}


if __name__ == "__main__":
    counts: dict[str, int] = {}
    lines = []
    for name, run, expected, words in ROWS:
        outcome, detail = classify(run, expected, words)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome != "clear":
            lines.append(f"  {outcome:8s} {name}: {detail}")
    print(f"{len(ROWS)} tried: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("clear", "unclear", "crash", "silent")))
    print("\n".join(lines))
