"""The checkout's top-level ``kernels/`` (installed as ``adapterfast.kernels``) shadows nothing.

Each test starts a fresh Python in the repository root, where the checkout is on ``sys.path``
(as for ``python script.py`` or ``python -m pytest`` there), with adapterfast installed as
``make test`` installs it (its ``adapterfast_path_hook.pth`` in site-packages).
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_root(code: str, env_extra: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def test_checkout_is_on_sys_path_and_has_kernels_folder():
    out = run_in_root("import sys, os; print(os.getcwd() in [os.path.abspath(p or '.') for p in sys.path])")
    assert out.strip() == "True"
    assert os.path.isfile(os.path.join(ROOT, "kernels", "__init__.py"))


def test_top_level_kernels_is_not_found_in_the_checkout():
    out = run_in_root("""
        import importlib.util
        print(importlib.util.find_spec("kernels"))
        import adapterfast.kernels
        print(adapterfast.kernels.__name__)
    """)
    assert out.split() == ["None", "adapterfast.kernels"]


def test_a_real_kernels_package_wins_over_the_checkout(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("__version__ = '9.9.9'\n")
    out = run_in_root("""
        import kernels, adapterfast.kernels
        print(kernels.__version__, kernels.__file__ != adapterfast.kernels.__file__)
    """, {"PYTHONPATH": str(tmp_path)})
    assert out.split() == ["9.9.9", "True"]


@pytest.mark.slow
def test_transformers_model_imports_and_runs_from_the_checkout():
    pytest.importorskip("transformers")
    out = run_in_root("""
        import torch, transformers
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64)
        model = LlamaForCausalLM(config)
        logits = model(torch.randint(0, 64, (1, 5))).logits
        print(transformers.__version__, tuple(logits.shape))
    """)
    assert out.split()[-3:] == ["(1,", "5,", "64)"]
