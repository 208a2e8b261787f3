"""Property-based tests: random shapes, frames, relations, margins, dtypes, strides and training paths
against the float64 reference, under the rounding rule of utils.reference_failures.

CI runs the "ci" profile (300 fixed examples per backend); `make fuzz` runs the "fuzz" profile (5,000 random
examples per backend). Both profiles are registered in conftest.py.
"""
import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vrepa_kernels import trd_loss

from utils import assert_matches_reference, cpu_backends, cuda_cpu_kernels, route_torch_backend

# The training paths of the triton and cuda kernels (the torch backend ignores the argument).
ALGORITHMS = (["auto", "two_pass", "memory_minimal"] if "algorithm" in inspect.signature(trd_loss).parameters
              else [None])


@st.composite
def trd_cases(draw, max_tokens):
    frames = draw(st.integers(1, 5))
    per_frame = draw(st.integers(1, max(1, max_tokens // frames)))
    n = frames * per_frame
    relation = draw(st.sampled_from(["full", "spatial", "temporal"] if frames > 1 else ["full", "spatial"]))
    case = dict(
        batch=draw(st.integers(1, 3)), n=n, ds=draw(st.integers(1, 40)), dt=draw(st.integers(1, 40)),
        frames=frames, relation=relation, margin=draw(st.sampled_from([0.0, 0.01, 0.1, 0.5])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])), strided=draw(st.booleans()),
        algorithm=draw(st.sampled_from(ALGORITHMS)), seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case


def run_case(backend, case):
    if backend != "torch" and case["dtype"] == torch.float64:  # triton and the CUDA kernel take fp32 at most
        case = dict(case, dtype=torch.float32)
    kernel = cuda_cpu_kernels().get(backend)
    if kernel is not None:  # the CUDA kernel's CPU twin stands in for backend="torch"
        with pytest.MonkeyPatch.context() as patch:
            return run_case_on(route_torch_backend(patch, kernel), case)
    return run_case_on(backend, case)


def run_case_on(backend, case):
    gen = torch.Generator().manual_seed(case["seed"])
    width = 2 if case["strided"] else 1
    s = torch.randn(case["batch"], case["n"], case["ds"] * width, generator=gen, dtype=torch.float64)
    t = torch.randn(case["batch"], case["n"], case["dt"], generator=gen, dtype=torch.float64)
    s = s[..., ::width].to(case["dtype"]).requires_grad_(True)  # strided view when width == 2
    t = t.to(case["dtype"]).requires_grad_(case["seed"] % 2 == 0)
    extra = {} if case["algorithm"] is None else {"algorithm": case["algorithm"]}
    assert_matches_reference(backend, s, t, margin=case["margin"], relation=case["relation"],
                             num_frames=case["frames"], reduction=case["reduction"], **extra)


@pytest.mark.parametrize("backend", cpu_backends() + sorted(set(cuda_cpu_kernels()) & {"cuda-twin"}))
@given(data=st.data())
def test_matches_reference_on_random_cases(backend, data):
    run_case(backend, data.draw(trd_cases(40 if backend == "triton" else 70), label="case"))
