"""One module per backend; each exposes ``pair_sums(s_hat, t_hat, spec, need_s, need_t, deterministic)``."""
