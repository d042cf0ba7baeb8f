"""A second alternative to cuDNN's grouped convolutions: Triton implicit-GEMM kernels over folds.

Measured slower than the default engine on an H100 (``benchmarks/RESULTS.md``, step 5), so it is
kept here, not in ``sleeplib``, to make that result reproducible::

    python3 benchmarks/fold_conv.py --folds 20 --batch 128           # layer by layer
    python3 benchmarks/train_speed.py --device cuda --folds 20 --epochs 3 --skip-naive \
        --amp bf16 --compile --fold-convs                             # in the engine

The idea: :class:`~sleeplib.train.fast.BatchedFolds` runs K fold models with ``torch.func.vmap``,
which turns every ``Conv1d`` into a grouped convolution with K groups, for which cuDNN transposes
each input and output between channels-first and channels-last (about 4 ms of a 17 ms 20-fold
AttnSleep step). Here the fold is an explicit leading dimension and each convolution (forward,
input gradient, weight gradient) is one Triton kernel that reads the input where it lies
(channels first, padding by masking): nothing is transposed, unfolded or copied. The profile
(``conv_layouts.py --engine-profile-only --compile --fold-convs``) showed the transposes gone
but these kernels 2-4x slower than cuDNN's on the 64- and 128-channel layers: their loads of
the shifted input windows are unaligned.

``conv1d_folds(x, w, stride, padding, l_out)`` takes ``x (G, B, C, L)`` and ``w (G, O, C, k)`` and
returns ``(G, B, O, l_out)`` with ``y[g] = conv1d(x[g], w[g], stride, padding)`` (``padding``
zeros on the left; the right side is zero wherever ``l_out`` reaches past the input). It is a
``torch.library`` custom op with autograd and a vmap rule that folds the vmapped dimension into
``G``, so the engine's ``vmap(functional_call(...))`` and ``torch.compile`` see one opaque
operation per layer. On CPU, or without Triton, it computes the same thing with grouped
``F.conv1d`` (the reference; ``tests/test_benchmarks.py`` checks the kernels against it, in
Triton's interpreter when Triton is installed).

:func:`use_fold_convs` swaps a model's ``Conv1d`` layers (in place) for subclasses whose
convolution goes through this op; parameters, buffers and state-dict keys are unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv1d_folds", "conv1d_folds_reference", "kernels_usable", "triton_available", "use_fold_convs"]


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def kernels_usable(x: Tensor) -> bool:
    """Whether Triton kernels run for ``x``: on CUDA, or in Triton's interpreter (CPU tests)."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests run the kernels interpreted
    return (x.is_cuda or interpret) and triton_available()


