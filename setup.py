"""Packaging for adapterfast.

``kernels/`` installs as ``adapterfast.kernels``. The fused CPU kernels in ``csrc/`` build as the
extension ``adapterfast._C``; ``ADAPTERFAST_BUILD_CPU`` decides what a failed build means:

- unset (a plain ``pip install``): optional. When the build fails (no or a broken compiler, no
  headers; torch's compiler check included) the package still installs, says
  "building adapterfast._C failed" on stderr, and the CPU backend reports why it is missing;
- ``1`` (``make test`` on a machine with a C++ compiler): required, a failed build fails the install;
- ``0``: not built.
"""
import glob
import os
import sys
import sysconfig

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    BuildExtension = CppExtension = None


BUILD_CPU = os.environ.get("ADAPTERFAST_BUILD_CPU", "")
if BUILD_CPU not in ("", "0", "1"):
    raise SystemExit(f"ADAPTERFAST_BUILD_CPU must be 0 (skip the C++ build), 1 (require it) or unset "
                     f"(build it if possible), got {BUILD_CPU!r}")


class OptionalBuildExtension(BuildExtension or object):
    """Builds the CPU extension; unless ``ADAPTERFAST_BUILD_CPU=1``, lets the install go on without it
    when anything in the build fails, torch's compiler/ABI check (``build_extensions``) included."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as error:
            self._failed(self.extensions[0].name if self.extensions else "adapterfast._C", error)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:
            self._failed(ext.name, error)

    @staticmethod
    def _failed(name, error):
        if BUILD_CPU == "1":
            raise RuntimeError(f"adapterfast: building {name} failed ({error}) and ADAPTERFAST_BUILD_CPU=1 "
                               "requires it (unset it to install without the CPU backend)") from error
        print(f"adapterfast: building {name} failed ({error}); the CPU backend will fall "
              "back to the eager reference", file=sys.stderr)


def path_hook_data_files():
    """``adapterfast_path_hook.pth`` for the root of site-packages (as a data file, so that editable
    installs get it too): one line, run at interpreter start, that keeps a checkout's top-level
    ``kernels/`` from shadowing other packages of that name (see ``_adapterfast_path_hook.py``)."""
    site_packages = os.path.relpath(sysconfig.get_path("purelib"), sysconfig.get_path("data"))
    return [(site_packages, ["adapterfast_path_hook.pth"])]


class EditableWheelWithData(editable_wheel):
    """setuptools' editable install, which also installs ``data_files`` (setuptools 84 skips them in
    editable mode: it asks the distribution for ``has_data``, which does not exist)."""

    def _run_install(self, category: str):
        if category == "data" and self.distribution.has_data_files():
            self.run_command("install_data")
            return
        super()._run_install(category)


def cpu_extensions():
    if CppExtension is None and BUILD_CPU == "1":
        raise SystemExit("ADAPTERFAST_BUILD_CPU=1 requires building adapterfast._C, which needs torch at build time "
                         "(pip install --no-build-isolation after installing torch)")
    if BUILD_CPU == "0" or CppExtension is None:
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
    py_modules=["_adapterfast_path_hook"],
    data_files=path_hook_data_files(),
    package_dir={"adapterfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"editable_wheel": EditableWheelWithData, **cmdclass},
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # transformers 4.46 through 5.x (tested: 4.57.6 and 5.24.0) for add_adapters and the PEFT method.
        "hf": ["transformers>=4.46,<6", "peft>=0.21"],
        # AdapterHub's adapters pins its own transformers line (adapters 1.3: transformers 4.57.x).
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
