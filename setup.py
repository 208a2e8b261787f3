"""The single build entry of vrepa_kernels.

The package is pure Python plus optional compiled parts; it installs without a GPU, nvcc or Triton.
torch is a dependency but never pinned here: install the build that fits your machine first.

Compiled parts (CMakeLists.txt, csrc/README.md): ``_C_cpu`` (the CPU twin, any C++17 compiler),
``_C_cuda`` (the CUDA kernels: fused, relation pass, gradient pass; nvcc) and ``_C_emulator`` (the
kernels' code on the CPU, for tests; built with ``_C_cuda``). None links libtorch. A part that cannot be built is skipped
with the reason printed and recorded in vrepa_kernels/_build_info.json; the install still succeeds.
Switches: VREPA_SKIP_CUDA=1, VREPA_CUDA_ARCHS="80;90a", MAX_JOBS=N, VREPA_REQUIRE_CUDA=1 (fail instead
of skipping when the CUDA part does not build).
"""
import json
import os
import shutil
import subprocess
import sys
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_build_info.json"
PARTS = {"cpu": "_C_cpu", "cuda": "_C_cuda", "emulator": "_C_emulator"}  # record key -> module


def _say(message):
    print(f"vrepa_kernels: {message}", flush=True)


def _find_tool(name, module_name=None):
    """A tool on PATH, else the copy a pip package (cmake, ninja) ships."""
    found = shutil.which(name)
    if found:
        return found
    if module_name:
        try:
            module = __import__(module_name)
            candidate = os.path.join(module.BIN_DIR, name)
            if os.path.exists(candidate):
                return candidate
        except (ImportError, AttributeError):
            pass
    return None


def _find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def _tail(text, lines=25):
    return "\n".join(text.strip().splitlines()[-lines:])


def _first_error(text):
    """The first line that reports an error (one line for the build record), else the last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for marker in ("error:", "cmake error", "error"):
        found = next((line for line in lines if marker in line.lower()), None)
        if found:
            return found
    return lines[-1] if lines else "no output"


def _failed(record, part, what, result):
    """Record a failed step: a one-line reason plus the log's tail."""
    output = (result.stdout or "") + (result.stderr or "")
    record[part]["reason"] = f"{what}: {_first_error(output)}"
    record[part]["log"] = _tail(output)
    _say(f"{record[part]['reason']}\n{record[part]['log']}")


class CMakeExtension(Extension):
    def __init__(self, name, part):
        super().__init__(name, sources=[])
        self.part = part  # "cpu" or "cuda"


