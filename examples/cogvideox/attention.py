"""``--attention_backend``: CogVideoX attention through diffusers' attention dispatcher (flash, sage, ...).

diffusers' own CogVideoX processor always calls torch SDPA, so ``transformer.set_attention_backend`` does not
reach it; this processor computes the same joint text+video attention with the attention itself done by
``dispatch_attention_fn``. Not part of VideoREPA: only a speed option of the example.
"""
from __future__ import annotations

import importlib.util

import torch


class DispatchCogVideoXAttnProcessor:
    """CogVideoX's joint text+video attention, with the attention done by diffusers' dispatcher."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("DispatchCogVideoXAttnProcessor does not take an attention mask")
        text_len = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = joint.shape[0]
        split = lambda x: x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        query, key, value = split(attn.to_q(joint)), split(attn.to_k(joint)), split(attn.to_v(joint))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    backend=self.backend)  # [B, S, H, D] in and out
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
        return out[:, text_len:], out[:, :text_len]


def configure_attention(transformer, backend: str) -> None:
    """``native`` keeps diffusers' CogVideoX processor (torch SDPA); any other name routes through the dispatcher."""
    if backend == "native":
        return
    if backend.startswith("flash") and "hub" not in backend and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(f"--attention_backend {backend} needs flash-attn: pip install vrepa-kernels[flash]")
    from diffusers.models.attention_dispatch import AttentionBackendName

    try:
        name = AttentionBackendName(backend)
    except ValueError as err:
        valid = ", ".join(sorted(b.value for b in AttentionBackendName))
        raise ValueError(f"--attention_backend {backend!r} is not one of diffusers' backends: {valid}") from err
    transformer.set_attn_processor(DispatchCogVideoXAttnProcessor(name))
