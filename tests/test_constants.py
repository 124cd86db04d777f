"""Constants shared by the Python, Triton and C++ code have one source, in Python.

The Triton kernels import them (checked here by identity of value); the C++ kernels cannot, so
their copies in ``csrc/`` are parsed from the headers and compared with the Python values.
"""
import re
from pathlib import Path

import pytest

from adapterfast import activations, dispatch, dropout

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _cpp_constant(header: str, name: str, root: Path = CSRC) -> str:
    text = (root / header).read_text()
    found = re.findall(rf"\b{name}\s*=\s*(?:T\()?\s*([0-9A-Fa-fx.]+?)u?\s*\)?\s*;", text)
    assert len(found) == 1, f"{header}: expected one definition of {name}, found {found}"
    return found[0]


@pytest.mark.parametrize("cpp,python", [("kM0", "PHILOX_M0"), ("kM1", "PHILOX_M1"), ("kW0", "PHILOX_W0"),
                                        ("kW1", "PHILOX_W1"), ("kRounds", "PHILOX_ROUNDS")])
def test_philox_constants_in_cpp_equal_python(cpp, python):
    assert int(_cpp_constant("philox.h", cpp), 0) == getattr(dropout, python)


@pytest.mark.parametrize("cpp,python", [("kSlope", "LEAKY_RELU_SLOPE"), ("kAlpha", "QUICK_GELU_ALPHA")])
def test_activation_constants_in_cpp_equal_python(cpp, python):
    assert float(_cpp_constant("activations.h", cpp)) == getattr(activations, python)


def test_the_parser_sees_a_wrong_copy(tmp_path):
    (tmp_path / "philox.h").write_text("constexpr uint32_t kM0 = 0xD2511F54u;\n")
    assert int(_cpp_constant("philox.h", "kM0", tmp_path), 0) == dropout.PHILOX_M0 + 1


def test_triton_constants_are_the_python_ones():
    pytest.importorskip("triton")
    from adapterfast.kernels import activations as triton_activations, config, philox

    for name in ("PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "PHILOX_ROUNDS"):
        assert getattr(philox, name).value == getattr(dropout, name), name
    assert triton_activations.LEAKY_RELU_SLOPE.value == activations.LEAKY_RELU_SLOPE
    assert triton_activations.QUICK_GELU_ALPHA.value == activations.QUICK_GELU_ALPHA
    assert config.MAX_R == dispatch.TRITON_MAX_R


def test_reference_uses_the_activation_constants():
    import torch

    from adapterfast import reference

    h = torch.linspace(-3, 3, 13, dtype=torch.float64)
    assert torch.equal(reference.activate(h, "leaky_relu"), torch.where(h > 0, h, activations.LEAKY_RELU_SLOPE * h))
    assert torch.equal(reference.activate(h, "quick_gelu"), h * torch.sigmoid(activations.QUICK_GELU_ALPHA * h))
