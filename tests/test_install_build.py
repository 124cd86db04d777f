"""What a failed C++ build does to an install (``setup.py``'s ``ADAPTERFAST_BUILD_CPU``).

A broken compiler (``CXX=/bin/false``: torch's compiler check fails before any source is compiled)
must not fail a plain install, and must fail one that requires the CPU backend
(``ADAPTERFAST_BUILD_CPU=1``, what ``make test`` sets on a machine with a compiler).
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_ext(tmp_path, **env_extra):
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERFAST_BUILD_CPU"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", "lib", "--build-temp", "tmp"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_broken_compiler_does_not_fail_a_plain_install(tmp_path):
    pytest.importorskip("torch.utils.cpp_extension")
    done = build_ext(tmp_path, CXX="/bin/false")
    assert done.returncode == 0, done.stderr
    assert "building adapterfast._C failed" in done.stderr
    assert not list(tmp_path.rglob("_C*.so"))


def test_broken_compiler_fails_a_required_build(tmp_path):
    pytest.importorskip("torch.utils.cpp_extension")
    done = build_ext(tmp_path, CXX="/bin/false", ADAPTERFAST_BUILD_CPU="1")
    assert done.returncode != 0
    assert "ADAPTERFAST_BUILD_CPU=1 requires it" in done.stderr


def test_skipped_build_compiles_nothing(tmp_path):
    done = build_ext(tmp_path, CXX="/bin/false", ADAPTERFAST_BUILD_CPU="0")
    assert done.returncode == 0, done.stderr
    assert "failed" not in done.stderr


def test_bad_setting_is_named(tmp_path):
    done = build_ext(tmp_path, ADAPTERFAST_BUILD_CPU="yes")
    assert done.returncode != 0
    assert "ADAPTERFAST_BUILD_CPU must be 0" in done.stderr
