"""Activations and their derivatives as ``@triton.jit`` functions, selected by a constexpr name.

The names are the canonical ones of ``adapterfast.activations.ACTIVATIONS`` and the formulas are
those of ``adapterfast.reference.activate`` / ``activate_grad``, evaluated in fp32. Because the
name is a ``tl.constexpr``, each kernel variant contains only the branch it uses.

NaN behaves as in eager PyTorch: ``relu``/``leaky_relu`` test ``h < 0`` (false for NaN, so NaN
passes through), and their derivatives test ``h > 0`` (false for NaN) as the reference does.
``tanh`` is built from ``exp`` so that the same code runs on GPUs and under ``TRITON_INTERPRET=1``,
where libdevice is not available: ``1 - 2 / (exp(2|h|) + 1)`` (saturating cleanly at 1) for
``|h| >= 0.55``, where it loses at most a bit, and below that the Taylor series to ``h**17``
(truncation under 1e-8 relative at 0.55), because the ``exp`` form cancels near 0 (4.7e-4
relative error at ``|h| = 1e-4``). The sign is restored last, so ``tanh(-h) = -tanh(h)`` exactly.
"""
import triton
import triton.language as tl

from adapterfast import activations as _activations

LEAKY_RELU_SLOPE = tl.constexpr(_activations.LEAKY_RELU_SLOPE)
QUICK_GELU_ALPHA = tl.constexpr(_activations.QUICK_GELU_ALPHA)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(h):
    return 1.0 / (1.0 + tl.exp(-h))


TANH_SERIES_LIMIT = tl.constexpr(0.55)


@triton.jit
def _tanh(h):
    z = tl.abs(h)
    z2 = z * z
    series = -929569.0 / 638512875.0 + z2 * (6404582.0 / 10854718875.0)
    series = 21844.0 / 6081075.0 + z2 * series
    series = -1382.0 / 155925.0 + z2 * series
    series = 62.0 / 2835.0 + z2 * series
    series = -17.0 / 315.0 + z2 * series
    series = 2.0 / 15.0 + z2 * series
    series = -1.0 / 3.0 + z2 * series
    series = z + z * z2 * series
    t = tl.where(z < TANH_SERIES_LIMIT, series, 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    return tl.where(h < 0.0, -t, t)


@triton.jit
def _gelu_tanh_inner(h):
    return (h + h * h * h * GELU_TANH_C) * SQRT_2_OVER_PI


@triton.jit
def activate(h, ACTIVATION: tl.constexpr):
    """``act(h)`` for fp32 ``h``."""
    if ACTIVATION == "relu":
        out = tl.where(h < 0.0, 0.0, h)
    elif ACTIVATION == "gelu":
        out = 0.5 * h * (1.0 + tl.erf(h * INV_SQRT_2))
    elif ACTIVATION == "gelu_tanh":
        out = 0.5 * h * (1.0 + _tanh(_gelu_tanh_inner(h)))
    elif ACTIVATION == "silu":
        out = h * _sigmoid(h)
    elif ACTIVATION == "tanh":
        out = _tanh(h)
    elif ACTIVATION == "sigmoid":
        out = _sigmoid(h)
    elif ACTIVATION == "leaky_relu":
        out = tl.where(h < 0.0, h * LEAKY_RELU_SLOPE, h)
    elif ACTIVATION == "identity":
        out = h
    elif ACTIVATION == "quick_gelu":
        out = h * _sigmoid(h * QUICK_GELU_ALPHA)
    else:
        tl.static_assert(False, "unknown activation")
    return out


@triton.jit
def activate_grad(h, ACTIVATION: tl.constexpr):
    """``act'(h)`` for fp32 ``h``."""
    if ACTIVATION == "relu":
        out = tl.where(h > 0.0, 1.0, 0.0)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(h * INV_SQRT_2))
        pdf = tl.exp(-0.5 * h * h) * INV_SQRT_2PI
        out = cdf + h * pdf
    elif ACTIVATION == "gelu_tanh":
        t = _tanh(_gelu_tanh_inner(h))
        dinner = (h * h * (3.0 * GELU_TANH_C) + 1.0) * SQRT_2_OVER_PI
        out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * dinner
    elif ACTIVATION == "silu":
        s = _sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    elif ACTIVATION == "tanh":
        t = _tanh(h)
        out = 1.0 - t * t
    elif ACTIVATION == "sigmoid":
        s = _sigmoid(h)
        out = s * (1.0 - s)
    elif ACTIVATION == "leaky_relu":
        out = tl.where(h > 0.0, 1.0, LEAKY_RELU_SLOPE)
    elif ACTIVATION == "identity":
        out = tl.full(h.shape, 1.0, tl.float32)
    elif ACTIVATION == "quick_gelu":
        s = _sigmoid(h * QUICK_GELU_ALPHA)
        out = s + h * QUICK_GELU_ALPHA * s * (1.0 - s)
    else:
        tl.static_assert(False, "unknown activation")
    return out


@triton.jit
def backprop(h, upstream, ACTIVATION: tl.constexpr):
    """``upstream * act'(h)``, the gradient at the pre-activation. For relu it selects instead of
    multiplying, as eager's ``threshold_backward`` does, so a NaN/Inf upstream where h <= 0 gives 0."""
    if ACTIVATION == "relu":
        out = tl.where(h > 0.0, upstream, 0.0)
    else:
        out = upstream * activate_grad(h, ACTIVATION)
    return out
