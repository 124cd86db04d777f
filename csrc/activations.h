#pragma once
// The bottleneck activations and their derivatives, with the formulas of
// adapterfast/reference.py (`activate`, `activate_grad`). They act on the small [rows, r]
// pre-activation block, so plain scalar code is enough; `visit` resolves the activation once
// per block and hands the loop a functor with `value(h)` and `grad(h)`.
//
// NaN propagates as in eager: relu and leaky_relu pass a NaN through (torch.relu does), and
// their derivatives are 0 and the leaky slope for NaN (the reference's `h > 0` comparisons).
// `backprop` applies the chain rule at the pre-activation; for relu it selects rather than
// multiplies, as eager's threshold_backward does, so a non-finite upstream gradient where h <= 0
// gives 0 there, not NaN.
#include <cmath>
#include <string>
#include <type_traits>

#include <c10/util/Exception.h>

namespace adapterfast::cpu {

enum class Activation { relu, gelu, gelu_tanh, silu, tanh, sigmoid, leaky_relu, identity, quick_gelu };

inline Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_tanh") return Activation::gelu_tanh;
  if (name == "silu") return Activation::silu;
  if (name == "tanh") return Activation::tanh;
  if (name == "sigmoid") return Activation::sigmoid;
  if (name == "leaky_relu") return Activation::leaky_relu;
  if (name == "identity") return Activation::identity;
  if (name == "quick_gelu") return Activation::quick_gelu;
  TORCH_CHECK_VALUE(false, "adapterfast CPU kernels: unknown activation '", name,
                    "' (expected a canonical name from adapterfast.activations.ACTIVATIONS)");
}

namespace act {

template <typename T>
T logistic(T h) {
  return T(1) / (T(1) + std::exp(-h));
}

template <typename T>
struct Relu {
  static T value(T h) { return h < T(0) ? T(0) : h; }
  static T grad(T h) { return h > T(0) ? T(1) : T(0); }
};

template <typename T>
struct LeakyRelu {
  static constexpr T kSlope = T(0.01);
  static T value(T h) { return h < T(0) ? kSlope * h : h; }
  static T grad(T h) { return h > T(0) ? T(1) : kSlope; }
};

template <typename T>
struct Identity {
  static T value(T h) { return h; }
  static T grad(T) { return T(1); }
};

// 0.5 h (1 + erf(h / sqrt 2)); derivative Phi(h) + h phi(h).
template <typename T>
struct Gelu {
  static constexpr T kInvSqrt2 = T(0.70710678118654752440);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  static T value(T h) { return T(0.5) * h * (T(1) + std::erf(h * kInvSqrt2)); }
  static T grad(T h) {
    const T cdf = T(0.5) * (T(1) + std::erf(h * kInvSqrt2));
    const T pdf = std::exp(T(-0.5) * h * h) * kInvSqrt2Pi;
    return cdf + h * pdf;
  }
};

// 0.5 h (1 + tanh(v / 2)), v = 2k (h + 0.044715 h^3), k = sqrt(2 / pi), evaluated as h s with
// s = sigmoid(v) = 0.5 (1 + tanh(v / 2)): where tanh is near -1 (h below about -2), 1 + tanh
// cancels and loses up to ~10 bits in fp32, the sigmoid form loses none. Derivative
// s + h s (1 - s) v', with 1 - tanh^2 = 4 s (1 - s) and 1 - s = sigmoid(-v) (again no cancellation).
template <typename T>
struct GeluTanh {
  static constexpr T kTwoSqrt2OverPi = T(1.59576912160573071176);
  static constexpr T kCubic = T(0.044715);
  static T inner(T h) { return kTwoSqrt2OverPi * (h + kCubic * h * h * h); }
  static T value(T h) { return h * logistic(inner(h)); }
  static T grad(T h) {
    const T v = inner(h);
    const T s = logistic(v);
    return s + h * s * logistic(-v) * kTwoSqrt2OverPi * (T(1) + T(3) * kCubic * h * h);
  }
};

// h sigmoid(h); derivative s (1 + h (1 - s)).
template <typename T>
struct Silu {
  static T value(T h) { return h * logistic(h); }
  static T grad(T h) {
    const T s = logistic(h);
    return s * (T(1) + h * (T(1) - s));
  }
};

template <typename T>
struct Tanh {
  static T value(T h) { return std::tanh(h); }
  static T grad(T h) {
    const T t = std::tanh(h);
    return T(1) - t * t;
  }
};

template <typename T>
struct Sigmoid {
  static T value(T h) { return logistic(h); }
  static T grad(T h) {
    const T s = logistic(h);
    return s * (T(1) - s);
  }
};

// h sigmoid(1.702 h); derivative s + 1.702 h s (1 - s).
template <typename T>
struct QuickGelu {
  static constexpr T kAlpha = T(1.702);
  static T value(T h) { return h * logistic(kAlpha * h); }
  static T grad(T h) {
    const T s = logistic(kAlpha * h);
    return s + kAlpha * h * s * (T(1) - s);
  }
};

}  // namespace act

// upstream * act'(h): the gradient at the pre-activation.
template <typename F, typename T>
T backprop(F f, T h, T upstream) {
  if constexpr (std::is_same_v<F, act::Relu<T>>) {
    return h > T(0) ? upstream : T(0);
  } else {
    return upstream * f.grad(h);
  }
}

// Calls fn(Functor{}) with the functor of `activation`, so the caller's loop is compiled once
// per activation instead of switching per element.
template <typename T, typename Fn>
void visit(Activation activation, Fn&& fn) {
  switch (activation) {
    case Activation::relu: return fn(act::Relu<T>{});
    case Activation::gelu: return fn(act::Gelu<T>{});
    case Activation::gelu_tanh: return fn(act::GeluTanh<T>{});
    case Activation::silu: return fn(act::Silu<T>{});
    case Activation::tanh: return fn(act::Tanh<T>{});
    case Activation::sigmoid: return fn(act::Sigmoid<T>{});
    case Activation::leaky_relu: return fn(act::LeakyRelu<T>{});
    case Activation::identity: return fn(act::Identity<T>{});
    case Activation::quick_gelu: return fn(act::QuickGelu<T>{});
  }
}

}  // namespace adapterfast::cpu