# ----------------------------------------------------------------------------- reference (CPU)
def _grouped(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    G, B, C, L = x.shape
    return x.transpose(0, 1).reshape(B, G * C, L), w.reshape(G * w.shape[1], C, w.shape[-1])


def _pad_to(x: Tensor, padding: int, extent: int) -> Tensor:
    """``x`` with ``padding`` zeros on the left, then cut or zero-filled to ``extent`` samples."""
    right = extent - x.shape[-1] - padding
    x = F.pad(x, (padding, max(right, 0)))
    return x[..., :extent]


def conv1d_folds_reference(x: Tensor, w: Tensor, stride: int, padding: int, l_out: int) -> Tensor:
    """``conv1d_folds`` with grouped ``F.conv1d`` (any device; what the kernels are tested against)."""
    G, B = x.shape[:2]
    k = w.shape[-1]
    xg, wg = _grouped(_pad_to(x, padding, (l_out - 1) * stride + k), w)
    return F.conv1d(xg, wg, stride=stride, groups=G).view(B, G, w.shape[1], l_out).transpose(0, 1)


def _grad_input_reference(gy: Tensor, w: Tensor, stride: int, padding: int, length: int) -> Tensor:
    G, B, O, l_out = gy.shape
    C, k = w.shape[2], w.shape[3]
    extent = (l_out - 1) * stride + k
    gyg = gy.transpose(0, 1).reshape(B, G * O, l_out)
    gx = torch.nn.grad.conv1d_input((B, G * C, extent), w.reshape(G * O, C, k), gyg, stride=stride, groups=G)
    gx = gx.view(B, G, C, extent).transpose(0, 1)
    # undo _pad_to: positions left of the input and past its end were constant zeros
    gx = F.pad(gx, (0, max(padding + length - extent, 0)))
    return gx[..., padding:padding + length]


def _grad_weight_reference(gy: Tensor, x: Tensor, stride: int, padding: int, k: int) -> Tensor:
    G, B, C, _ = x.shape
    O, l_out = gy.shape[2], gy.shape[3]
    xg, _ = _grouped(_pad_to(x, padding, (l_out - 1) * stride + k), x.new_empty(G, 1, C, 1))
    gyg = gy.transpose(0, 1).reshape(B, G * O, l_out)
    gw = torch.nn.grad.conv1d_weight(xg, (G * O, C, k), gyg, stride=stride, groups=G)
    return gw.view(G, O, C, k)


# ----------------------------------------------------------------------------- Triton kernels
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def conv_gemm(a_ptr, b_ptr, c_ptr, M, N, R, n_batch, b_len,
                  s_ag, s_am, s_aq, s_at, s_bg, s_bb, s_bq, s_cg, s_cb, s_cm,
                  conv_stride, offset,
                  TAPS: tl.constexpr, TAP_SIGN: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
        # c[g, bb, m, n] = sum_r a[g, m, r] * b[g, bb, r // TAPS, n * conv_stride + TAP_SIGN * (r % TAPS) + offset]
        # (b masked to [0, b_len): the padding). Forward: a = weights (m = out channel, r = (in channel,
        # tap)); input gradient: a = weights read transposed, b = output gradient, taps reversed.
        pid = tl.program_id(0)
        g = pid // n_batch
        bb = pid % n_batch
        offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(2) * BN + tl.arange(0, BN)
        a_base = a_ptr + g.to(tl.int64) * s_ag
        b_base = b_ptr + g.to(tl.int64) * s_bg + bb.to(tl.int64) * s_bb
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, R, BR):
            offs_r = r0 + tl.arange(0, BR)
            q = offs_r // TAPS
            t = offs_r % TAPS
            a = tl.load(a_base + offs_m[:, None] * s_am + q[None, :] * s_aq + t[None, :] * s_at,
                        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
            pos = offs_n[None, :] * conv_stride + TAP_SIGN * t[:, None] + offset
            b = tl.load(b_base + q[:, None] * s_bq + pos,
                        mask=(offs_r[:, None] < R) & (offs_n[None, :] < N) & (pos >= 0) & (pos < b_len),
                        other=0.0)
            acc += tl.dot(a, b)
        c = c_ptr + g.to(tl.int64) * s_cg + bb.to(tl.int64) * s_cb + offs_m[:, None] * s_cm + offs_n[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def conv_wgrad(gy_ptr, x_ptr, out_ptr, O, CK, l_out, length, n_batch, per_split,
                   s_yg, s_yb, s_yo, s_xg, s_xb, s_xc, s_og, s_os, s_oo,
                   conv_stride, padding, n_split,
                   TAPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
        # out[g, split, o, c * TAPS + t] = sum over this split's samples bb and positions l of
        # gy[g, bb, o, l] * x[g, bb, c, l * conv_stride + t - padding]
        pid = tl.program_id(0)
        g = pid // n_split
        split = pid % n_split
        offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(2) * BN + tl.arange(0, BN)
        c = offs_n // TAPS
        t = offs_n % TAPS
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i in range(0, per_split):
            bb = split * per_split + i
            l_lim = tl.where(bb < n_batch, l_out, 0)  # the last split may hold fewer samples
            y_base = gy_ptr + g.to(tl.int64) * s_yg + bb.to(tl.int64) * s_yb
            x_base = x_ptr + g.to(tl.int64) * s_xg + bb.to(tl.int64) * s_xb
            for l0 in range(0, l_out, BR):
                offs_l = l0 + tl.arange(0, BR)
                a = tl.load(y_base + offs_m[:, None] * s_yo + offs_l[None, :],
                            mask=(offs_m[:, None] < O) & (offs_l[None, :] < l_lim), other=0.0)
                pos = offs_l[:, None] * conv_stride + t[None, :] - padding
                b = tl.load(x_base + c[None, :] * s_xc + pos,
                            mask=(offs_l[:, None] < l_lim) & (offs_n[None, :] < CK) & (pos >= 0) & (pos < length),
                            other=0.0)
                acc += tl.dot(a, b)
        out = out_ptr + g.to(tl.int64) * s_og + split * s_os + offs_m[:, None] * s_oo + offs_n[None, :]
        tl.store(out, acc, mask=(offs_m[:, None] < O) & (offs_n[None, :] < CK))

    return conv_gemm, conv_wgrad


def _block(n: int, cap: int) -> int:
    """Smallest power of two >= n, at least 16 (tl.dot's minimum), at most cap."""
    b = 16
    while b < n and b < cap:
        b *= 2
    return b


def _gemm_launch(a, b, out, M, N, R, b_len, a_strides, conv_stride, offset, taps, tap_sign):
    import triton

    conv_gemm, _ = _kernels()
    G, n_batch = out.shape[0], out.shape[1]
    BM, BN, BR = _block(M, 128), _block(N, 128), _block(R, 64)
    grid = (G * n_batch, triton.cdiv(M, BM), triton.cdiv(N, BN))
    conv_gemm[grid](a, b, out, M, N, R, n_batch, b_len,
                    a_strides[0], a_strides[1], a_strides[2], a_strides[3],
                    b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1), out.stride(2),
                    conv_stride, offset, TAPS=taps, TAP_SIGN=tap_sign, BM=BM, BN=BN, BR=BR,
                    num_warps=8 if BM * BN >= 128 * 128 else 4, num_stages=3)
    return out


def _forward_kernel(x: Tensor, w: Tensor, stride: int, padding: int, l_out: int) -> Tensor:
    G, B, C, L = x.shape
    O, k = w.shape[1], w.shape[3]
    out = torch.empty(G, B, O, l_out, device=x.device, dtype=x.dtype)
    # a[g, m=o, r=(c, t)] = w[g, o, c, t]
    return _gemm_launch(w, x, out, O, l_out, C * k, L, (w.stride(0), w.stride(1), w.stride(2), w.stride(3)),
                        stride, -padding, k, 1)


def _grad_input_kernel(gy: Tensor, w: Tensor, padding: int, length: int) -> Tensor:
    G, B, O, l_out = gy.shape
    C, k = w.shape[2], w.shape[3]
    gx = torch.empty(G, B, C, length, device=gy.device, dtype=gy.dtype)
    # gx[g, b, c, i] = sum_{o, t} w[g, o, c, t] * gy[g, b, o, i + padding - t]
    return _gemm_launch(w, gy, gx, C, length, O * k, l_out, (w.stride(0), w.stride(2), w.stride(1), w.stride(3)),
                        1, padding, k, -1)


def _grad_weight_kernel(gy: Tensor, x: Tensor, stride: int, padding: int, k: int) -> Tensor:
    import triton

    _, conv_wgrad = _kernels()
    G, B, C, L = x.shape
    O, l_out = gy.shape[2], gy.shape[3]
    CK = C * k
    BM, BN, BR = _block(O, 128), _block(CK, 128), _block(l_out, 64)
    tiles = triton.cdiv(O, BM) * triton.cdiv(CK, BN) * G
    # split the samples so that there are enough programs to fill the GPU (fp32 partial sums)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    n_split = max(1, min(B, -(-4 * sms // tiles)))
    per_split = -(-B // n_split)
    n_split = -(-B // per_split)
    part = torch.empty(G, n_split, O, CK, device=x.device, dtype=torch.float32)
    grid = (G * n_split, triton.cdiv(O, BM), triton.cdiv(CK, BN))
    conv_wgrad[grid](gy, x, part, O, CK, l_out, L, B, per_split,
                     gy.stride(0), gy.stride(1), gy.stride(2), x.stride(0), x.stride(1), x.stride(2),
                     part.stride(0), part.stride(1), part.stride(2), stride, padding, n_split,
                     TAPS=k, BM=BM, BN=BN, BR=BR, num_warps=8 if BM * BN >= 128 * 128 else 4, num_stages=3)
    return part.sum(1).view(G, O, C, k)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sleeplib_bench::conv1d_folds", mutates_args=())
def conv1d_folds(x: Tensor, w: Tensor, stride: int, padding: int, l_out: int) -> Tensor:
    """``(G, B, C, L) x (G, O, C, k) -> (G, B, O, l_out)``: G independent ``conv1d`` s (see module doc)."""
    if x.ndim != 4 or w.ndim != 4 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[2]:
        raise ValueError(f"conv1d_folds needs x (G, B, C, L) and w (G, O, C, k) with the same G and C, "
                         f"got {tuple(x.shape)} and {tuple(w.shape)}")
    if kernels_usable(x):
        return _forward_kernel(x.contiguous(), w.contiguous(), stride, padding, l_out)
    return conv1d_folds_reference(x, w, stride, padding, l_out).contiguous()


@conv1d_folds.register_fake
def _(x, w, stride, padding, l_out):
    return x.new_empty(x.shape[0], x.shape[1], w.shape[1], l_out)


@torch.library.custom_op("sleeplib_bench::conv1d_folds_grad_input", mutates_args=())
def _conv1d_folds_grad_input(gy: Tensor, w: Tensor, stride: int, padding: int, length: int) -> Tensor:
    if kernels_usable(gy) and stride == 1:
        return _grad_input_kernel(gy.contiguous(), w.contiguous(), padding, length)
    return _grad_input_reference(gy, w, stride, padding, length).contiguous()


@_conv1d_folds_grad_input.register_fake
def _(gy, w, stride, padding, length):
    return gy.new_empty(gy.shape[0], gy.shape[1], w.shape[2], length)


@torch.library.custom_op("sleeplib_bench::conv1d_folds_grad_weight", mutates_args=())
def _conv1d_folds_grad_weight(gy: Tensor, x: Tensor, stride: int, padding: int, k: int) -> Tensor:
    if kernels_usable(x):
        return _grad_weight_kernel(gy.contiguous(), x.contiguous(), stride, padding, k).to(x.dtype)
    return _grad_weight_reference(gy, x, stride, padding, k).contiguous()


@_conv1d_folds_grad_weight.register_fake
def _(gy, x, stride, padding, k):
    return x.new_empty(x.shape[0], gy.shape[2], x.shape[2], k)


def _setup_context(ctx, inputs, output):
    x, w, stride, padding, _ = inputs
    ctx.save_for_backward(x, w)
    ctx.stride, ctx.padding = stride, padding


def _backward(ctx, gy):
    x, w = ctx.saved_tensors
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = _conv1d_folds_grad_input(gy, w, ctx.stride, ctx.padding, x.shape[-1])
    if ctx.needs_input_grad[1]:
        gw = _conv1d_folds_grad_weight(gy, x, ctx.stride, ctx.padding, w.shape[-1])
    return gx, gw, None, None, None


conv1d_folds.register_autograd(_backward, setup_context=_setup_context)


@conv1d_folds.register_vmap
def _(info, in_dims, x, w, stride, padding, l_out):
    # the vmapped dimension (folds) joins G: one launch for all of them
    V = info.batch_size
    x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(V, *x.shape)
    w = w.movedim(in_dims[1], 0) if in_dims[1] is not None else w.expand(V, *w.shape)
    G = x.shape[1]
    out = conv1d_folds(x.reshape(V * G, *x.shape[2:]), w.reshape(V * G, *w.shape[2:]), stride, padding, l_out)
    return out.view(V, G, *out.shape[1:]), 0


# ----------------------------------------------------------------------------- modules
class _FoldConvMixin:
    """``Conv1d._conv_forward`` through :func:`conv1d_folds` (one fold here; vmap adds the rest)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        stride, pad, k = self.stride[0], self.padding[0], self.kernel_size[0]
        l_out = (x.shape[-1] + 2 * pad - k) // stride + 1
        unbatched = x.ndim == 2
        if unbatched:
            x = x.unsqueeze(0)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        else:
            weight = weight.to(x.dtype)
        y = conv1d_folds(x.unsqueeze(0), weight.unsqueeze(0), stride, pad, l_out).squeeze(0)
        if bias is not None:
            y = y + bias.to(y.dtype).unsqueeze(-1)
        return y.squeeze(0) if unbatched else y


def _supported(conv: nn.Conv1d) -> bool:
    return (conv.groups == 1 and conv.dilation[0] == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple))


def use_fold_convs(model: nn.Module) -> int:
    """Route every supported ``Conv1d`` of ``model`` through :func:`conv1d_folds`, in place.

    Changes only the class of each layer (to a subclass of its own class), so parameters, their
    names and everything the layer's own ``forward`` does (causal padding, say) stay. Layers with
    groups, dilation or non-zero padding modes are left as they are. Returns how many were swapped.
    """
    from sleeplib.models.blocks import UnfoldConv1d

    swapped = 0
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, nn.Conv1d) or isinstance(module, _FoldConvMixin) or not _supported(module):
            continue
        module.__class__ = _fold_class(cls, issubclass(cls, UnfoldConv1d))
        swapped += 1
    return swapped


def with_fold_convs(model_fn):
    """``model_fn`` whose models have their convolutions swapped by :func:`use_fold_convs`."""

    def build():
        model = model_fn()
        use_fold_convs(model)
        return model

    return build


@functools.cache
def _fold_class(cls: type, plain_forward: bool) -> type:
    namespace = {"__module__": __name__}
    if plain_forward:
        namespace["forward"] = nn.Conv1d.forward  # UnfoldConv1d: the kernel needs no unfolding
    return type(f"Fold{cls.__name__}", (_FoldConvMixin, cls), namespace)
