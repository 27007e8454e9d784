"""Vision Transformer (pre-norm, class token, learned position embeddings) in Flax linen.

    z₀ = [x_cls; x_1 E; …; x_N E] + E_pos
    z'_ℓ = z_{ℓ−1} + MSA(LN(z_{ℓ−1})),   z_ℓ = z'_ℓ + MLP(LN(z'_ℓ))
    logits = head(LN(z_L)[cls])

Module names follow timm's ``VisionTransformer`` keys (``patch_embed``, ``cls_token``,
``pos_embed``, ``blocks_{i}/{norm1,attn/qkv,attn/proj,norm2,mlp/fc1,mlp/fc2}``, ``norm``,
``head``) so the checkpoint loader is a rename, LayerNorms carry ``norm`` in their names, and the classifier is
``head``. LayerNorm ε = 1e-6 and the exact (erf) GELU, as in timm and the original ViT release.

When the input's patch grid differs from the grid of ``pos_embed`` the grid part of the position
embeddings is resized bilinearly (:func:`resample_pos_embed`, the "high-res fine-tuning" of
Dosovitskiy et al.); the class-token entry is kept.

References:
  Dosovitskiy et al. An Image is Worth 16x16 Words. ICLR 2021.
  Lim et al. Flat Posterior Does Matter For Bayesian Model Averaging. arXiv 2406.15664.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

VIT_CONFIGS = {
    "ti": dict(hidden_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "s": dict(hidden_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "b": dict(hidden_dim=768, depth=12, num_heads=12, mlp_dim=3072),
}

_LN_EPS = 1e-6


def resample_pos_embed(pos_embed: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Resizes ``(1, 1 + h·w, D)`` position embeddings (class token first) to a new patch grid.

    The h×w grid (h = w = sqrt(N) for the stored embeddings) is resized with bilinear interpolation
    at pixel centres and no anti-aliasing — the same map as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``; the class-token
    embedding is left unchanged.

    Args:
      pos_embed: ``(1, 1 + N, D)`` array with N a perfect square.
      grid: the target patch grid ``(h, w)``.

    Returns:
      ``(1, 1 + h·w, D)`` array.
    """
    n = pos_embed.shape[1] - 1
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(
            f"pos_embed has {n} grid entries (+1 class token), not a square grid; cannot resample.")
    if (old, old) == tuple(grid):
        return pos_embed
    d = pos_embed.shape[-1]
    cls, body = pos_embed[:, :1], pos_embed[0, 1:].reshape(old, old, d)
    body = jax.image.resize(body, (grid[0], grid[1], d), method="bilinear", antialias=False)
    return jnp.concatenate([cls, body.reshape(1, grid[0] * grid[1], d).astype(pos_embed.dtype)], 1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.num_heads
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        return nn.Dense(d, name="proj")(out)


class Mlp(nn.Module):
    """fc1 → GELU (exact) → fc2."""

    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x), approximate=False)
        return nn.Dense(d, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(·))."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.num_heads, name="attn")(nn.LayerNorm(_LN_EPS, name="norm1")(x))
        return x + Mlp(self.mlp_dim, name="mlp")(nn.LayerNorm(_LN_EPS, name="norm2")(x))


class ViT(nn.Module):
    """Vision Transformer classifier with class-token pooling.

    Attributes:
      num_classes: outputs of ``head``.
      patch_size: side of the square patches.
      hidden_dim, depth, num_heads, mlp_dim: transformer sizes (see ``VIT_CONFIGS``).
      image_size: the input side the ``pos_embed`` parameter is created for; other input sizes
        (multiples of ``patch_size``) are served by resampling it on the fly.
    """

    num_classes: int
    patch_size: int = 16
    hidden_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout / stochastic depth: the same function in both modes.
        p, d = self.patch_size, self.hidden_dim
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"Image size {x.shape[1:3]} is not a multiple of patch size {p}.")
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
        b, h, w, _ = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d), jnp.float32)
        g = self.image_size // p
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + g * g, d), jnp.float32)
        pos = resample_pos_embed(pos, (h, w))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_dim, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(_LN_EPS, name="norm")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


def vit(variant: str, num_classes: int, patch_size: int = 16, image_size: int = 224) -> ViT:
    """ViT-{Ti,S,B}/patch_size by name (``variant`` in ``VIT_CONFIGS``)."""
    if variant not in VIT_CONFIGS:
        raise ValueError(f"Unknown ViT variant {variant!r}; choose one of {sorted(VIT_CONFIGS)}.")
    return ViT(num_classes=num_classes, patch_size=patch_size, image_size=image_size,
               **VIT_CONFIGS[variant])
