"""Channels-last convolutions over folds: Triton implicit-GEMM kernels with aligned loads.

A third alternative to cuDNN's grouped convolutions for the batched engine (see
``benchmarks/RESULTS.md``, step 6), used by ``benchmarks/stacked_layout.py --cl-convs``.
:mod:`fold_conv_op` read its inputs channels-first, so each tap's window was a shifted,
unaligned run of samples and its kernels were 2-4x slower than cuDNN's. Here the activations
are channels-last: ``x[g, b, l, :]`` (the ``C`` channels of fold ``g``, sample ``b``, position
``l``) is a contiguous row. A stride-1 convolution then is a matrix product whose left operand,
the im2col matrix, is never built: its row ``(b, l)`` for tap ``j`` is the input row
``(b, l + j - pad)``, one aligned, vectorised load of ``C`` channels, zero where it falls in the
padding. The input gradient is the same kernel run on the output gradient with the taps
reversed and the weights transposed; the weight gradient is one more kernel that reduces over
``(b, l)`` in splits.

``conv1d_cl(x, w, pad, l_out)`` takes ``x (G, B, L, C)`` (any strides with the channels
contiguous: the stacked engine passes a view of ``(B, L, K, C)`` memory) and ``w (G, k, C, O)``
and returns ``y (G, B, l_out, O)``, in ``(B, l_out, G, O)`` memory (:func:`empty_cl`), with ``y[g, b, l, o] = sum_{c, j} w[g, o, c, j] *
x[g, b, l + j - pad, c]`` (zero outside ``0 <= l + j - pad < L``), i.e. per fold ``conv1d``
with ``pad`` zeros on the left and as many on the right as ``l_out`` needs. On CPU without
Triton's interpreter it computes the same with grouped ``F.conv1d`` (the reference;
``tests/test_benchmarks.py`` checks the kernels against it, interpreted).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fold_conv_op import kernels_usable  # the same test: CUDA, or the interpreter

__all__ = ["conv1d_cl", "conv1d_cl_reference", "conv1d_windows", "empty_cl", "kernels_usable", "max_pool_cl"]


# ----------------------------------------------------------------------------- reference
def _grouped_padded(x: Tensor, pad: int, l_out: int, k: int) -> Tensor:
    """``x (G, B, L, C)`` as grouped ``conv1d``'s ``(B, G*C, l_out + k - 1)``: ``pad`` zeros on the left,
    cut or zero-filled on the right."""
    G, B, L, C = x.shape
    xg = x.permute(1, 0, 3, 2).reshape(B, G * C, L)
    return F.pad(xg, (pad, max(l_out + k - 1 - L - pad, 0)))[..., :l_out + k - 1]


def conv1d_cl_reference(x: Tensor, w: Tensor, pad: int, l_out: int) -> Tensor:
    """:func:`conv1d_cl` with grouped ``F.conv1d`` (what the kernels are tested against)."""
    G, B, L, C = x.shape
    k, O = w.shape[1], w.shape[3]
    w = w.permute(0, 3, 2, 1)  # (G, O, C, k), F.conv1d's order
    y = F.conv1d(_grouped_padded(x, pad, l_out, k), w.reshape(G * O, C, k), groups=G)  # (B, G*O, l_out)
    return y.view(B, G, O, l_out).permute(1, 0, 3, 2)


# ----------------------------------------------------------------------------- kernels
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def conv_cl(x_ptr, w_ptr, y_ptr, M, L, l_out, C, O, pad,
                s_xg, s_xb, s_xl, s_wg, s_wj, s_wc, s_wo, s_yg, s_yb, s_yl,
                TAPS: tl.constexpr, FLIP: tl.constexpr, X_ALIGN: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # y[g, m=(b, l), o] = sum_{j, c} x[g, b, l + j - pad, c] * w[g, j', c, o], j' = j (or
        # TAPS - 1 - j with FLIP), w read through its strides (the input gradient reads the
        # forward's weights transposed and flipped, without a copy). X_ALIGN: what every row of x
        # starts at a multiple of (elements), for vector loads where Triton cannot see it (the
        # first layers' windows, rows 8 apart)
        g = tl.program_id(2).to(tl.int64)
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        m_ok = offs_m < M
        n_ok = offs_n < O
        b = offs_m // l_out
        l = offs_m % l_out
        x_rows = x_ptr + g * s_xg + b.to(tl.int64) * s_xb
        w_base = w_ptr + g * s_wg
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # one flat loop over (tap, channel block), so that Triton pipelines the loads across taps;
        # channels padded to a multiple of BK per tap (masked)
        c_pad = tl.cdiv(C, BK) * BK
        for kk in range(0, TAPS * c_pad, BK):
            j = kk // c_pad
            cc = kk - j * c_pad + offs_k
            c_ok = cc < C
            pos = l + j - pad
            row_ok = m_ok & (pos >= 0) & (pos < L)
            a = tl.load((x_rows + tl.multiple_of(pos * s_xl, X_ALIGN))[:, None] + cc[None, :],
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            tap = TAPS - 1 - j if FLIP else j
            wt = tl.load(w_base + tap * s_wj + cc[:, None] * s_wc + offs_n[None, :] * s_wo,
                         mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, wt, acc)
        out = y_ptr + g * s_yg + b.to(tl.int64)[:, None] * s_yb + l[:, None] * s_yl + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def conv_cl_wgrad(x_ptr, gy_ptr, part_ptr, M, L, l_out, C, O, pad, per_split, n_split,
                      s_xg, s_xb, s_xl, s_yg, s_yb, s_yl, s_pg, s_ps,
                      X_ALIGN: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # part[g, split, j * C + c, o] = sum over this split's rows m=(b, l) of
        # x[g, b, l + j - pad, c] * gy[g, b, l, o]
        pid_gs = tl.program_id(2)
        g = (pid_gs // n_split).to(tl.int64)
        split = pid_gs % n_split
        n_cblocks = tl.cdiv(C, BR)
        j = tl.program_id(0) // n_cblocks
        cc = (tl.program_id(0) % n_cblocks) * BR + tl.arange(0, BR)
        c_ok = cc < C
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = offs_n < O
        x_base = x_ptr + g * s_xg
        y_base = gy_ptr + g * s_yg
        m_start = split * per_split
        m_end = tl.minimum(m_start + per_split, M)
        acc = tl.zeros((BR, BN), dtype=tl.float32)
        for m0 in range(m_start, m_end, BK):
            offs_m = m0 + tl.arange(0, BK)
            m_ok = offs_m < m_end
            b = (offs_m // l_out).to(tl.int64)
            l = offs_m % l_out
            pos = l + j - pad
            x_ok = m_ok & (pos >= 0) & (pos < L)
            xt = tl.load(x_base + tl.multiple_of(b * s_xb + pos * s_xl, X_ALIGN)[:, None] + cc[None, :],
                         mask=x_ok[:, None] & c_ok[None, :], other=0.0)
            gyt = tl.load(y_base + (b * s_yb + l * s_yl)[:, None] + offs_n[None, :],
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(xt), gyt, acc)
        out = part_ptr + g * s_pg + split * s_ps + (j * C + cc)[:, None] * O + offs_n[None, :]
        tl.store(out, acc, mask=c_ok[:, None] & n_ok[None, :])

    if os.environ.get("TRITON_INTERPRET") == "1":
        return conv_cl, conv_cl_wgrad
    # on a GPU, block sizes by shape (_conv_blocks, _wgrad_blocks): what tuning over these lists chose
    # on an H200 (step 7). Tuning itself (AUTOTUNE=1 in the environment; on first use, in the
    # engine's eager warm-up) compiles every candidate: 100 s of a cold start
    conv_configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
                    for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                                              (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (256, 128, 64, 8, 3),
                                              (64, 64, 32, 4, 4), (128, 32, 32, 4, 4)]]
    wgrad_configs = [triton.Config({"BK": bk}, num_warps=w, num_stages=st)
                     for bk, w, st in [(64, 8, 3), (64, 4, 4), (32, 4, 4), (128, 8, 3), (32, 8, 4)]]
    return (triton.autotune(conv_configs, key=["M", "L", "C", "O", "TAPS"])(conv_cl),
            triton.autotune(wgrad_configs, key=["M", "L", "C", "O", "BR", "BN"])(conv_cl_wgrad))


@functools.cache
def _tma_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def conv_tma(x_desc, w_desc, y_desc, n_mtiles, C, pad,
                 TAPS: tl.constexpr, FLIP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # conv_cl's product, one program a (fold, sample, BM rows of it): each tap's rows are one
        # tile of x (G, B, L, C) at l0 + j - pad, read by the bulk tensor copy engine, which fills
        # rows outside [0, L) (the padding) and channels past C with zeros. FLIP: the input
        # gradient's form, w (G, k, C_fwd, O_fwd) read with its taps reversed and transposed
        pid_m = tl.program_id(0)
        n0 = tl.program_id(1) * BN
        g = tl.program_id(2)
        b = pid_m // n_mtiles
        l0 = (pid_m % n_mtiles) * BM
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        n_cb = tl.cdiv(C, BK)
        for kk in range(0, TAPS * n_cb):
            j = kk // n_cb
            c0 = (kk - j * n_cb) * BK
            a = x_desc.load([g, b, l0 + j - pad, c0]).reshape(BM, BK)
            if FLIP:
                wt = w_desc.load([g, TAPS - 1 - j, n0, c0]).reshape(BN, BK).T
            else:
                wt = w_desc.load([g, j, c0, n0]).reshape(BK, BN)
            acc = tl.dot(a, wt, acc)
        y_desc.store([g, b, l0, n0], acc.to(y_desc.dtype).reshape(1, 1, BM, BN))

    @triton.jit
    def wgrad_tma(x_desc, gy_desc, part_ptr, B, n_ltiles, C, O, pad, b_per_split, n_split, s_pg, s_ps,
                  BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # conv_cl_wgrad's sums, split over samples; a sample's rows in tiles of BK, each tile of x
        # and of gy one bulk copy (rows past the output's end are zero in gy, so add nothing)
        pid_gs = tl.program_id(2)
        g = pid_gs // n_split
        split = pid_gs % n_split
        n_cb = tl.cdiv(C, BR)
        j = tl.program_id(0) // n_cb
        c0 = (tl.program_id(0) % n_cb) * BR
        n0 = tl.program_id(1) * BN
        b_start = split * b_per_split
        b_end = tl.minimum(b_start + b_per_split, B)
        acc = tl.zeros((BR, BN), dtype=tl.float32)
        for t in range(b_start * n_ltiles, b_end * n_ltiles):
            b = t // n_ltiles
            l0 = (t % n_ltiles) * BK
            xt = x_desc.load([g, b, l0 + j - pad, c0]).reshape(BK, BR)
            gyt = gy_desc.load([g, b, l0, n0]).reshape(BK, BN)
            acc = tl.dot(xt.T, gyt, acc)
        cc = c0 + tl.arange(0, BR)
        nn = n0 + tl.arange(0, BN)
        out = part_ptr + g.to(tl.int64) * s_pg + split * s_ps + (j * C + cc)[:, None] * O + nn[None, :]
        tl.store(out, acc, mask=(cc < C)[:, None] & (nn < O)[None, :])

    return conv_tma, wgrad_tma


TMA = True
"""Where the tensors allow (:func:`_tma_usable`), the convolutions by tensor-descriptor kernels
(``_tma_kernels``) instead of pointer loads; ``stacked_layout.py --no-tma``: never."""
TMA_MIN_ROWS = 128
"""The shortest output for which the forward (and input-gradient) descriptor kernel is used: it tiles
each sample's rows separately, and short rows waste most of a tile (H100, engine profile of step
10: the TCE's 80-row convolutions 36 us against 20 us by pointer loads over all samples' rows,
the large branch's 30-row ones 45-81 us against 29-48 us; the weight gradient kernel was faster
at every length)."""


def _tma_usable(*ts: Tensor) -> bool:
    """Whether Hopper's bulk tensor copies can read ``ts``: a GPU of compute capability 9 or more and
    2-byte elements (or Triton's interpreter), 16-byte aligned starts and strides, the last axis contiguous."""
    if not TMA:
        return False
    if ts[0].is_cuda:
        # the blocks are sized for 2-byte elements: fp32 tiles overflow the shared memory
        if torch.cuda.get_device_capability(ts[0].device)[0] < 9 or any(t.element_size() > 2 for t in ts):
            return False
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    for t in ts:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def _desc(t: Tensor, block: tuple):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


def _tma_conv_blocks(C: int, O: int, flip: bool) -> tuple:
    """(BM, BN, BK, warps, stages) of ``conv_tma``: for the small branch's 128-output layers, what the
    H100 was fastest with (``conv_tma_probe.py``)."""
    BN, BK = _pow2(O, 16, 128), _pow2(C, 16, 64)
    if C >= 128 and O >= 128 and not flip:
        return 256, BN, BK, 8, 4
    return 128, BN, BK, 4, 3


def _run_conv_tma(x: Tensor, w: Tensor, flip: bool, pad: int, l_out: int, blocks: tuple | None = None) -> Tensor:
    """:func:`_run_conv` by ``conv_tma``: ``w (G, k, C, O)`` as stored (FLIP: the forward's weights).
    ``blocks``: (BM, BN, BK, warps, stages) instead of :func:`_tma_conv_blocks`' (``conv_tma_probe.py``)."""
    import triton

    conv_tma, _ = _tma_kernels()
    G, B, L, C = x.shape
    taps = w.shape[1]
    O = w.shape[2] if flip else w.shape[3]
    y = empty_cl(G, B, l_out, O, like=x)
    if x.is_cuda:
        BM, BN, BK, warps, stages = blocks or _tma_conv_blocks(C, O, flip)
        tuning = dict(num_warps=warps, num_stages=stages)
    else:  # the interpreter
        BM, BN, BK, tuning = 16, _pow2(O, 16, 128), _pow2(C, 16, 64), {}
    n_mtiles = triton.cdiv(l_out, BM)
    conv_tma[(B * n_mtiles, triton.cdiv(O, BN), G)](
        _desc(x, (1, 1, BM, BK)), _desc(w, (1, 1, BN, BK) if flip else (1, 1, BK, BN)), _desc(y, (1, 1, BM, BN)),
        n_mtiles, C, pad, TAPS=taps, FLIP=flip, BM=BM, BN=BN, BK=BK, **tuning)
    return y


def _grad_weight_tma(gy: Tensor, x: Tensor, pad: int, k: int, blocks: tuple | None = None) -> Tensor:
    """The weight gradient by ``wgrad_tma``; ``blocks``: (BK, warps, stages) instead of the table's."""
    import triton

    _, wgrad_tma = _tma_kernels()
    G, B, L, C = x.shape
    l_out, O = gy.shape[2], gy.shape[3]
    BR, BN = _pow2(C, 16, 128), _pow2(O, 16, 128)
    if x.is_cuda:
        # H100 (conv_tma_probe.py): 64-row tiles for 128 channels, 128 for 64; short rows, short tiles
        BK, warps, stages = blocks or ((64 if C >= 128 else 128) if l_out >= 192 else 32, 4, 4)
        tuning = dict(num_warps=warps, num_stages=stages)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        BK, tuning, sms = 16, {}, 4
    tiles = G * k * triton.cdiv(C, BR) * triton.cdiv(O, BN)
    n_split = max(1, min(B, triton.cdiv(4 * sms, tiles)))
    b_per_split = triton.cdiv(B, n_split)
    n_split = triton.cdiv(B, b_per_split)
    part = torch.empty(G, n_split, k, C, O, device=x.device, dtype=torch.float32)
    wgrad_tma[(k * triton.cdiv(C, BR), triton.cdiv(O, BN), G * n_split)](
        _desc(x, (1, 1, BK, BR)), _desc(gy, (1, 1, BK, BN)), part, B, triton.cdiv(l_out, BK), C, O, pad,
        b_per_split, n_split, part.stride(0), part.stride(1), BR=BR, BN=BN, BK=BK, **tuning)
    return part.sum(1)


def _autotune() -> bool:
    return os.environ.get("AUTOTUNE") == "1"


def _conv_blocks(M: int, C: int, O: int, taps: int) -> tuple:
    """(BM, BN, BK, warps, stages) of :func:`conv1d_cl`'s kernel for a shape: what the tuner chose on an H200."""
    if O <= 32:
        return 128, 32, 32, 4, 4
    if C <= 32:
        return 64, 64, 32, 4, 4
    if O <= 64:
        return 128, 64, 64, 4, 4
    return (256, 128, 64, 8, 3) if C >= 128 and M >= 16384 else (128, 128, 64, 8, 3)


def _wgrad_blocks(M: int, BR: int, BN: int) -> tuple:
    """(BK, warps, stages) of the weight-gradient kernel, as the tuner chose them on an H200."""
    if BR * BN <= 32 * 32:
        return 64, 4, 4
    if (BR, BN) == (128, 128):
        return (64, 8, 3) if M >= 16384 else (32, 4, 4)
    if (BR, BN) == (64, 128):
        return 32, 4, 4
    if (BR, BN) == (128, 64):
        return 32, 8, 4
    return 64, 8, 3


def _pow2(n: int, lo: int, hi: int) -> int:
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def _row_alignment(x: Tensor) -> int:
    """The largest power of two up to 8 (16 bytes in bf16) that every row start of ``x (G, B, L, C)``
    (channels contiguous) is a multiple of, in elements."""
    a = 8
    while a > 1 and any(v % a for v in (x.storage_offset(), *x.stride()[:3])):
        a //= 2
    return a


def _check(x: Tensor, what: str) -> None:
    if x.stride(-1) != 1:
        raise ValueError(f"conv1d_cl needs {what} with contiguous channels (stride 1 in the last "
                         f"dimension), got strides {x.stride()}")


def _run_conv(x: Tensor, w: Tensor, w_strides: tuple, flip: bool, pad: int, l_out: int, O: int,
              taps: int, tma: bool = True, blocks: tuple | None = None) -> Tensor:
    """``x (G, B, L, C)`` channels contiguous, weights ``w`` read as ``(G, taps, C, O)`` through
    ``w_strides`` -> ``(G, B, l_out, O)``. ``tma``: by :func:`_run_conv_tma` where it can (not for
    the first layers' overlapping windows, which a tensor map is not documented to allow).
    ``blocks``: the pointer kernel's (BM, BN, BK, warps, stages) on a GPU instead of
    :func:`_conv_blocks`' (``conv_tma_probe.py``)."""
    import triton

    _check(x, "x")
    if tma and l_out >= TMA_MIN_ROWS and _tma_usable(x, w):
        return _run_conv_tma(x, w, flip, pad, l_out)
    conv_cl, _ = _kernels()
    G, B, L, C = x.shape
    y = empty_cl(G, B, l_out, O, like=x)
    M = B * l_out
    args = (x, w, y, M, L, l_out, C, O, pad,
            x.stride(0), x.stride(1), x.stride(2), *w_strides, y.stride(0), y.stride(1), y.stride(2))
    if x.is_cuda and _autotune() and blocks is None:
        conv_cl[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(O, meta["BN"]), G)](
            *args, TAPS=taps, FLIP=flip, X_ALIGN=_row_alignment(x))
    elif x.is_cuda:
        BM, BN, BK, warps, stages = blocks or _conv_blocks(M, C, O, taps)
        conv_cl.fn[(triton.cdiv(M, BM), triton.cdiv(O, BN), G)](*args, TAPS=taps, FLIP=flip, X_ALIGN=_row_alignment(x),
                                                               BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    else:  # the interpreter
        BM, BN, BK = 32, _pow2(O, 16, 128), _pow2(C, 16, 64)
        conv_cl[(triton.cdiv(M, BM), triton.cdiv(O, BN), G)](*args, TAPS=taps, FLIP=flip, X_ALIGN=_row_alignment(x),
                                                              BM=BM, BN=BN, BK=BK)
    return y


def _forward_kernel(x: Tensor, w: Tensor, pad: int, l_out: int) -> Tensor:
    return _run_conv(x, w, w.stride(), False, pad, l_out, w.shape[3], w.shape[1])


def _grad_input_kernel(gy: Tensor, w: Tensor, pad: int, length: int) -> Tensor:
    # gx[b, i, c] = sum_{j, o} gy[b, i + pad - j, o] * w[j, c, o]; with j' = k - 1 - j it is the
    # same convolution of gy, left padding k - 1 - pad, weights transposed and taps reversed
    k = w.shape[1]
    s_g, s_j, s_c, s_o = w.stride()
    return _run_conv(gy, w, (s_g, s_j, s_o, s_c), True, k - 1 - pad, length, w.shape[2], k)


def _grad_weight_kernel(gy: Tensor, x: Tensor, pad: int, k: int, tma: bool = True) -> Tensor:
    import triton

    _check(x, "x")
    _check(gy, "the output gradient")
    if tma and _tma_usable(x, gy):
        return _grad_weight_tma(gy, x, pad, k)
    _, conv_cl_wgrad = _kernels()
    G, B, L, C = x.shape
    l_out, O = gy.shape[2], gy.shape[3]
    M = B * l_out
    BR = _pow2(C, 16, 128)
    BN = _pow2(O, 16, 128)
    BK = 128 if x.is_cuda else 16  # the largest block the tuner may pick: splits are multiples of it
    tiles = G * k * triton.cdiv(C, BR) * triton.cdiv(O, BN)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    n_split = max(1, min(triton.cdiv(M, BK), triton.cdiv(4 * sms, tiles)))
    per_split = triton.cdiv(triton.cdiv(M, n_split), BK) * BK
    n_split = triton.cdiv(M, per_split)
    part = torch.empty(G, n_split, k, C, O, device=x.device, dtype=torch.float32)
    grid = (k * triton.cdiv(C, BR), triton.cdiv(O, BN), G * n_split)
    args = (x, gy, part, M, L, l_out, C, O, pad, per_split, n_split,
            x.stride(0), x.stride(1), x.stride(2), gy.stride(0), gy.stride(1), gy.stride(2),
            part.stride(0), part.stride(1), _row_alignment(x))
    if x.is_cuda and _autotune():
        conv_cl_wgrad[grid](*args, BR=BR, BN=BN)
    elif x.is_cuda:
        BK, warps, stages = _wgrad_blocks(M, BR, BN)
        conv_cl_wgrad.fn[grid](*args, BR=BR, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    else:  # the interpreter
        conv_cl_wgrad[grid](*args, BR=BR, BN=BN, BK=BK)
    return part.sum(1)


def empty_cl(G: int, B: int, L: int, C: int, like: Tensor) -> Tensor:
    """An uninitialised ``(G, B, L, C)`` tensor in ``(B, L, G, C)`` memory, the stacked engine's layout
    (every fold's channels side by side, so batch norm over ``G * C`` channels needs no copy)."""
    return torch.empty(B, L, G, C, device=like.device, dtype=like.dtype).permute(2, 0, 1, 3)


def _grouped(gy: Tensor) -> Tensor:
    """An output gradient ``(G, B, l_out, O)`` as grouped ``conv1d``'s ``(B, G*O, l_out)`` (the references)."""
    G, B, l_out, O = gy.shape
    return gy.permute(1, 0, 3, 2).reshape(B, G * O, l_out)


def _as_cl(y: Tensor) -> Tensor:
    out = empty_cl(*y.shape, like=y)
    return out.copy_(y)


def _channels_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sleeplib_bench::conv1d_cl", mutates_args=())
def conv1d_cl(x: Tensor, w: Tensor, pad: int, l_out: int) -> Tensor:
    """``(G, B, L, C) x (G, k, C, O) -> (G, B, l_out, O)``: G channels-last ``conv1d`` s (module doc)."""
    if x.ndim != 4 or w.ndim != 4 or x.shape[0] != w.shape[0] or x.shape[3] != w.shape[2]:
        raise ValueError(f"conv1d_cl needs x (G, B, L, C) and w (G, k, C, O) with the same G and C, "
                         f"got {tuple(x.shape)} and {tuple(w.shape)}")
    if kernels_usable(x):
        return _forward_kernel(_channels_contiguous(x), w, pad, l_out)
    return _as_cl(conv1d_cl_reference(x, w, pad, l_out))


@conv1d_cl.register_fake
def _(x, w, pad, l_out):
    return empty_cl(x.shape[0], x.shape[1], l_out, w.shape[3], like=x)


@torch.library.custom_op("sleeplib_bench::conv1d_cl_grad_input", mutates_args=())
def _conv1d_cl_grad_input(gy: Tensor, w: Tensor, pad: int, length: int) -> Tensor:
    if kernels_usable(gy):
        return _grad_input_kernel(_channels_contiguous(gy), w, pad, length)
    k = w.shape[1]
    return _as_cl(conv1d_cl_reference(gy, w.flip(1).transpose(2, 3), k - 1 - pad, length))


@_conv1d_cl_grad_input.register_fake
def _(gy, w, pad, length):
    return empty_cl(gy.shape[0], gy.shape[1], length, w.shape[2], like=gy)


@torch.library.custom_op("sleeplib_bench::conv1d_cl_grad_weight", mutates_args=())
def _conv1d_cl_grad_weight(gy: Tensor, x: Tensor, pad: int, k: int) -> Tensor:
    if kernels_usable(x):
        return _grad_weight_kernel(_channels_contiguous(gy), _channels_contiguous(x), pad, k).to(x.dtype).contiguous()
    G, B, L, C = x.shape
    l_out, O = gy.shape[2], gy.shape[3]
    gw = torch.nn.grad.conv1d_weight(_grouped_padded(x, pad, l_out, k), (G * O, C, k), _grouped(gy), groups=G)
    return gw.view(G, O, C, k).permute(0, 3, 2, 1).contiguous()


@_conv1d_cl_grad_weight.register_fake
def _(gy, x, pad, k):
    return x.new_empty(x.shape[0], k, x.shape[3], gy.shape[3])


def _register_conv_autograd(op, grad_input, grad_weight) -> None:
    """Autograd of a convolution op ``(x, w, a, n)``: ``a`` (padding or stride) is passed on to
    ``grad_input(gy, w, a, length)`` and ``grad_weight(gy, x, a, taps)``; ``x`` and ``w`` are saved."""

    def setup_context(ctx, inputs, output):
        x, w, a, _ = inputs
        ctx.save_for_backward(x, w)
        ctx.a = a

    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = grad_input(gy, w, ctx.a, x.shape[2]) if ctx.needs_input_grad[0] else None
        gw = grad_weight(gy, x, ctx.a, w.shape[1]) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None

    op.register_autograd(backward, setup_context=setup_context)


_register_conv_autograd(conv1d_cl, _conv1d_cl_grad_input, _conv1d_cl_grad_weight)


# ----------------------------------------------------------------------------- first layers
# The MRCNN's first layers (one input channel, kernel 50 / stride 6 and 400 / 50) were run as
# stride-1 convolutions of the signal viewed as positions of `stride` channels: 6 channels, 12-byte
# rows, a 16-wide padded block and the output gradient re-read once per tap made the small
# branch's layer cost 1.2 ms a step on an H200 (profile of step 7). Here the window of output
# position l is read directly: samples [l * stride, l * stride + kernel) of the zero-padded signal
# are one row of `kernel` contiguous values, i.e. a (G, B, l_out, kernel) view with row stride
# `stride`, and the layer is the same kernel with a single tap.
def _windows(signal: Tensor, kernel: int, stride: int, l_out: int) -> Tensor:
    G, B, Lp = signal.shape
    return signal.as_strided((G, B, l_out, kernel), (B * Lp, Lp, stride, 1), signal.storage_offset())


def _check_windows(signal: Tensor, w: Tensor, stride: int, l_out: int) -> None:
    if signal.ndim != 3 or w.ndim != 3 or signal.shape[0] != w.shape[0]:
        raise ValueError(f"conv1d_windows needs signal (G, B, L) and w (G, kernel, O) with the same G, got "
                         f"{tuple(signal.shape)} and {tuple(w.shape)}")
    if (l_out - 1) * stride + w.shape[1] > signal.shape[2]:
        raise ValueError(f"conv1d_windows: {l_out} windows of {w.shape[1]} samples at stride {stride} need "
                         f"{(l_out - 1) * stride + w.shape[1]} samples, the signal has {signal.shape[2]} (pad it first)")


def _windows_reference(signal: Tensor, w: Tensor, stride: int, l_out: int) -> Tensor:
    G, B, _ = signal.shape
    kernel, O = w.shape[1], w.shape[2]
    y = F.conv1d(signal.transpose(0, 1), w.permute(0, 2, 1).reshape(G * O, 1, kernel), stride=stride, groups=G)
    return y[..., :l_out].view(B, G, O, l_out).permute(1, 0, 3, 2)


@torch.library.custom_op("sleeplib_bench::conv1d_windows", mutates_args=())
def conv1d_windows(signal: Tensor, w: Tensor, stride: int, l_out: int) -> Tensor:
    """``y[g, b, l, o] = sum_j w[g, j, o] * signal[g, b, l * stride + j]`` for ``l < l_out``: a
    one-channel strided convolution of an already padded ``signal (G, B, L)`` with ``w (G, kernel, O)``;
    ``y (G, B, l_out, O)`` in ``(B, l_out, G, O)`` memory, as :func:`conv1d_cl`."""
    _check_windows(signal, w, stride, l_out)
    signal = signal.contiguous()
    if kernels_usable(signal):
        return _run_conv(_windows(signal, w.shape[1], stride, l_out), w.unsqueeze(1),
                         w.unsqueeze(1).stride(), False, 0, l_out, w.shape[2], 1, tma=False)
    return _as_cl(_windows_reference(signal, w, stride, l_out))


@conv1d_windows.register_fake
def _(signal, w, stride, l_out):
    return empty_cl(signal.shape[0], signal.shape[1], l_out, w.shape[2], like=signal)


@torch.library.custom_op("sleeplib_bench::conv1d_windows_grad_weight", mutates_args=())
def _conv1d_windows_grad_weight(gy: Tensor, signal: Tensor, stride: int, kernel: int) -> Tensor:
    G, B, l_out, O = gy.shape
    signal = signal.contiguous()
    if kernels_usable(signal):
        gw = _grad_weight_kernel(_channels_contiguous(gy), _windows(signal, kernel, stride, l_out), 0, 1, tma=False)
        return gw[:, 0].to(signal.dtype).contiguous()
    gw = torch.nn.grad.conv1d_weight(signal.transpose(0, 1), (G * O, 1, kernel), _grouped(gy), stride=stride,
                                     groups=G)
    return gw.view(G, O, kernel).transpose(1, 2).contiguous()


@_conv1d_windows_grad_weight.register_fake
def _(gy, signal, stride, kernel):
    return signal.new_empty(signal.shape[0], kernel, gy.shape[3])


@torch.library.custom_op("sleeplib_bench::conv1d_windows_grad_input", mutates_args=())
def _conv1d_windows_grad_input(gy: Tensor, w: Tensor, stride: int, length: int) -> Tensor:
    # not on the engine's path (the signal needs no gradient): cuDNN's, through the reference
    G, B, l_out, O = gy.shape
    kernel = w.shape[1]
    gx = torch.nn.grad.conv1d_input((B, G, length), w.permute(0, 2, 1).reshape(G * O, 1, kernel).to(gy.dtype),
                                    _grouped(gy), stride=stride, groups=G)
    return gx.transpose(0, 1).contiguous()


@_conv1d_windows_grad_input.register_fake
def _(gy, w, stride, length):
    return gy.new_empty(gy.shape[0], gy.shape[1], length)


_register_conv_autograd(conv1d_windows, _conv1d_windows_grad_input, _conv1d_windows_grad_weight)


# ----------------------------------------------------------------------------- max-pooling
# jit helpers are looked up among the module's globals: defined here, when Triton is installed
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references
    triton = None

if triton is not None:
    @triton.jit
    def _uniform16(seed, tile, BR: tl.constexpr, BG: tl.constexpr):
        # a (BR, BG) tile of uniform integers in [0, 2^16): one Philox draw (four 32-bit words) per
        # eight of them. tl.rand's draw per element made the max-pool + dropout pass compute-bound
        # (265 us against 129 us for the pooling alone on an H200, step 7)
        unit = tile * (BR * (BG // 8)) + tl.arange(0, BR)[:, None] * (BG // 8) + tl.arange(0, BG // 8)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, unit)
        a = tl.join(r0 & 0xFFFF, r0 >> 16)
        b = tl.join(r1 & 0xFFFF, r1 >> 16)
        c = tl.join(r2 & 0xFFFF, r2 >> 16)
        d = tl.join(r3 & 0xFFFF, r3 >> 16)
        return tl.reshape(tl.join(tl.join(a, b), tl.join(c, d)), (BR, BG))


# A fused max-pool was the other half of the cost: written as strided slices for inductor, the
# batch norm and GELU before it were recomputed for every window position (kernel 8: 8 times)
# and eight boolean masks were saved for the backward. This op keeps one int8 offset per output.
@functools.cache
def _pool_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def pool_fwd(x_ptr, y_ptr, idx_ptr, seed_ptr, R, L, l_out, G, stride, pad, drop, drop_threshold,
                 KERNEL: tl.constexpr, DROP: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
        # y[b, l, g] = max_j x[b, l * stride - pad + j, g] (positions outside [0, L) are -inf);
        # idx: the first j attaining it. With DROP, inverted dropout of rate `drop` too: a dropped
        # output is 0 with idx -1 (no window position gets its gradient)
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BG + tl.arange(0, BG)
        r_ok = rows < R
        g_ok = cols < G
        b = (rows // l_out).to(tl.int64)
        l = rows % l_out
        best = tl.full((BR, BG), float("-inf"), tl.float32)
        arg = tl.zeros((BR, BG), dtype=tl.int32)
        for j in range(KERNEL):
            pos = l * stride - pad + j
            ok = r_ok & (pos >= 0) & (pos < L)
            v = tl.load(x_ptr + (b * L + pos)[:, None] * G + cols[None, :], mask=ok[:, None] & g_ok[None, :],
                        other=float("-inf")).to(tl.float32)
            take = v > best
            best = tl.where(take, v, best)
            arg = tl.where(take, j, arg)
        out = (b * l_out + l)[:, None] * G + cols[None, :]
        mask = r_ok[:, None] & g_ok[None, :]
        if DROP:
            tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            keep = _uniform16(tl.load(seed_ptr).to(tl.uint32), tile, BR, BG) >= drop_threshold
            best = tl.where(keep, best / (1.0 - drop), 0.0)
            arg = tl.where(keep, arg, -1)
        tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(idx_ptr + out, arg.to(tl.int8), mask=mask)

    @triton.jit
    def pool_bwd(gy_ptr, idx_ptr, gx_ptr, R, L, l_out, G, s_gyb, stride, pad, scale,
                 KERNEL: tl.constexpr, WINDOWS: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
        # gx[b, i, g] = sum over the windows l holding i whose maximum sat at i; gy's samples s_gyb
        # apart (a slice of the MRCNN's concatenation's gradient is read in place)
        rows = tl.program_id(0) * BR + tl.arange(0, BR)  # (b, i)
        cols = tl.program_id(1) * BG + tl.arange(0, BG)
        r_ok = rows < R
        g_ok = cols < G
        b = (rows // L).to(tl.int64)
        i = rows % L
        last = (i + pad) // stride  # the last window that can hold i
        acc = tl.zeros((BR, BG), dtype=tl.float32)
        for w in range(WINDOWS):
            l = last - w
            j = i + pad - l * stride
            ok = r_ok & (l >= 0) & (l < l_out) & (j < KERNEL)
            at = (b * l_out + l)[:, None] * G + cols[None, :]
            m = ok[:, None] & g_ok[None, :]
            hit = tl.load(idx_ptr + at, mask=m, other=-1).to(tl.int32) == j[:, None]
            at_gy = (b * s_gyb + l * G)[:, None] + cols[None, :]
            acc += tl.where(hit & m, tl.load(gy_ptr + at_gy, mask=m, other=0.0).to(tl.float32), 0.0)
        tl.store(gx_ptr + rows.to(tl.int64)[:, None] * G + cols[None, :], (acc * scale).to(gx_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & g_ok[None, :])

    return pool_fwd, pool_bwd


def _pool_out(L: int, kernel: int, stride: int, pad: int) -> int:
    return (L + 2 * pad - kernel) // stride + 1


def _pool_blocks(G: int, interpret: bool) -> tuple[int, int]:
    return (16, _pow2(G, 16, 64)) if interpret else (32, _pow2(G, 16, 128))


def check_dropout(op: str, drop: float, seed: Optional[Tensor]) -> None:
    """The fused dropouts' arguments: a rate in [0, 1) and, with a positive rate, a one-element seed."""
    if not 0.0 <= drop < 1.0 or (drop > 0 and (seed is None or seed.numel() != 1)):
        raise ValueError(f"{op}'s dropout needs 0 <= drop < 1 and, when drop > 0, a one-element seed "
                         f"tensor; got drop={drop}, seed={None if seed is None else tuple(seed.shape)}")


@torch.library.custom_op("sleeplib_bench::max_pool_cl", mutates_args=())
def max_pool_cl(x: Tensor, kernel: int, stride: int, pad: int, drop: float = 0.0,
                seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Max-pool ``x (B, L, G)`` (contiguous) along ``L`` like ``max_pool1d`` (the first of equal
    maxima wins); returns the pooled ``(B, l_out, G)`` and the int8 offset of each maximum in its window.

    With ``drop > 0``, followed by inverted dropout of that rate (the dropout after the MRCNN's first
    pooling, in the same pass): ``seed`` (one integer, on the device) picks the mask; a dropped
    output is 0 and its offset -1. The kernels draw 16-bit uniforms, so the rate is ``drop`` rounded to a
    multiple of 2^-16 (0.5 exactly); kept outputs are scaled by ``1 / (1 - drop)``."""
    B, L, G = x.shape
    l_out = _pool_out(L, kernel, stride, pad)
    if kernel > 127 or pad > kernel // 2:
        raise ValueError(f"max_pool_cl needs kernel <= 127 and pad <= kernel // 2, got {kernel}, {pad}")
    check_dropout("max_pool_cl", drop, seed)
    x = x.contiguous()
    if kernels_usable(x):
        import triton

        pool_fwd, _ = _pool_kernels()
        y = torch.empty(B, l_out, G, device=x.device, dtype=x.dtype)
        idx = torch.empty(B, l_out, G, device=x.device, dtype=torch.int8)
        BR, BG = _pool_blocks(G, not x.is_cuda)
        R = B * l_out
        pool_fwd[(triton.cdiv(R, BR), triton.cdiv(G, BG))](x, y, idx, idx if seed is None else seed, R, L, l_out, G,
                                                          stride, pad, drop, round(drop * 2**16), KERNEL=kernel,
                                                          DROP=drop > 0, BR=BR, BG=BG)
        return y, idx
    windows = F.pad(x.transpose(1, 2), (pad, pad), value=float("-inf")).unfold(-1, kernel, stride)
    y, idx = windows.max(-1)  # the first maximum, as max_pool1d
    y, idx = y.transpose(1, 2).contiguous(), idx.to(torch.int8).transpose(1, 2).contiguous()
    if drop > 0:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
        keep = torch.rand(y.shape, generator=generator, device=x.device) >= drop
        y, idx = torch.where(keep, y / (1 - drop), 0), torch.where(keep, idx, -1)
    return y, idx


@max_pool_cl.register_fake
def _(x, kernel, stride, pad, drop=0.0, seed=None):
    B, L, G = x.shape
    l_out = _pool_out(L, kernel, stride, pad)
    return x.new_empty(B, l_out, G), x.new_empty(B, l_out, G, dtype=torch.int8)


@torch.library.custom_op("sleeplib_bench::max_pool_cl_backward", mutates_args=())
def _max_pool_cl_backward(gy: Tensor, idx: Tensor, length: int, kernel: int, stride: int, pad: int,
                          scale: float) -> Tensor:
    B, l_out, G = gy.shape
    if gy.stride(2) != 1 or gy.stride(1) != G:  # samples may lie apart (a slice of a concatenation's gradient)
        gy = gy.contiguous()
    if kernels_usable(gy):
        import triton

        _, pool_bwd = _pool_kernels()
        gx = torch.empty(B, length, G, device=gy.device, dtype=gy.dtype)
        BR, BG = _pool_blocks(G, not gy.is_cuda)
        R = B * length
        pool_bwd[(triton.cdiv(R, BR), triton.cdiv(G, BG))](gy, idx, gx, R, length, l_out, G, gy.stride(0), stride,
                                                          pad, scale,
                                                          KERNEL=kernel, WINDOWS=-(-kernel // stride),
                                                          BR=BR, BG=BG)
        return gx
    kept = idx >= 0  # -1: dropped
    pos = torch.arange(l_out, device=gy.device)[None, :, None] * stride - pad + idx.long().clamp_min(0)
    gx = torch.zeros(B, length + 2 * kernel, G, device=gy.device, dtype=gy.dtype)  # room for any window
    gx.scatter_add_(1, pos + kernel, torch.where(kept, gy * scale, 0))
    return gx[:, kernel:kernel + length].contiguous()


@_max_pool_cl_backward.register_fake
def _(gy, idx, length, kernel, stride, pad, scale):
    return gy.new_empty(gy.shape[0], length, gy.shape[2])


def _pool_setup_context(ctx, inputs, output):
    x, kernel, stride, pad, drop, _seed = inputs
    ctx.save_for_backward(output[1])
    ctx.length, ctx.kernel, ctx.stride, ctx.pad = x.shape[1], kernel, stride, pad
    ctx.scale = 1.0 / (1.0 - drop)
    ctx.mark_non_differentiable(output[1])


def _pool_backward(ctx, gy, _gidx):
    (idx,) = ctx.saved_tensors
    gx = _max_pool_cl_backward(gy, idx, ctx.length, ctx.kernel, ctx.stride, ctx.pad, ctx.scale)
    return gx, None, None, None, None, None


max_pool_cl.register_autograd(_pool_backward, setup_context=_pool_setup_context)
