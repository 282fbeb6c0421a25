"""adapt_fast package. kernels/ is installed as adapt_fast.kernels; the native packer is optional.

The native packer (adapt_fast._native_packer, csrc/packer.cpp) is built through CMake when cmake,
a C++ compiler and pybind11 are present; otherwise the build prints a note and the package installs
without it (adapt_fast.data.pack falls back to Python). ADAPT_FAST_REQUIRE_NATIVE=1 makes that an error.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt rather than by setuptools' compiler."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


class CMakeBuild(build_ext):
    """Runs CMake for CMakeExtension; skips with a note when the tools are missing or the build fails."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._build_cmake(ext)
        except Exception as e:  # the extension is optional: never fail the install
            if os.environ.get("ADAPT_FAST_REQUIRE_NATIVE") == "1":
                raise
            print(f"note: skipping the native packer {ext.name} ({e}); the Python packer will be used", file=sys.stderr)

    def _build_cmake(self, ext: CMakeExtension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH")
        cxx = os.environ.get("CXX", "").split()
        if not (cxx and shutil.which(cxx[0])) and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            raise RuntimeError("no C++ compiler found")
        try:
            import pybind11
        except ImportError:
            raise RuntimeError("pybind11 is not installed in the build environment") from None

        pybind11_dir = pybind11.get_cmake_dir()
        # A persistent build folder makes re-installs incremental; a different source tree, Python or
        # pybind11 (a copied checkout, another venv) starts it afresh.
        build_dir = ROOT / "build" / f"native-{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        key = "\n".join([str(ROOT), sys.executable, pybind11_dir])
        key_file = build_dir / "adapt_fast_build_key"
        if build_dir.exists() and (not key_file.exists() or key_file.read_text() != key):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)

        out_dir = build_dir / "out"
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DPACKER_OUTPUT_DIR={out_dir}",
        ]  # fmt: skip
        build = [cmake, "--build", str(build_dir), "--config", "Release", "-j", str(os.cpu_count() or 1)]
        for cmd in (configure, build):
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                print(r.stdout[-4000:], file=sys.stderr)
                raise RuntimeError(f"`{' '.join(cmd[:2])}` failed with exit code {r.returncode}")

        name = ext.name.rpartition(".")[2]
        built = sorted(out_dir.glob(f"{name}*{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"))
        if not built:
            raise RuntimeError(f"CMake did not produce {name} in {out_dir}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[-1], dest)
        print(f"built the native packer: {dest}", file=sys.stderr)


setup(
    name="adapt_fast",
    version="0.1.0",
    description="Budget-constrained multi-task instruction tuning with a learned task mixture (ADAPT)",
    python_requires=">=3.11",
    packages=[
        "adapt_fast",
        "adapt_fast.data",
        "adapt_fast.mixture",
        "adapt_fast.model",
        "adapt_fast.kernels",
    ],
    package_dir={"adapt_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.17",
        "tokenizers",
        "datasets",
        "deepspeed",
        "accelerate",  # transformers' ZeRO-3 loading (HfDeepSpeedConfig)
        "numpy",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "pyyaml",
    ],
    extras_require={"bench": ["liger-kernel", "cut-cross-entropy", "trl"], "test": ["pytest", "ruff"]},
    ext_modules=[CMakeExtension("adapt_fast._native_packer")],
    cmdclass={"build_ext": CMakeBuild},
)
