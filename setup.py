"""The single build entry of vrepa_kernels.

The package is pure Python plus optional compiled parts; it installs without a GPU, nvcc or Triton.
torch is a dependency but never pinned here: install the build that fits your machine first.
"""
from setuptools import find_packages, setup

setup(
    name="vrepa-kernels",
    version="0.1.0",
    description="Fused blockwise Token Relation Distillation (TRD) loss for VideoREPA finetuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vrepa_kernels", "vrepa_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch"],
    extras_require={
        "triton": ["triton"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
        "test": ["pytest", "hypothesis", "numpy", "pytest-benchmark", "matplotlib", "tqdm"],
    },
    license="Apache-2.0",
)
