"""Confidence-weighted (probabilistic) attention on ``F.scaled_dot_product_attention``.

Koleilat et al., "MedCLIPSeg: Probabilistic Vision-Language Adaptation for Data-Efficient and
Generalizable Medical Image Segmentation" (CVPR 2026), eqs. 7-9. Keys are diagonal Gaussians
``K_j ~ N(K_mu_j, diag(K_var_j))`` and the query is deterministic, so the score ``q_i . K_j`` has

    S_mu    = q K_mu^T * scale                    (mean,      eq. 7)
    S_sig^2 = (q * q) K_var^T * scale^2           (variance,  eq. 7; scale^2 = 1 / d by default)
    A       = softmax(S_mu - beta * sqrt(S_sig^2)) (eqs. 8-9)
    out     = A V

The penalty ``-beta * sqrt(S_sig^2)`` is one matmul plus in-place element-wise ops inside a small
``autograd.Function`` (exact gradient, zero at ``S_sig^2 = 0`` instead of ``inf``), and enters SDPA as
its additive float ``attn_mask`` together with the key padding mask -- option 1 of
``specs/ecosystem.md`` section 6.2. No Triton, no custom kernels: the same code runs on CPU and CUDA and
under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = ["probabilistic_attention"]


class _ConfidencePenalty(torch.autograd.Function):
    """``-beta * sqrt(clamp(scale^2 (q*q) k_var^T, 0))``, padded keys set to the dtype's minimum.

    Only one ``(B, H, N, M)`` tensor is allocated -- the output, which SDPA keeps as its mask anyway --
    and backward reuses it: with ``r = (scale*beta)^2 (q*q) k_var^T`` and ``pen = -sign(beta) sqrt(r)``,
    ``d pen / d r = 1 / (2 pen)``, taken as 0 where ``pen = 0`` (a zero query or zero variance).
    """

    @staticmethod
    def forward(ctx, q, k_var, beta: float, scale: float, key_valid: Tensor | None):
        weight = (scale * beta) ** 2
        pen = torch.matmul(q.square().mul_(weight), k_var.transpose(-1, -2))
        # clamp first: rounding (or a negative variance) must not reach sqrt
        pen.clamp_(min=0).sqrt_()
        if beta > 0:
            pen.neg_()
        if key_valid is not None:
            pen.masked_fill_(~key_valid, torch.finfo(pen.dtype).min)
        ctx.weight = weight
        ctx.save_for_backward(q, k_var, pen)
        return pen

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pen):
        q, k_var, pen = ctx.saved_tensors
        # 1 / (2 pen); pen = +-0 gives +-inf, mapped to the zero subgradient. Padded keys
        # (pen = finfo.min) get ~0 and receive exactly zero gradient from the softmax anyway.
        grad_r = pen.reciprocal().nan_to_num_(posinf=0.0, neginf=0.0).mul_(grad_pen).mul_(0.5)
        grad_q = grad_k_var = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.matmul(grad_r, k_var).mul_(q).mul_(2.0 * ctx.weight)
        if ctx.needs_input_grad[1]:
            grad_k_var = torch.matmul(grad_r.transpose(-1, -2), q.square().mul_(ctx.weight))
        return grad_q, grad_k_var, None, None, None


def _attend(
    q: Tensor,
    k_mu: Tensor,
    k_var: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    beta: float,
    scale: float,
) -> Tensor:
    """One SDPA call on 4-D inputs; ``key_valid`` is ``(B, 1, 1, M)`` bool or None."""
    if beta != 0.0:
        bias = _ConfidencePenalty.apply(q, k_var, beta, scale, key_valid)
    elif key_valid is not None:
        bias = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~key_valid, torch.finfo(q.dtype).min)
    else:
        bias = None
    return F.scaled_dot_product_attention(q, k_mu, v, attn_mask=bias, scale=scale)


def _check_inputs(q: Tensor, k_mu: Tensor, k_var: Tensor, v: Tensor) -> None:
    names = ("q", "k_mu", "k_var", "v")
    tensors = (q, k_mu, k_var, v)
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.dim() not in (3, 4):
        raise ValueError(f"q must have shape (B, H, N, d) or (B, N, d), got {tuple(q.shape)}")
    lead = "(B, H, " if q.dim() == 4 else "(B, "
    for name, t in zip(names[1:], tensors[1:]):
        if t.dim() != q.dim():
            raise ValueError(
                f"{name} must have {q.dim()} dims like q, i.e. shape {lead}M, d), "
                f"got {tuple(t.shape)}"
            )
    head = q.shape[:-2]
    d = q.shape[-1]
    if k_mu.shape[:-2] != head or k_mu.shape[-1] != d:
        raise ValueError(
            f"k_mu must have shape {lead}M, d) = {(*head, 'M', d)} to match q {tuple(q.shape)}, "
            f"got {tuple(k_mu.shape)}"
        )
    if k_var.shape != k_mu.shape:
        raise ValueError(
            f"k_var must have the same shape as k_mu {tuple(k_mu.shape)}, got {tuple(k_var.shape)}"
        )
    m = k_mu.shape[-2]
    if v.shape[:-1] != k_mu.shape[:-1]:
        raise ValueError(
            f"v must have shape {lead}M, dv) = {(*head, m, 'dv')} to match k_mu, "
            f"got {tuple(v.shape)}"
        )
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(
            "q, k_mu, k_var and v must share one dtype, got "
            + ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        )


def _check_mask(key_padding_mask: Tensor, batch: int, m: int, device: torch.device) -> Tensor:
    if key_padding_mask.dim() != 2 or tuple(key_padding_mask.shape) != (batch, m):
        raise ValueError(
            f"key_padding_mask must have shape (B, M) = ({batch}, {m}), "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
        raise ValueError(
            "key_padding_mask must be bool or integer (True / 1 = real token, False / 0 = padding), "
            f"got dtype {key_padding_mask.dtype}; additive float masks are not accepted"
        )
    return key_padding_mask.to(device=device, dtype=torch.bool)


def probabilistic_attention(
    q: Tensor,
    k_mu: Tensor,
    k_var: Tensor,
    v: Tensor,
    *,
    beta: float = 2.35,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Confidence-weighted attention ``softmax(S_mu - beta * S_sigma) V`` (MedCLIPSeg eqs. 7-9).

    With ``s = scale`` (default ``1 / sqrt(d)``)::

        S_mu      = s * q k_mu^T
        S_sigma^2 = s^2 * (q * q) k_var^T      # variance of s * q.K for K ~ N(k_mu, diag(k_var))
        out       = softmax(S_mu - beta * sqrt(S_sigma^2), over keys) v

    ``beta = 0`` is ordinary scaled dot-product attention (``k_var`` is then unused and gets no
    gradient). ``beta = 2.35`` is the paper's value (the
    FWHM of a unit Gaussian). The penalty is computed with one matmul, clamped at 0 before the square
    root (its gradient is taken as 0 where ``S_sigma^2 = 0``) and passed with the padding mask as one
    additive float ``attn_mask`` to :func:`torch.nn.functional.scaled_dot_product_attention`.

    Under autocast, float32 inputs are cast to the autocast dtype first, so the penalty, the mask
    and SDPA run in one dtype; the output has that dtype.

    Args:
        q: ``(B, H, N, d)`` queries, or ``(B, N, d)`` (one head).
        k_mu: ``(B, H, M, d)`` (or ``(B, M, d)``) key means.
        k_var: ``(B, H, M, d)`` (or ``(B, M, d)``) key variances, expected ``>= 0`` (e.g.
            ``softplus`` outputs, eq. 6); ``S_sigma^2`` is clamped at 0 before the square root.
        v: ``(B, H, M, dv)`` (or ``(B, M, dv)``) values (e.g. sampled values, eq. 10).
        beta: confidence-penalty weight ``beta`` of eq. 8 (a Python number).
        key_padding_mask: optional ``(B, M)`` bool / integer mask, **True (1) for real keys** and
            False (0) for padding -- the convention of ``TokenState.attention_mask`` and HF
            ``attention_mask``, the opposite of ``torch.nn.MultiheadAttention``.
        scale: score scale ``s``; ``None`` means ``1 / sqrt(d)``. The variance uses ``s^2``.
        chunk_size: if set, queries are processed in chunks of this many rows, each under
            ``torch.utils.checkpoint`` when gradients are needed, so the peak memory is
            ``O(chunk_size * M)`` per head instead of ``O(N * M)``. Outputs and gradients are those of
            the unchunked call.

    Returns:
        ``(B, H, N, dv)`` (or ``(B, N, dv)`` for 3-D inputs). A query row whose keys are all padded
        returns **zeros** (and passes zero gradient), never NaN. First-order gradients only: the
        penalty's backward is ``once_differentiable``.

    Raises:
        ValueError: on shape, dtype, mask or argument errors, naming the argument and expected shape.
    """
    _check_inputs(q, k_mu, k_var, v)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite Python number, got {beta!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite Python number or None, got {scale!r}")

    squeeze = q.dim() == 3
    if squeeze:
        q, k_mu, k_var, v = (t.unsqueeze(1) for t in (q, k_mu, k_var, v))
    batch, m = q.shape[0], k_mu.shape[-2]
    key_valid = None
    if key_padding_mask is not None:
        key_valid = _check_mask(key_padding_mask, batch, m, q.device)[:, None, None, :]

    device_type = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        # what autocast would do to the matmuls and SDPA, applied once so all parts agree
        dtype = torch.get_autocast_dtype(device_type)
        q, k_mu, k_var, v = (t.to(dtype) for t in (q, k_mu, k_var, v))

    beta = float(beta)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    n = q.shape[-2]
    if chunk_size is None or chunk_size >= n:
        out = _attend(q, k_mu, k_var, v, key_valid, beta, scale)
    else:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_mu, k_var, v))
        outs = []
        for q_chunk in q.split(chunk_size, dim=-2):
            args = (q_chunk, k_mu, k_var, v, key_valid, beta, scale)
            if needs_grad:
                outs.append(checkpoint(_attend, *args, use_reentrant=False))
            else:
                outs.append(_attend(*args))
        out = torch.cat(outs, dim=-2)

    if key_valid is not None:
        # a fully padded row saw a uniform softmax over finfo.min scores; define its result as 0
        out = out.masked_fill(~key_valid.any(dim=-1, keepdim=True), 0.0)
    return out.squeeze(1) if squeeze else out
