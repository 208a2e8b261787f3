"""GPU correctness at realistic shapes, every backend against the reference. Skipped without CUDA."""
import pytest
import torch

from vrepa_kernels import sign_map, trd_loss

from utils import assert_bitwise_repeatable, assert_matches_reference, make_pair, requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]
GPU_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("relation", ["full", "spatial", "temporal"])
def test_videorepa_shape(backend, dtype, relation):
    # VideoREPA's own shape: B = 2, F = 24 frames of T = 150 tokens, D = 768.
    s, t = make_pair((2, 24, 150, 768), 768, dtype=dtype, device="cuda")
    assert_matches_reference(backend, s, t, relation=relation)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_student_wider_than_teacher(backend):
    s, t = make_pair((1, 1000, 1920), 768, dtype=torch.bfloat16, device="cuda", grad_teacher=True)
    assert_matches_reference(backend, s, t, relation="temporal", num_frames=8)


@pytest.mark.parametrize("backend, algorithm, deterministic",
                         [("triton", "two_pass", False), ("triton", "memory_minimal", False),
                          ("triton", "memory_minimal", True), ("cuda", "two_pass", False),
                          ("cuda", "memory_minimal", False), ("cuda", "memory_minimal", True),
                          ("torch", "auto", False)])
def test_cogvideox_full_grid(backend, algorithm, deterministic):
    # N = 13 * 30 * 45 = 17,550 tokens: the float64 reference needs ~30 GB here, which an H100 holds.
    s, t = make_pair((1, 17_550, 768), 768, dtype=torch.bfloat16, device="cuda")
    assert_matches_reference(backend, s, t, deterministic=deterministic, algorithm=algorithm)
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_two_pass_memory_is_the_map_plus_feature_sized_buffers(backend):
    n, d = 17_550, 768
    s, t = make_pair((1, n, d), d, dtype=torch.bfloat16, device="cuda")
    trd_loss(s, t, backend=backend, algorithm="two_pass").backward()  # compile outside the measurement
    s.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trd_loss(s, t, backend=backend, algorithm="two_pass").backward()
    extra = torch.cuda.max_memory_allocated() - base
    # The map (39 MB), fp32 gradients and normalisation temporaries (a few N x D), never N x N (1.2 GB in fp32).
    assert extra <= sign_map.map_bytes(1, n) + 6 * n * d * 4 + 64 * 2**20, extra


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic_is_bitwise_repeatable_on_gpu(backend):
    s, t = make_pair((2, 3000, 768), 768, dtype=torch.bfloat16, device="cuda")
    assert_bitwise_repeatable(backend, s, t, deterministic=True)


def test_720p_grid_runs_and_matches_closed_form():
    # N = 21 * 45 * 80 = 75,600 (B * N^2 > 2^31): one-dimensional features give a closed-form loss
    # (see test_torch_backend.py), and a D = 768 training pass completes without an N x N tensor.
    n, margin = 75_600, 0.25
    s = torch.randn(1, n, 1, device="cuda")
    t = torch.randn(1, n, 1, device="cuda")
    c = torch.sign(s) * torch.sign(t)
    differ = 2 * (c > 0).sum().double() * (c < 0).sum().double()
    for backend in GPU_BACKENDS:
        got = trd_loss(s.float(), t.float(), margin=margin, reduction="sum", backend=backend)
        torch.testing.assert_close(got.double(), differ * (2 - margin), rtol=1e-5, atol=0)
    s, t = make_pair((1, n, 768), 768, dtype=torch.bfloat16, device="cuda")
    for algorithm in ("two_pass", "memory_minimal"):
        s.grad = None
        torch.cuda.reset_peak_memory_stats()
        loss = trd_loss(s, t, backend="triton", algorithm=algorithm)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        assert torch.cuda.max_memory_allocated() < 8 * 2**30  # one N x N fp32 matrix alone is 21 GiB


@pytest.mark.parametrize("backend, algorithm", [("torch", "auto"), ("triton", "two_pass"),
                                                ("triton", "memory_minimal"), ("cuda", "two_pass")])
def test_cuda_graph_capture(backend, algorithm):
    s, t = make_pair((2, 1024, 256), 256, dtype=torch.bfloat16, device="cuda")
    s_static = s.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        trd_loss(s_static, t, backend=backend, algorithm=algorithm).backward()
    torch.cuda.current_stream().wait_stream(stream)
    s_static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = trd_loss(s_static, t, backend=backend, deterministic=True, algorithm=algorithm)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    eager = trd_loss(s.detach(), t, backend=backend, deterministic=True, algorithm=algorithm)
    torch.testing.assert_close(loss, eager)


def test_autocast_cuda_equals_explicit_bfloat16():
    s, t = make_pair((2, 600, 128), 96, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        amp = trd_loss(s, t, relation="spatial", num_frames=4)
    explicit = trd_loss(s.bfloat16(), t.bfloat16(), relation="spatial", num_frames=4)
    assert torch.equal(amp, explicit)


def test_torch_compile_fullgraph_on_gpu():
    s, t = make_pair((2, 900, 128), 64, dtype=torch.bfloat16, device="cuda")
    fn = torch.compile(lambda a, b: trd_loss(a, b, relation="temporal", num_frames=9), fullgraph=True)
    torch.testing.assert_close(fn(s, t), trd_loss(s, t, relation="temporal", num_frames=9))
