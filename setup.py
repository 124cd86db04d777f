"""Packaging for adapterfast.

``kernels/`` installs as ``adapterfast.kernels``. The fused CPU kernels in ``csrc/`` build as the
extension ``adapterfast._C`` unless ``ADAPTERFAST_BUILD_CPU=0``; when the build fails (no
compiler, no headers) the package still installs and the CPU backend reports why it is missing.
"""
import glob
import os
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    BuildExtension = CppExtension = None


class OptionalBuildExtension(BuildExtension or object):
    """Builds the CPU extension, but lets the install go on without it if compilation fails."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:
            print(f"adapterfast: building {ext.name} failed ({error}); the CPU backend will fall "
                  "back to the eager reference", file=sys.stderr)


def cpu_extensions():
    if os.environ.get("ADAPTERFAST_BUILD_CPU", "1") == "0" or CppExtension is None:
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    # -fno-trapping-math / -fno-math-errno (as PyTorch builds itself): lets the compiler vectorise
    # loops with float comparisons and math calls; no result changes.
    flags = ["-O3", "-fopenmp", "-DAT_PARALLEL_OPENMP=1", "-std=c++20", "-fno-trapping-math", "-fno-math-errno"]
    if os.uname().machine in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    extension = CppExtension(
        "adapterfast._C",
        sources,
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpu_extensions()

setup(
    name="adapterfast",
    version="0.1.0",
    description="Fused bottleneck adapters for PyTorch: Triton kernels for CUDA, C++ kernels for CPU",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["adapterfast", "adapterfast.integrations", "adapterfast.kernels"],
    package_dir={"adapterfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "hf": ["transformers>=4.46,<4.58", "peft>=0.21"],
        "adapterhub": ["adapters>=1.1,<1.4", "transformers>=4.46,<4.58"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ninja",
            "numpy",
            "matplotlib",
            "transformers>=4.57,<4.58",
            "peft>=0.21",
            "adapters==1.3.0",
            "accelerate",
        ],
    },
    entry_points={"console_scripts": ["adapterfast-demo=adapterfast.demo:main"]},
)
