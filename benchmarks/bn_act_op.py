"""Training-mode batch norm fused with its activation, on channels-last rows: Triton kernels.

Used by ``benchmarks/stacked_layout.py --cl-convs --fused`` for the MRCNN's
``BatchNorm1d -> GELU`` pairs (``benchmarks/RESULTS.md``, step 7). In the ``(B, L, K, C)``
layout each fold's batch norm is a column-wise normalisation of the contiguous ``(B*L, K*C)``
matrix. Left to inductor (step 6's profile), each such pair cost about 0.9 ms a step on an
H200 at Sleep-EDF's size, in seven kernels, with the fp32 normalised values written out for
the backward; the traffic it needs is four passes forward and backward over bf16 data.

``bn_act_cl(x, weight, bias, shift, eps, act)``: ``x (R, N)`` contiguous; returns
``act((x - mean) * rstd * weight + bias)`` in ``x``'s dtype and the batch's ``mean`` and
``rstd = 1 / sqrt(var + eps)`` (biased variance, fp32) for the caller to update its running
statistics. The sums are taken around ``shift`` (the running mean: close to the batch mean, so
``E[(x - s)^2] - E[x - s]^2`` loses little to cancellation). Forward: a statistics pass
(partial sums per row split, deterministic: no atomics), a small finalising kernel, and one
pass that normalises and activates. Backward: one pass for the two column sums, one for the
input gradient; the activation is recomputed from ``x``, nothing else is saved.

``bn_act_eval_cl(x, weight, bias, running_mean, running_var, eps, act)``: the evaluation-mode
batch norm (the running statistics) and ``act``, by the same normalising pass alone, for inference
(no gradient). Eagerly, ``F.batch_norm`` in fp32 and ``F.gelu`` move some 29 bytes an element through
five kernels against this pass's 4 (bf16 in, bf16 out).

On CPU without Triton's interpreter, the reference in plain PyTorch (what the kernels are tested
against, in ``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from fold_conv_op import kernels_usable  # CUDA, or Triton's interpreter

__all__ = ["ACTIVATIONS", "bn_act_cl", "bn_act_eval_cl", "bn_act_reference"]

ACTIVATIONS = {"none": 0, "gelu": 1, "relu": 2}
"""The activations fused (``gelu``: the exact, erf form, as ``nn.GELU()``)."""


# ----------------------------------------------------------------------------- reference
def _act(z: Tensor, act: str) -> Tensor:
    if act == "gelu":
        return torch.nn.functional.gelu(z)
    return torch.relu(z) if act == "relu" else z


def _act_grad(z: Tensor, act: str) -> Tensor:
    if act == "gelu":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return (z > 0).to(z.dtype) if act == "relu" else torch.ones_like(z)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bn_act_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float, act: str):
    """``(y, mean, rstd)`` of :func:`bn_act_cl` in plain PyTorch."""
    xf = x.to(_acc_dtype(x))
    mean = xf.mean(0)
    rstd = torch.rsqrt(xf.var(0, unbiased=False) + eps)
    y = _act((xf - mean) * rstd * weight.to(xf.dtype) + bias.to(xf.dtype), act)
    return y.to(x.dtype), mean, rstd


def bn_act_eval_reference(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                          eps: float, act: str) -> Tensor:
    """:func:`bn_act_eval_cl` in plain PyTorch."""
    acc = _acc_dtype(x)
    rstd = torch.rsqrt(running_var.to(acc) + eps)
    y = (x.to(acc) - running_mean.to(acc)) * rstd * weight.to(acc) + bias.to(acc)
    return _act(y, act).to(x.dtype)


def _backward_reference(gy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, act: str):
    xf = x.to(mean.dtype)
    xhat = (xf - mean) * rstd
    w = weight.to(mean.dtype)
    g = gy.to(mean.dtype) * _act_grad(xhat * w + bias.to(mean.dtype), act)
    gb, gw = g.sum(0), (g * xhat).sum(0)
    gx = w * rstd * (g - gb / x.shape[0] - xhat * gw / x.shape[0])
    return gx.to(x.dtype), gw.to(weight.dtype), gb.to(bias.dtype)


# ----------------------------------------------------------------------------- kernels
# at module level (jit helpers are looked up among the module's globals), when Triton is installed
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference
    triton = None

if triton is not None:
    @triton.jit
    def _normal_cdf_and_density(z):
        # Phi(z) and phi(z) for the exact GELU: erf by Abramowitz & Stegun 7.1.26 (absolute error
        # < 1.5e-7), which shares its exp(-z^2 / 2) with the density. With libdevice's erf the
        # normalisation and both backward passes took 10-17% longer (H100 profiles, step 8)
        e = tl.exp(-0.5 * z * z)
        t = 1.0 / (1.0 + 0.2316418882663604 * tl.abs(z))  # p = 0.3275911 of the erf form, times 1/sqrt(2)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        q = 0.5 * poly * e
        return tl.where(z >= 0.0, 1.0 - q, q), e * 0.3989422804014327

    @triton.jit
    def _activate(z, ACT: tl.constexpr):
        if ACT == 1:
            cdf, _ = _normal_cdf_and_density(z)
            return z * cdf
        elif ACT == 2:
            return tl.maximum(z, 0.0)
        else:
            return z

    @triton.jit
    def _activate_grad(z, ACT: tl.constexpr):
        if ACT == 1:
            cdf, density = _normal_cdf_and_density(z)
            return cdf + z * density
        elif ACT == 2:
            return tl.where(z > 0.0, 1.0, 0.0)
        else:
            return tl.full(z.shape, 1.0, tl.float32)

    # row blocks tuned per shape on first use (the engine's eager warm-up, before graph capture);
    # in the interpreter the plain kernels (``.fn``) run with a fixed block
    # by default the rows and warps that tuning chose (_CHOSEN: an H200 in step 7, an H100 in step
    # 10); AUTOTUNE=1 in the environment: tune, which compiles every candidate
    _ROW_CONFIGS = [triton.Config({"BR": br}, num_warps=w) for br in (16, 32, 64) for w in (4, 8)]

    def _tuned(kernel):
        return triton.autotune(_ROW_CONFIGS, key=["R", "N", "BN"])(kernel)

    @triton.jit
    def _columns(mean_ptr, rstd_ptr, w_ptr, b_ptr, cols, c_ok):
        return (tl.load(mean_ptr + cols, mask=c_ok, other=0.0), tl.load(rstd_ptr + cols, mask=c_ok, other=0.0),
                tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32),
                tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32))

    @triton.jit
    def _gradient_before_activation(gy_ptr, x_ptr, at, ok, mean, rstd, w, b, ACT: tl.constexpr):
        # (g, xhat): the gradient reaching the normalised values (the activation recomputed), and them
        xhat = (tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        g = tl.load(gy_ptr + at, mask=ok, other=0.0).to(tl.float32) * _activate_grad(xhat * w[None, :] + b[None, :], ACT)
        return tl.where(ok, g, 0.0), xhat

    @triton.jit
    def _split(R, N, per_split, BR: tl.constexpr, BN: tl.constexpr):
        # a reducing pass's program: its row split, its column block and two zeroed accumulators
        split = tl.program_id(0)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        r_start = split * per_split
        return (split, cols, cols < N, r_start, tl.minimum(r_start + per_split, R),
                tl.zeros((BR, BN), dtype=tl.float32), tl.zeros((BR, BN), dtype=tl.float32))

    @triton.jit
    def _store_partials(part_ptr, split, N, cols, c_ok, acc1, acc2):
        # part[split, 0 | 1, n]: the two column sums of this split's rows
        base = part_ptr + split * 2 * N + cols
        tl.store(base, tl.sum(acc1, 0), mask=c_ok)
        tl.store(base + N, tl.sum(acc2, 0), mask=c_ok)

    @triton.jit
    def _sum_partials(part_ptr, N, n_split, cols, c_ok, BN: tl.constexpr):
        s1 = tl.zeros((BN,), dtype=tl.float32)
        s2 = tl.zeros((BN,), dtype=tl.float32)
        for i in range(n_split):
            s1 += tl.load(part_ptr + i * 2 * N + cols, mask=c_ok, other=0.0)
            s2 += tl.load(part_ptr + i * 2 * N + N + cols, mask=c_ok, other=0.0)
        return s1, s2

    @_tuned
    @triton.jit
    def stats(x_ptr, shift_ptr, part_ptr, R, N, per_split, BR: tl.constexpr, BN: tl.constexpr):
        # part[split, 0 | 1, n] = sum over the split's rows of (x - shift), (x - shift)^2
        split, cols, c_ok, r_start, r_end, acc1, acc2 = _split(R, N, per_split, BR, BN)
        s = tl.load(shift_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        for r0 in range(r_start, r_end, BR):
            rows = r0 + tl.arange(0, BR)
            ok = (rows < r_end)[:, None] & c_ok[None, :]
            v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, v - s[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        _store_partials(part_ptr, split, N, cols, c_ok, acc1, acc2)

    @triton.jit
    def stats_finish(part_ptr, shift_ptr, mean_ptr, rstd_ptr, R, N, n_split, eps, BN: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        c_ok = cols < N
        s1, s2 = _sum_partials(part_ptr, N, n_split, cols, c_ok, BN)
        m = s1 / R
        var = tl.maximum(s2 / R - m * m, 0.0)
        tl.store(mean_ptr + cols, tl.load(shift_ptr + cols, mask=c_ok, other=0.0).to(tl.float32) + m, mask=c_ok)
        tl.store(rstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=c_ok)

    @_tuned
    @triton.jit
    def normalise(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, R, N,
                  ACT: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        c_ok = cols < N
        a = tl.load(rstd_ptr + cols, mask=c_ok, other=0.0) * tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        c = tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32) - tl.load(mean_ptr + cols, mask=c_ok, other=0.0) * a
        ok = (rows < R)[:, None] & c_ok[None, :]
        at = rows.to(tl.int64)[:, None] * N + cols[None, :]
        v = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + at, _activate(v * a[None, :] + c[None, :], ACT).to(y_ptr.dtype.element_ty), mask=ok)

    @_tuned
    @triton.jit
    def grad_sums(gy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, part_ptr, R, N, per_split,
                  ACT: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
        # part[split, 0 | 1, n] = sum over the split's rows of g, g * xhat (g: gradient before the activation)
        split, cols, c_ok, r_start, r_end, acc_g, acc_gx = _split(R, N, per_split, BR, BN)
        mean, rstd, w, b = _columns(mean_ptr, rstd_ptr, w_ptr, b_ptr, cols, c_ok)
        for r0 in range(r_start, r_end, BR):
            rows = r0 + tl.arange(0, BR)
            ok = (rows < r_end)[:, None] & c_ok[None, :]
            g, xhat = _gradient_before_activation(gy_ptr, x_ptr, rows.to(tl.int64)[:, None] * N + cols[None, :], ok,
                                                  mean, rstd, w, b, ACT)
            acc_g += g
            acc_gx += g * xhat
        _store_partials(part_ptr, split, N, cols, c_ok, acc_g, acc_gx)

    @triton.jit
    def grad_finish(part_ptr, gw_ptr, gb_ptr, N, n_split, BN: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        c_ok = cols < N
        s1, s2 = _sum_partials(part_ptr, N, n_split, cols, c_ok, BN)
        tl.store(gb_ptr + cols, s1, mask=c_ok)
        tl.store(gw_ptr + cols, s2, mask=c_ok)

    @_tuned
    @triton.jit
    def grad_input(gy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, gx_ptr, R, N,
                   ACT: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
        # gx = w * rstd * (g - mean(g) - xhat * mean(g * xhat))
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        c_ok = cols < N
        mean, rstd, w, b = _columns(mean_ptr, rstd_ptr, w_ptr, b_ptr, cols, c_ok)
        mg = tl.load(gb_ptr + cols, mask=c_ok, other=0.0) / R
        mgx = tl.load(gw_ptr + cols, mask=c_ok, other=0.0) / R
        ok = (rows < R)[:, None] & c_ok[None, :]
        at = rows.to(tl.int64)[:, None] * N + cols[None, :]
        g, xhat = _gradient_before_activation(gy_ptr, x_ptr, at, ok, mean, rstd, w, b, ACT)
        gx = (w * rstd)[None, :] * (g - mg[None, :] - xhat * mgx[None, :])
        tl.store(gx_ptr + at, gx.to(gx_ptr.dtype.element_ty), mask=ok)


_CHOSEN = {"stats": (32, 4), "normalise": (16, 4), "grad_sums": (16, 4), "grad_input": (16, 4)}
"""Row block and warps of each streaming kernel (without AUTOTUNE=1): what tuning chose on an H100
(step 10, ``AUTOTUNE=1 python3 benchmarks/bn_act_op.py``: 0.854 ms against 0.869 ms with the H200's
choice of step 7, (32, 8) and (32, 4) for the two backward passes)."""


def _blocks(x: Tensor) -> tuple[int, int, int, int]:
    """Column block, row split, number of splits of the reducing passes (about eight blocks per SM;
    a split is a multiple of the largest row block), and the row block when not autotuned."""
    R, N = x.shape
    BN = 128 if N >= 128 else max(16, triton.next_power_of_2(N))
    BR = 64 if x.is_cuda else 8  # on CUDA the largest the tuner may pick
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    n_split = max(1, min(triton.cdiv(R, BR), triton.cdiv(8 * sms, triton.cdiv(N, BN))))
    per_split = triton.cdiv(triton.cdiv(R, n_split), BR) * BR
    return BN, per_split, triton.cdiv(R, per_split), BR


def _launch(kernel, grid_rows: int | None, cblocks: int, x: Tensor, *args, **meta) -> None:
    """Run ``kernel`` on a (row blocks or splits, column blocks) grid: autotuned row blocks on CUDA
    (``grid_rows=None``: one row block a program), ``BR`` from :func:`_blocks` in the interpreter."""
    if x.is_cuda and os.environ.get("AUTOTUNE") == "1":
        grid = (lambda m: (triton.cdiv(x.shape[0], m["BR"]), cblocks)) if grid_rows is None else (grid_rows, cblocks)
        kernel[grid](*args, **meta)
    elif x.is_cuda:
        BR, warps = _CHOSEN[kernel.fn.__name__]
        grid = (triton.cdiv(x.shape[0], BR) if grid_rows is None else grid_rows, cblocks)
        kernel.fn[grid](*args, BR=BR, num_warps=warps, **meta)
    else:
        BR = _blocks(x)[3]
        grid = (triton.cdiv(x.shape[0], BR) if grid_rows is None else grid_rows, cblocks)
        kernel.fn[grid](*args, BR=BR, **meta)


def _check(x: Tensor, *vectors: Tensor) -> None:
    if x.ndim != 2 or not x.is_contiguous():
        raise ValueError(f"bn_act_cl needs x as a contiguous (rows, channels) matrix, got shape {tuple(x.shape)} "
                         f"and strides {x.stride()}")
    for v in vectors:
        if v.shape != (x.shape[1],):
            raise ValueError(f"bn_act_cl needs per-channel vectors of shape ({x.shape[1]},), got {tuple(v.shape)}")


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sleeplib_bench::bn_act_cl", mutates_args=())
def bn_act_cl(x: Tensor, weight: Tensor, bias: Tensor, shift: Tensor, eps: float, act: str) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm over the rows of ``x (R, N)`` and ``act`` (module doc); returns
    ``(y, mean, rstd)``."""
    if act not in ACTIVATIONS:
        raise ValueError(f"bn_act_cl's act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    _check(x, weight, bias, shift)
    if not kernels_usable(x):
        return bn_act_reference(x, weight, bias, eps, act)
    R, N = x.shape
    BN, per_split, n_split, _ = _blocks(x)
    acc = _acc_dtype(x)
    part = torch.empty(n_split, 2, N, device=x.device, dtype=acc)
    mean = torch.empty(N, device=x.device, dtype=acc)
    rstd = torch.empty(N, device=x.device, dtype=acc)
    y = torch.empty_like(x)
    cblocks = triton.cdiv(N, BN)
    _launch(stats, n_split, cblocks, x, x, shift, part, R, N, per_split, BN=BN)
    stats_finish[(cblocks,)](part, shift, mean, rstd, R, N, n_split, eps, BN=BN)
    _launch(normalise, None, cblocks, x, x, y, mean, rstd, weight, bias, R, N, ACT=ACTIVATIONS[act], BN=BN)
    return y, mean, rstd


@bn_act_cl.register_fake
def _(x, weight, bias, shift, eps, act):
    acc = _acc_dtype(x)
    return torch.empty_like(x), x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


@torch.library.custom_op("sleeplib_bench::bn_act_eval_cl", mutates_args=())
def bn_act_eval_cl(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                   eps: float, act: str) -> Tensor:
    """Evaluation-mode batch norm of ``x (R, N)`` with the running statistics, and ``act``, in ``x``'s
    dtype: ``act((x - running_mean) / sqrt(running_var + eps) * weight + bias)``. For inference: it
    has no gradient (call it under ``torch.no_grad()``)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"bn_act_eval_cl's act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    _check(x, weight, bias, running_mean, running_var)
    if not kernels_usable(x):
        return bn_act_eval_reference(x, weight, bias, running_mean, running_var, eps, act)
    R, N = x.shape
    BN = _blocks(x)[0]
    acc = _acc_dtype(x)
    mean = running_mean.to(acc).contiguous()
    rstd = torch.rsqrt(running_var.to(acc) + eps)
    y = torch.empty_like(x)
    _launch(normalise, None, triton.cdiv(N, BN), x, x, y, mean, rstd, weight, bias, R, N, ACT=ACTIVATIONS[act], BN=BN)
    return y


@bn_act_eval_cl.register_fake
def _(x, weight, bias, running_mean, running_var, eps, act):
    return torch.empty_like(x)


@torch.library.custom_op("sleeplib_bench::bn_act_cl_backward", mutates_args=())
def _bn_act_cl_backward(gy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                        act: str) -> tuple[Tensor, Tensor, Tensor]:
    gy = gy.contiguous()
    if not kernels_usable(x):
        return _backward_reference(gy, x, weight, bias, mean, rstd, act)
    R, N = x.shape
    BN, per_split, n_split, _ = _blocks(x)
    part = torch.empty(n_split, 2, N, device=x.device, dtype=mean.dtype)
    gw = torch.empty(N, device=x.device, dtype=mean.dtype)
    gb = torch.empty(N, device=x.device, dtype=mean.dtype)
    gx = torch.empty_like(x)
    cblocks = triton.cdiv(N, BN)
    code = ACTIVATIONS[act]
    _launch(grad_sums, n_split, cblocks, x, gy, x, mean, rstd, weight, bias, part, R, N, per_split, ACT=code, BN=BN)
    grad_finish[(cblocks,)](part, gw, gb, N, n_split, BN=BN)
    _launch(grad_input, None, cblocks, x, gy, x, mean, rstd, weight, bias, gw, gb, gx, R, N, ACT=code, BN=BN)
    return gx, gw.to(weight.dtype), gb.to(bias.dtype)


@_bn_act_cl_backward.register_fake
def _(gy, x, weight, bias, mean, rstd, act):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _shift, _eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.act = act
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, gy, _gmean, _grstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    gx, gw, gb = _bn_act_cl_backward(gy, x, weight, bias, mean, rstd, ctx.act)
    return gx, gw, gb, None, None, None


bn_act_cl.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- benchmark
def main(argv=None) -> dict:
    """Time forward + backward of the fused op against ``torch.compile`` of ``F.batch_norm`` (fp32)
    and ``F.gelu``, at the MRCNN's largest size, and check they agree (CUDA only)::

        python3 benchmarks/bn_act_op.py --rows 32256 --channels 2560
    """
    import argparse
    import json
    import os
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(description="bn_act_cl against torch.compile'd batch norm + GELU")
    ap.add_argument("--rows", type=int, default=128 * 252, help="B * L (batch 128, the MRCNN's 252 positions)")
    ap.add_argument("--channels", type=int, default=20 * 128, help="K * C (20 folds of 128 channels)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bn_act_op.py times CUDA kernels; no CUDA GPU here")
    g = torch.Generator(device="cuda").manual_seed(0)
    R, N = args.rows, args.channels
    x = (torch.randn(R, N, device="cuda", generator=g) * 2 + 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.rand(N, device="cuda", generator=g) + 0.5).requires_grad_()
    b = (0.1 * torch.randn(N, device="cuda", generator=g)).requires_grad_()
    shift = torch.zeros(N, device="cuda")
    gy = torch.randn(R, N, device="cuda", generator=g).to(torch.bfloat16)

    def fused():
        y, _, _ = bn_act_cl(x, w, b, shift, 1e-5, "gelu")
        return (y, *torch.autograd.grad(y, (x, w, b), gy))

    @torch.compile
    def unfused_forward(x, w, b):  # what the engine did: stacked_layout's _batch_norm in fp32, GELU, back to bf16
        y = torch.nn.functional.batch_norm(x.float(), None, None, w, b, True, 0.1, 1e-5)
        return torch.nn.functional.gelu(y).to(torch.bfloat16)

    def unfused():
        y = unfused_forward(x, w, b)
        return (y, *torch.autograd.grad(y, (x, w, b), gy))

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.reps):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / args.reps

    got, want = fused(), unfused()
    errors = {name: float((a.float() - e.float()).norm() / e.float().norm())
              for name, a, e in zip(("y", "grad_x", "grad_w", "grad_b"), got, want)}
    t_fused, t_unfused = timed(fused), timed(unfused)
    moved = R * N * 2 * 8  # bytes: bf16 matrices read 6 times, written twice (statistics, normalisation, 2 backward passes)
    result = {"rows": R, "channels": N, "fused_ms": t_fused, "compiled_ms": t_unfused,
              "speedup": t_unfused / t_fused, "fused_GBps": moved / t_fused / 1e6, "rel_errors": errors,
              "device": torch.cuda.get_device_name()}
    print(f"batch norm + GELU, forward + backward, ({R}, {N}) bf16 on {result['device']}: fused {t_fused:.3f} ms "
          f"({result['fused_GBps']:.0f} GB/s of the minimum traffic), torch.compile {t_unfused:.3f} ms: "
          f"{result['speedup']:.2f}x; rel. errors " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    path = args.json or (os.path.join(os.environ["OUT"], "bn_act.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
