"""One module per backend; each exposes ``pair_sums(s_hat, t_hat, spec, need_s, need_t, deterministic)``."""


def pair_kernel(name: str):
    """The ``pair_sums`` function of backend ``name`` ("torch", "triton" or "cuda")."""
    if name == "torch":
        from .torch_blockwise import pair_sums
    elif name == "triton":
        from .triton_kernels import pair_sums
    elif name == "cuda":
        from .cuda import pair_sums
    else:
        raise ValueError(f"no blockwise kernel for backend {name!r}")
    return pair_sums