class CMakeBuild(build_ext):
    """One CMake configure + build (Ninja) for both modules; skips what cannot be built and says why."""

    def run(self):
        inplace = self.inplace or getattr(self, "editable_mode", False)
        super().run()
        if inplace:  # setuptools copies the built modules into the source tree; the record goes with them
            src = os.path.join(getattr(self, "_built_dir", ""), BUILD_INFO)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(ROOT, "vrepa_kernels", BUILD_INFO))
            package = os.path.join(ROOT, "vrepa_kernels")
            built = {os.path.basename(self.get_ext_filename(e.name)) for e in self.extensions}
            prefixes = tuple(f"{name}." for name in PARTS.values())
            for stale in os.listdir(package):  # a module this build skipped must not outlive it
                if stale.startswith(prefixes) and stale.endswith((".so", ".pyd")) and stale not in built:
                    _say(f"removing {stale}, left by an earlier build")
                    os.remove(os.path.join(package, stale))

    def _output_dir(self):
        return os.path.dirname(os.path.abspath(self.get_ext_fullpath(self.extensions[0].name if self.extensions
                                                                          else "vrepa_kernels._C_cpu")))

    def build_extensions(self):
        out_dir = self._built_dir = self._output_dir()  # build_lib here: setuptools sets inplace=False during run
        os.makedirs(out_dir, exist_ok=True)
        record = {part: {"built": False, "reason": ""} for part in PARTS}
        started = time.time()
        try:
            self._build(out_dir, record)
        finally:
            record["seconds"] = round(time.time() - started, 1)
            for part, name in PARTS.items():
                record[part]["built"] = os.path.exists(self.get_ext_fullpath(f"vrepa_kernels.{name}"))
                if part == "emulator" and not record[part]["built"] and not record[part]["reason"]:
                    record[part]["reason"] = "built only with the CUDA extension: " + (record["cuda"]["reason"]
                                                                                        or "see the log above")
                if not record[part]["built"]:
                    _say(f"{name} not built: {record[part]['reason'] or 'see the log above'}")
            with open(os.path.join(out_dir, BUILD_INFO), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            # Only modules that exist are outputs (editable installs copy them into the source tree).
            self.extensions = [e for e in self.extensions if os.path.exists(self.get_ext_fullpath(e.name))]
            _say(f"compiled extensions in {record['seconds']} s")
        if os.environ.get("VREPA_REQUIRE_CUDA") == "1" and not record["cuda"]["built"]:
            raise RuntimeError(f"VREPA_REQUIRE_CUDA=1 but _C_cuda was not built: {record['cuda']['reason']}")

    def _build(self, out_dir, record):
        cmake = _find_tool("cmake", "cmake")
        if cmake is None:
            for part in PARTS:
                record[part]["reason"] = "cmake was not found (install it, e.g. `pip install cmake`)"
            return
        try:
            import pybind11
        except ImportError:
            for part in PARTS:
                record[part]["reason"] = "pybind11 is not installed (`pip install pybind11`)"
            return

        build_cuda, nvcc = True, None
        if os.environ.get("VREPA_SKIP_CUDA") == "1":
            build_cuda, record["cuda"]["reason"] = False, "skipped: VREPA_SKIP_CUDA=1"
        else:
            nvcc = _find_nvcc()
            if nvcc is None:
                build_cuda = False
                record["cuda"]["reason"] = ("nvcc was not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH and "
                                            "/usr/local/cuda/bin)")
        if not build_cuda:
            _say(f"skipping the CUDA extension: {record['cuda']['reason']}")

        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_dir, exist_ok=True)
        ninja = _find_tool("ninja", "ninja")
        archs = os.environ.get("VREPA_CUDA_ARCHS", "80;90a").replace(",", ";").replace(" ", ";")
        args = [
            cmake, "-S", ROOT, "-B", build_dir,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DVREPA_OUTPUT_DIR={out_dir}",
            f"-DVREPA_CUDA_ARCHS={archs}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        else:
            _say("ninja was not found; using CMake's default generator")

        def configure(with_cuda):
            flags = [f"-DVREPA_BUILD_CUDA={'ON' if with_cuda else 'OFF'}"]
            if with_cuda:
                flags.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            return subprocess.run(args + flags, capture_output=True, text=True)

        def build(*targets):
            jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
            cmd = [cmake, "--build", build_dir, "-j", jobs] + (["--target", *targets] if targets else [])
            _say(f"building ({', '.join(targets) or 'all'}; {jobs} jobs): " + " ".join(cmd))
            return subprocess.run(cmd, capture_output=True, text=True)

        result = configure(build_cuda)
        if result.returncode != 0 and build_cuda:
            _failed(record, "cuda", f"CMake could not configure CUDA with {nvcc}", result)
            shutil.rmtree(build_dir, ignore_errors=True)
            os.makedirs(build_dir, exist_ok=True)
            build_cuda = False
            result = configure(False)
        if result.returncode != 0:
            _failed(record, "cpu", "CMake configuration failed", result)
            if not record["cuda"]["reason"]:
                record["cuda"].update(reason=record["cpu"]["reason"], log=record["cpu"]["log"])
            return

        result = build()
        if result.returncode != 0 and build_cuda:
            _failed(record, "cuda", "the CUDA build failed", result)
            result = build("_C_cpu", "_C_emulator")
        if result.returncode != 0:
            _failed(record, "cpu", "the C++ build failed", result)


setup(
    name="vrepa-kernels",
    version="0.1.0",
    description="Fused blockwise Token Relation Distillation (TRD) loss for VideoREPA finetuning",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vrepa_kernels", "vrepa_kernels.*"]),
    package_data={"vrepa_kernels": ["backends/*.json"]},
    ext_modules=[CMakeExtension(f"vrepa_kernels.{name}", part) for part, name in PARTS.items()],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch"],
    extras_require={
        "triton": ["triton"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
        "test": ["pytest", "hypothesis", "numpy", "pytest-benchmark", "matplotlib", "tqdm"],
        "diffusers": ["diffusers", "transformers", "accelerate", "peft", "tqdm"],
        "flash": ["flash-attn"],
    },
    license="Apache-2.0",
)
