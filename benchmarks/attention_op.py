"""AttnSleep's multi-head attention over its 30 tokens, forward and backward each in one Triton kernel.

Used by ``benchmarks/stacked_layout.py --attention-kernel``. Left to inductor, each TCE layer's
attention is two batched matrix products of 30 x 16 tiles (cuBLAS/CUTLASS kernels of 16 x 16 and
32 x 32 tiles), a softmax with dropout over rows of 30 (60-byte rows: unaligned, partly masked
loads and stores) and the copies that split ``(B, T, heads * d)`` into heads and back; the backward
twice as many. Here one program takes one (sample, head): it reads its ``q``, ``k`` and ``v`` rows
straight from ``(N, T, heads * d)`` memory, keeps the ``T x T`` scores on chip and writes the output
in the same layout; it saves only each row's log-sum-exp. The backward recomputes the scores and
the dropout mask (``tl.rand`` of the seed and the element's position), FlashAttention's way.

``attention_cl(q, k, v, heads, drop, seed)``: ``q, k, v (N, T, D)`` with ``D = heads * d``; returns
``dropout(softmax(q_h k_h^T / sqrt(d))) v_h`` for each head ``h``, concatenated like the inputs.
The dropout mask comes from Triton's Philox stream, not torch's (as the engine's other fused
dropouts), as 16-bit uniforms: the rate is ``drop`` rounded to a multiple of 2^-16 (as ``max_pool_cl``'s). On CPU without Triton's interpreter: the same in PyTorch, with ``F.dropout`` (another
mask); ``tests/test_benchmarks.py`` checks the kernels against it in the interpreter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_conv_op import check_dropout
from fold_conv_op import kernels_usable  # CUDA, or Triton's interpreter

__all__ = ["attention_cl", "attention_reference"]


def attention_reference(q: Tensor, k: Tensor, v: Tensor, heads: int, drop: float, training: bool = True,
                        keep: Tensor | None = None) -> Tensor:
    """What :func:`attention_cl` computes, in PyTorch; ``keep (N, heads, T, T)``: the dropout mask to
    apply (default: ``F.dropout``'s)."""
    N, T, D = q.shape
    d = D // heads
    acc = torch.promote_types(q.dtype, torch.float32)

    def split(t):
        return t.reshape(N, T, heads, d).transpose(1, 2).to(acc)

    probs = torch.softmax(split(q) @ split(k).transpose(-2, -1) / math.sqrt(d), dim=-1)
    if keep is not None:
        probs = probs * keep / (1 - drop)
    elif drop and training:
        probs = F.dropout(probs, drop)
    return (probs @ split(v)).transpose(1, 2).reshape(N, T, D).to(q.dtype)


try:
    import triton
    import triton.language as tl

    from cl_conv_op import _uniform16  # noqa: F401  (a jit helper: looked up among this module's globals)
except ImportError:  # CPU-only installs: the reference
    triton = None

if triton is not None:
    @triton.jit
    def _tiles(q_ptr, k_ptr, v_ptr, n, h, T, D, scale, seed, drop_threshold, DH: tl.constexpr, TB: tl.constexpr,
               DB: tl.constexpr):
        # this (sample, head)'s q, k, v tiles (TB x DB, zero-padded), its scaled scores (TB x TB; -inf in
        # padded key columns) and its dropout keep-mask (from the element's position in a TB x TB grid)
        t = tl.arange(0, TB)
        c = tl.arange(0, DB)
        ok = (t < T)[:, None] & (c < DH)[None, :]
        at = n.to(tl.int64) * T * D + t[:, None] * D + h * DH + c[None, :]
        q = tl.load(q_ptr + at, mask=ok, other=0.0)
        k = tl.load(k_ptr + at, mask=ok, other=0.0)
        v = tl.load(v_ptr + at, mask=ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where((t < T)[None, :], s, float("-inf"))
        # 16-bit uniforms, eight a Philox draw (tl.rand's draw per element took most of the kernel)
        keep = _uniform16(seed.to(tl.uint32), n * tl.num_programs(1) + h, TB, TB) >= drop_threshold
        return q, k, v, s, keep, at, ok

    @triton.jit
    def attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seed_ptr, T, D, scale, drop, drop_threshold,
                      DH: tl.constexpr, TB: tl.constexpr, DB: tl.constexpr):
        n = tl.program_id(0)
        h = tl.program_id(1)
        q, k, v, s, keep, at, ok = _tiles(q_ptr, k_ptr, v_ptr, n, h, T, D, scale, tl.load(seed_ptr), drop_threshold,
                                          DH, TB, DB)
        m = tl.max(s, 1)
        e = tl.exp(s - m[:, None])
        total = tl.sum(e, 1)
        p = tl.where(keep, e / total[:, None] / (1.0 - drop), 0.0)
        o = tl.dot(p.to(v.dtype), v)
        tl.store(o_ptr + at, o.to(o_ptr.dtype.element_ty), mask=ok)
        t = tl.arange(0, TB)
        tl.store(lse_ptr + (n * tl.num_programs(1) + h) * TB + t, m + tl.log(total))

    @triton.jit
    def attention_bwd(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, seed_ptr, dq_ptr, dk_ptr, dv_ptr, T, D, scale, drop,
                      drop_threshold, DH: tl.constexpr, TB: tl.constexpr, DB: tl.constexpr):
        n = tl.program_id(0)
        h = tl.program_id(1)
        q, k, v, s, keep, at, ok = _tiles(q_ptr, k_ptr, v_ptr, n, h, T, D, scale, tl.load(seed_ptr), drop_threshold,
                                          DH, TB, DB)
        t = tl.arange(0, TB)
        lse = tl.load(lse_ptr + (n * tl.num_programs(1) + h) * TB + t)
        p = tl.exp(s - lse[:, None])  # softmax, 0 in padded key columns
        pd = tl.where(keep, p / (1.0 - drop), 0.0)
        do = tl.load(do_ptr + at, mask=ok, other=0.0)
        dv = tl.dot(tl.trans(pd).to(do.dtype), do)
        dp = tl.where(keep, tl.dot(do, tl.trans(v)) / (1.0 - drop), 0.0)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        ds = tl.where((t < T)[:, None], ds, 0.0) * scale
        dq = tl.dot(ds.to(k.dtype), k)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q)
        tl.store(dq_ptr + at, dq.to(dq_ptr.dtype.element_ty), mask=ok)
        tl.store(dk_ptr + at, dk.to(dk_ptr.dtype.element_ty), mask=ok)
        tl.store(dv_ptr + at, dv.to(dv_ptr.dtype.element_ty), mask=ok)


def _tile(n: int) -> int:
    # a power of two of at least 16: tl.dot needs every dimension of at least 16
    return max(16, 1 << (n - 1).bit_length())


def _blocks(T: int, d: int) -> tuple[int, int]:
    return _tile(T), _tile(d)


def _seed(seed: Tensor | None, like: Tensor) -> Tensor:
    # without dropout the kernels draw and keep everything: any integer seed
    return torch.zeros(1, dtype=torch.int64, device=like.device) if seed is None else seed


def _check(q: Tensor, k: Tensor, v: Tensor, heads: int, drop: float, seed: Tensor | None) -> None:
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape or q.shape[2] % heads:
        raise ValueError(f"attention_cl needs q, k, v of one shape (N, T, heads * d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)} with {heads} heads")
    check_dropout("attention_cl", drop, seed)


@torch.library.custom_op("sleeplib_bench::attention_cl", mutates_args=())
def attention_cl(q: Tensor, k: Tensor, v: Tensor, heads: int, drop: float,
                 seed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Multi-head attention of ``q, k, v (N, T, heads * d)`` with dropout ``drop`` on the
    probabilities (module doc); returns the output ``(N, T, heads * d)`` and each row's log-sum-exp
    ``(N, heads, T padded)`` for the backward (zeros on the reference path, which has no backward of
    its own: differentiate :func:`attention_reference` there)."""
    _check(q, k, v, heads, drop, seed)
    N, T, D = q.shape
    if not kernels_usable(q):
        return attention_reference(q, k, v, heads, drop), q.new_zeros(N, heads, _tile(T), dtype=torch.float32)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    TB, DB = _blocks(T, D // heads)
    o = torch.empty_like(q)
    lse = torch.empty(N, heads, TB, device=q.device, dtype=torch.float32)
    attention_fwd[(N, heads)](q, k, v, o, lse, _seed(seed, q), T, D, 1.0 / math.sqrt(D // heads), drop,
                              round(drop * 2**16), DH=D // heads, TB=TB, DB=DB, num_warps=2 if q.is_cuda else 1)
    return o, lse


@attention_cl.register_fake
def _(q, k, v, heads, drop, seed=None):
    N, T, D = q.shape
    return torch.empty_like(q), q.new_empty(N, heads, _tile(T), dtype=torch.float32)


@torch.library.custom_op("sleeplib_bench::attention_cl_backward", mutates_args=())
def _attention_cl_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, heads: int, drop: float,
                           seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    N, T, D = q.shape
    do, q, k, v = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    TB, DB = _blocks(T, D // heads)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention_bwd[(N, heads)](q, k, v, do, lse, _seed(seed, q), dq, dk, dv, T, D,
                              1.0 / math.sqrt(D // heads), drop, round(drop * 2**16), DH=D // heads, TB=TB, DB=DB,
                              num_warps=2 if q.is_cuda else 1)
    return dq, dk, dv


@_attention_cl_backward.register_fake
def _(do, q, k, v, lse, heads, drop, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, heads, drop, seed = inputs
    ctx.save_for_backward(q, k, v, output[1], seed)
    ctx.heads, ctx.drop = heads, drop
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, do, _dlse):
    q, k, v, lse, seed = ctx.saved_tensors
    if not kernels_usable(q):  # the reference's forward ran and kept no dropout mask to differentiate
        raise RuntimeError("attention_cl's backward needs its Triton kernels (CUDA or TRITON_INTERPRET=1); "
                           "without them use attention_reference")
    dq, dk, dv = _attention_cl_backward(do, q, k, v, lse, ctx.heads, ctx.drop, seed)
    return dq, dk, dv, None, None, None


attention_cl.register_autograd(_backward, setup_context=_setup_context)
