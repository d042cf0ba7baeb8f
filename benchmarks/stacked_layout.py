"""Benchmark of an alternative to vmap: K fold models run as one network, folds in the channels.

As first written (cuDNN's grouped convolutions), measured slower than the vmap engine on an H100
(``benchmarks/RESULTS.md``, step 4); with ``--cl-convs`` (step 6: the MRCNN and the AFR on
channels-last ``(B, L, K, C)`` tensors, convolutions and max-pooling by the Triton kernels of
``cl_conv_op.py``) 1.16x faster than it in the same run on an H200; with ``--cl-convs --fused``
(step 7: also the first layers read as windows, channels padded to 16 bytes, batch norm + GELU by
``bn_act_op.py``, the parameters' gradient as one ``cat``) 1.49x. It stays here, not in ``sleeplib``,
because it needs Triton and runs only AttnSleep's module types::

    python3 benchmarks/stacked_layout.py --device cuda --folds 20 --epochs 3 --skip-naive --amp bf16 --compile
    python3 benchmarks/stacked_layout.py --device cuda --folds 20 --epochs 3 --skip-naive --amp bf16 --compile --cl-convs --fused

(``--tce-cudnn``: the TCE's convolutions by cuDNN instead; ``--einsum-1x1``: the AFR's 1x1 ones as
``einsum``; both measured no faster. ``--unaligned``: channels not padded. ``--strided-windows``: the
first layers' windows all read in place. ``--warm-kernels``: compile this configuration's Triton
kernels in child processes while the engine compiles its graphs (step 8; since step 10 in
:data:`WARM_SHARDS` of them, each its share; since step 14 started with the engine's timed build);
``--tce-contiguous``: the TCE's tensors in their own order, step 8. ``--attention-kernel``: the TCE's attention by
``attention_op.py``, step 9. ``--no-tma``: ``cl_conv_op``'s convolutions by pointer loads only, as
before step 10.) The whole schedule from a cold start, as measured last in step 17::

    python3 benchmarks/stacked_layout.py --device cuda --skip-naive --amp bf16 --compile --cl-convs --fused \
        --full-only --lean-compile --eager-eval --warm-kernels --tce-contiguous --cudnn-heuristics \
        --attention-kernel --cold-start-report --compile-helpers --train-while-compiling

It takes :mod:`benchmarks.train_speed`'s arguments and runs it with
:meth:`~sleeplib.train.fast.BatchedFolds._forward_all_eager` replaced by :func:`stacked_forward`.

The idea: ``torch.func.vmap`` over ``functional_call`` runs K fold models generically, but its
batching rules make every convolution a grouped convolution on ``(B, K*C, L)`` in channels-first
memory, for which cuDNN transposes each input and output to channels-last and back.
:func:`stacked_forward` interprets the same ``nn.Module`` tree with the same stacked parameters
but picks the layout itself:

* per-fold activations ``(B, C, L)`` become ``(B, K, C, L)`` tensors, channels-last in memory,
  so a convolution is a grouped ``conv2d`` of height 1 on ``(B, K*C, 1, L)`` that needs no
  transposes, and batch norm over ``K*C`` channels is exactly each fold's own batch norm;
* the first MRCNN convolutions (:class:`~sleeplib.models.blocks.UnfoldConv1d`) are one batched
  matrix product over folds, linear layers batched matrix products (``einsum``);
* everything else is element-wise, for ``torch.compile`` to fuse.

What the profile showed instead: cuDNN serves these grouped convolutions by slicing the channels
group by group (``nhwcSliceCKernel``) and transforming tensors (``tensorTransformGeneric``, 4 ms a
step), and inductor replaces the attention by cuDNN's flash-attention kernels, slow for 30
tokens. Only the module types in :data:`HANDLERS` are supported (exact types);
``tests/test_benchmarks.py`` checks AttnSleep's output and gradients against vmap.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cl_conv_op  # noqa: E402
from attention_op import attention_cl, attention_reference  # noqa: E402
from bn_act_op import bn_act_cl, bn_act_eval_cl  # noqa: E402
from cl_conv_op import conv1d_cl, conv1d_windows, kernels_usable, max_pool_cl  # noqa: E402

from sleeplib.models.attnsleep import AttnSleep  # noqa: E402
from sleeplib.models.blocks import (  # noqa: E402
    MRCNN,
    TCE,
    CausalConv1d,
    CausalConvMultiHeadAttention,
    FlattenLinearHead,
    PositionwiseFeedForward,
    SEResidualBlock1d,
    SqueezeExcitation1d,
    StdLayerNorm,
    TCEEncoderLayer,
    UnfoldConv1d,
)

__all__ = ["stacked_forward", "supports", "HANDLERS", "use_stacked_forward"]


CL_OUTSIDE = True
"""With cl_convs, also the TCE's convolutions by cl_conv_op (``--tce-cudnn``: cuDNN grouped, transposes)."""
EINSUM_1X1 = False
"""With cl_convs, the AFR's 1x1 convolutions as ``einsum`` (``--einsum-1x1``) instead of cl_conv_op."""
ALIGN_CHANNELS = 8
"""With cl_convs, convolutions' channels are zero-padded to a multiple of this (16 bytes in bf16);
``--unaligned``: 1, none."""
TCE_CONTIGUOUS = False
"""With cl_convs (``--tce-contiguous``): the TCE's ``(B, K, T, D)`` tensors copied to that order (its
layer norms reduce along ``D``) instead of left as views of the AFR's ``(B, L, K, C)`` memory."""
ALIGNED_WINDOWS = True
"""With cl_convs, the first layers' windows read from the signal cut into 16-byte aligned chunks
(:func:`_aligned_windows`) where that costs no extra work (:func:`_aligning_is_free`: the large
branch); ``--strided-windows``: all in place, ``stride`` samples apart (step 7)."""
FUSED = False
"""With cl_convs (``--fused``): each ``BatchNorm1d -> GELU`` pair of a ``Sequential`` (the MRCNN's) by
``bn_act_op.bn_act_cl`` in training and by ``bn_act_op.bn_act_eval_cl`` in evaluation without
gradients (one pass instead of eager fp32 batch norm and GELU), each ``MaxPool1d -> Dropout`` pair by
``max_pool_cl`` with its dropout in training, instead of inductor's kernels."""
ATTENTION_KERNEL = False
"""With cl_convs (``--attention-kernel``): the TCE's multi-head attention (scores, softmax, dropout,
weighted values, for every head) by ``attention_op.attention_cl``, one Triton kernel forward and one
backward, reading and writing the ``(B*K, T, D)`` tensors without splitting heads."""


class _Run:
    """What every handler needs: the stacked parameters and buffers, by full name, and the mode."""

    def __init__(self, params: dict, buffers: dict, training: bool, bn_fp32: bool, cl_convs: bool = False):
        self.params = params
        self.buffers = buffers
        self.training = training
        self.bn_fp32 = bn_fp32
        self.cl_convs = cl_convs
        self.cl_mode = False  # set while the MRCNN and the AFR run on (B, L, K, C) tensors

    def __call__(self, module: nn.Module, prefix: str, x: torch.Tensor, *args):
        handler = CL_HANDLERS.get(type(module)) if self.cl_mode else None
        return (handler or HANDLERS[type(module)])(self, module, prefix, x, *args)

    @property
    def length_dim(self) -> int:
        """The axis along the signal: ``-1`` of ``(B, K, C, L)``, or ``1`` of ``(B, L, K, C)`` in cl mode."""
        return 1 if self.cl_mode else -1

    def p(self, prefix: str, name: str) -> torch.Tensor | None:
        return self.params.get(prefix + name)


def _child(prefix: str, name: str) -> str:
    return f"{prefix}{name}."


# ---------------------------------------------------------------------------- layers
def _conv(run: _Run, m: nn.Conv1d, prefix: str, x: torch.Tensor, left_pad: int = 0) -> torch.Tensor:
    """Per-fold ``conv1d`` of ``x`` ``(B, K, C, L)`` as one grouped channels-last ``conv2d``."""
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise NotImplementedError(f"stacked conv1d supports groups=1, zero integer padding; got {m}")
    if run.cl_convs and CL_OUTSIDE and m.stride[0] == 1:
        # the TCE's (B, K, tokens, d_model) tensors: tokens are the channels; transposes are small here
        y = _cl_conv(run, m, prefix, x.permute(0, 3, 1, 2), left_pad).permute(0, 2, 3, 1)
        return y.contiguous() if TCE_CONTIGUOUS else y
    B, K, C, L = x.shape
    w = run.p(prefix, "weight")  # (K, C_out, C, k)
    b = run.p(prefix, "bias")
    if left_pad:
        x = F.pad(x, (left_pad, 0))
        L = L + left_pad
    x4 = x.reshape(B, K * C, 1, L).contiguous(memory_format=torch.channels_last)
    w4 = w.reshape(K * m.out_channels, C, 1, m.kernel_size[0])
    y = F.conv2d(x4, w4, None if b is None else b.reshape(-1), stride=(1, m.stride[0]),
                 padding=(0, m.padding[0]), dilation=(1, m.dilation[0]), groups=K)
    return y.view(B, K, m.out_channels, y.shape[-1])


def _plain_conv(run, m, prefix, x):
    return _conv(run, m, prefix, x)


def _causal_conv(run, m: CausalConv1d, prefix, x):
    return _conv(run, m, prefix, x, left_pad=m.causal_padding)


def _unfold_conv(run, m: UnfoldConv1d, prefix, x):
    # few input channels, long strided kernel: one batched matrix product over folds
    B, K, C, _ = x.shape
    kernel, stride, pad = m.kernel_size[0], m.stride[0], m.padding[0]
    cols = F.pad(x.transpose(0, 1), (pad, pad)).unfold(-1, kernel, stride)  # (K, B, C, L, k)
    L = cols.shape[3]
    cols = cols.permute(0, 1, 3, 2, 4).reshape(K, B * L, C * kernel)
    w = run.p(prefix, "weight").reshape(K, m.out_channels, C * kernel)
    y = torch.bmm(cols, w.transpose(1, 2)).view(K, B, L, m.out_channels)
    b = run.p(prefix, "bias")
    if b is not None:
        y = y + b[:, None, None, :]
    return y.permute(1, 0, 3, 2)  # (B, K, C_out, L), channels-last in memory


def _batch_norm(run, m: nn.BatchNorm1d, prefix, x):
    """Each fold's batch norm: over ``K*C`` channels of ``(B, K, C, L)`` (or of ``(B, L, K, C)`` in cl mode)."""
    if not m.track_running_stats or not m.affine or m.momentum is None:
        raise NotImplementedError("stacked batch norm needs affine=True, track_running_stats=True and a "
                                  "momentum (not the cumulative average)")
    nbt = run.buffers.get(prefix + "num_batches_tracked")
    if run.training and nbt is not None:
        nbt.add_(1)
    xin = x.float() if run.bn_fp32 else x
    if run.cl_mode:  # (B, L, K, C) -> (B*L, K*C): channels last, no copy
        xin = xin.reshape(-1, x.shape[2] * x.shape[3])
    else:
        xin = xin.reshape(x.shape[0], x.shape[1] * x.shape[2], -1)
    y = F.batch_norm(xin, run.buffers[prefix + "running_mean"].view(-1),
                     run.buffers[prefix + "running_var"].view(-1), run.p(prefix, "weight").reshape(-1),
                     run.p(prefix, "bias").reshape(-1), run.training, m.momentum, m.eps)
    return y.view(x.shape)


def _max_pool(run, m: nn.MaxPool1d, prefix, x):
    if m.dilation != 1 or m.ceil_mode or m.return_indices:
        raise NotImplementedError(f"stacked max-pool supports dilation=1, ceil_mode=False only; got {m}")
    B, K, C, L = x.shape
    y = F.max_pool2d(x.reshape(B, K * C, 1, L), (1, m.kernel_size), (1, m.stride), (0, m.padding))
    return y.view(B, K, C, y.shape[-1])


def _linear(run, m: nn.Linear, prefix, x):
    """``x`` ``(B, K, ..., in)`` times each fold's weight ``(K, out, in)``."""
    w = run.p(prefix, "weight")
    y = torch.einsum("bk...i,koi->bk...o", x, w)
    b = run.p(prefix, "bias")
    if b is not None:
        y = y + b.view(1, b.shape[0], *([1] * (x.dim() - 3)), b.shape[1])
    return y


def _dropout(run, m: nn.Dropout, prefix, x):
    return F.dropout(x, m.p, run.training)


def _pointwise(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
    return lambda run, m, prefix, x: fn(m, x)


def _sequential(run, m: nn.Sequential, prefix, x):
    for name, child in m.named_children():
        x = run(child, _child(prefix, name), x)
    return x


def _per_fold_vector(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-fold vector ``(K, D)`` over ``x`` ``(B, K, ..., D)``."""
    return v.view(1, v.shape[0], *([1] * (x.dim() - 3)), v.shape[1])


def _std_layer_norm(run, m: StdLayerNorm, prefix, x):
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    w, b = _per_fold_vector(run.p(prefix, "weight"), x), _per_fold_vector(run.p(prefix, "bias"), x)
    return w * (x - mean) / (std + m.eps) + b


# ---------------------------------------------------------------------------- AttnSleep blocks
def _squeeze_excitation(run, m: SqueezeExcitation1d, prefix, x):
    weights = run(m.fc, _child(prefix, "fc"), x.mean(dim=run.length_dim))  # (B, K, C)
    return x * weights.unsqueeze(run.length_dim)


def _se_residual(run, m: SEResidualBlock1d, prefix, x):
    out = F.relu(run(m.bn1, _child(prefix, "bn1"), run(m.conv1, _child(prefix, "conv1"), x)))
    out = run(m.bn2, _child(prefix, "bn2"), run(m.conv2, _child(prefix, "conv2"), out))
    out = run(m.se, _child(prefix, "se"), out)
    return F.relu(out + run(m.shortcut, _child(prefix, "shortcut"), x))


def _mrcnn(run, m: MRCNN, prefix, x):
    branches = (("small_kernel_branch", m.small_kernel_branch), ("large_kernel_branch", m.large_kernel_branch))
    if run.cl_mode and all(type(b) is nn.Sequential and len(b) and _fusable_pool_dropout(run, b[-1], m.dropout)
                           for _, b in branches):
        # the dropout after the concatenation, element-wise, drawn by each branch's last max-pool
        # instead (as the first one's): inductor's concatenation + dropout kernel took 93 us forward
        # (the plain concatenation: 51 us; H100, step 10)
        parts = [_cl_sequential(run, b, _child(prefix, name), x, trailing=m.dropout) for name, b in branches]
        return torch.cat(parts, dim=run.length_dim)
    small = run(m.small_kernel_branch, _child(prefix, "small_kernel_branch"), x)
    large = run(m.large_kernel_branch, _child(prefix, "large_kernel_branch"), x)
    return run(m.dropout, _child(prefix, "dropout"), torch.cat([small, large], dim=run.length_dim))


def _attention(run, m: CausalConvMultiHeadAttention, prefix, query, key_value_input):
    B, K, T, D = query.shape

    # folds join the batch here (4-D, as the module itself): inductor's attention-fusion pattern
    # assumes 4-D tensors and fails on a 5-D (B, K, heads, T, d) layout in torch 2.11
    def split_heads(t):
        return t.reshape(B * K, T, m.n_heads, m.d_head).transpose(1, 2)

    if run.cl_convs and ATTENTION_KERNEL:
        k, v = (run(conv, _child(prefix, name), key_value_input).reshape(B * K, T, D)
                for name, conv in (("key_conv", m.key_conv), ("value_conv", m.value_conv)))
        drop = m.attn_dropout.p if run.training else 0.0
        q = query.reshape(B * K, T, D)
        if kernels_usable(q):
            seed = torch.randint(0, 2**31 - 1, (1,), device=q.device) if drop else None
            heads, _ = attention_cl(q, k, v, m.n_heads, drop, seed)
        else:
            heads = attention_reference(q, k, v, m.n_heads, drop, run.training)
        return run(m.out_proj, _child(prefix, "out_proj"), heads.view(B, K, T, D))
    q = split_heads(query)
    k = split_heads(run(m.key_conv, _child(prefix, "key_conv"), key_value_input))
    v = split_heads(run(m.value_conv, _child(prefix, "value_conv"), key_value_input))
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(m.d_head)
    if run.cl_convs:
        # spelled out so that inductor does not swap in cuDNN's flash attention, slow for 30 tokens
        e = torch.exp(scores - scores.amax(-1, keepdim=True).detach())
        probs = e / e.sum(-1, keepdim=True)
    else:
        probs = torch.softmax(scores, dim=-1)
    weights = run(m.attn_dropout, _child(prefix, "attn_dropout"), probs)
    heads = torch.matmul(weights, v).transpose(1, 2).reshape(B, K, T, D)
    return run(m.out_proj, _child(prefix, "out_proj"), heads)


def _feed_forward(run, m: PositionwiseFeedForward, prefix, x):
    hidden = run(m.dropout, _child(prefix, "dropout"), m.activation(run(m.w1, _child(prefix, "w1"), x)))
    return run(m.w2, _child(prefix, "w2"), hidden)


def _tce_layer(run, m: TCEEncoderLayer, prefix, x):
    query = run(m.query_conv, _child(prefix, "query_conv"), x)
    attended = run(m.self_attn, _child(prefix, "self_attn"), query, x)
    x = query + run(m.attn_dropout, _child(prefix, "attn_dropout"), attended)
    ff = run(m.feed_forward, _child(prefix, "feed_forward"), run(m.ff_norm, _child(prefix, "ff_norm"), x))
    return x + run(m.ff_dropout, _child(prefix, "ff_dropout"), ff)


def _tce(run, m: TCE, prefix, x):
    for i, layer in enumerate(m.layers):
        x = run(layer, f"{prefix}layers.{i}.", x)
    return run(m.norm, _child(prefix, "norm"), x)


def _flatten_head(run, m: FlattenLinearHead, prefix, x):
    return run(m.fc, _child(prefix, "fc"), x.flatten(2))


def _attnsleep(run, m: AttnSleep, prefix, x):
    if run.cl_convs:
        run.cl_mode = True
        try:
            features = run(m.afr, _child(prefix, "afr"),
                           run(m.feature_extractor, _child(prefix, "feature_extractor"), x.permute(0, 3, 1, 2)))
        finally:
            run.cl_mode = False
        features = features.permute(0, 2, 3, 1)  # (B, L, K, C) -> (B, K, C, L): the TCE's tokens are the channels
        if TCE_CONTIGUOUS:
            features = features.contiguous()
    else:
        features = run(m.afr, _child(prefix, "afr"), run(m.feature_extractor, _child(prefix, "feature_extractor"), x))
    return run(m.head, _child(prefix, "head"), run(m.tce, _child(prefix, "tce"), features))


# ---------------------------------------------------------------------------- channels-last (cl_convs)
# With cl_convs, the MRCNN and the AFR run on (B, L, K, C) tensors, contiguous: logically
# channels-last, so that every buffer inductor realises (saved activations too) is channels-last.
# In the (B, K, C, L) order, even with channels-last strides, inductor realised many of them
# channels-first and copied them back and forth with transposing kernels (several hundred
# microseconds each for 80 M elements).
def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cl_conv(run, m: nn.Conv1d, prefix, x, left_pad: int = 0):
    """Stride-1 convolution of ``x (B, L, K, C)`` by cl_conv_op's kernels (1x1 too, unless :data:`EINSUM_1X1`)."""
    if m.groups != 1 or m.stride[0] != 1 or m.dilation[0] != 1 or isinstance(m.padding, str):
        raise NotImplementedError(f"cl_convs supports stride-1, undilated, ungrouped convolutions; got {m}")
    dtype = _autocast_dtype(x)
    w = run.p(prefix, "weight")  # (K, O, C, k)
    b = run.p(prefix, "bias")
    k, pad = m.kernel_size[0], m.padding[0] + left_pad
    x = x.to(dtype)
    if k == 1 and pad == 0 and EINSUM_1X1:
        y = torch.einsum("blkc,koc->blko", x, w[..., 0].to(dtype))
    else:
        B, L, K, C = x.shape
        O = m.out_channels
        l_out = L + left_pad + 2 * m.padding[0] - k + 1
        # the weights packed (K, k, C, O), each tap's (C, O) block contiguous (read in place, the
        # kernels' loads were uncoalesced)
        wp = w.permute(0, 3, 2, 1)
        # channels zero-padded to a multiple of ALIGN_CHANNELS: with the AFR's and TCE's 30, rows of
        # 60 bytes made every load and store a scalar one (step 7)
        c_pad, o_pad = -C % ALIGN_CHANNELS, -O % ALIGN_CHANNELS
        if c_pad:
            x = F.pad(x, (0, c_pad))
        if c_pad or o_pad:
            wp = F.pad(wp, (0, o_pad, 0, c_pad))
        # (K, B, L, C) view of the contiguous (B, L, K, C)
        y = conv1d_cl(x.contiguous().permute(2, 0, 1, 3), wp.contiguous().to(dtype), pad, l_out).permute(1, 2, 0, 3)
        if o_pad:
            y = y[..., :O]
    if b is not None:
        y = y + b.to(y.dtype)
    return y


def _cl_unfold_conv(run, m: UnfoldConv1d, prefix, x):
    """A first MRCNN layer (one input channel, long strided kernel) by cl_conv_op's
    :func:`~cl_conv_op.conv1d_windows`: each output position's window of the zero-padded signal is
    one row of the matrix product, read in place; the output lands channels-last. Other shapes: the
    generic handler."""
    B, L, K, C = x.shape
    kernel, stride, pad = m.kernel_size[0], m.stride[0], m.padding[0]
    if C != 1 or m.dilation[0] != 1 or m.groups != 1:
        y = _unfold_conv(run, m, prefix, x.permute(0, 2, 3, 1))  # (B, K, O, L') view
        return y.permute(0, 3, 1, 2)
    dtype = _autocast_dtype(x)
    n_out = (L + 2 * pad - kernel) // stride + 1
    signal = x[..., 0].permute(2, 0, 1)  # (K, B, L): the engine's fold-major batch
    w = run.p(prefix, "weight")[:, :, 0, :].transpose(1, 2)  # (K, kernel, O)
    if ALIGNED_WINDOWS and _aligning_is_free(kernel, stride):
        signal, w, stride = _aligned_windows(signal, w, pad, stride, n_out)
    else:
        signal = F.pad(signal, (pad, pad))
    y = conv1d_windows(signal.to(dtype), w.contiguous().to(dtype), stride, n_out).permute(1, 2, 0, 3)
    b = run.p(prefix, "bias")
    return y if b is None else y + b.to(y.dtype)


def _aligning_is_free(kernel: int, stride: int) -> bool:
    """Whether :func:`_aligned_windows`' longer rows take no more 64-wide blocks of the matrix product
    than the plain windows: so for the large branch (8 chunks of 56 for 400 samples), not for the small
    one (9 chunks of 8 for 50: 128 against 64), whose layer measured slower aligned (H100, step 8: 204 us
    forward and 184 us weight gradient, against 141 and 95 us strided)."""
    span, width = -(-kernel // stride), -(-stride // 8) * 8
    return -(-span * width // 64) <= -(-kernel // 64)


def _aligned_windows(signal: torch.Tensor, w: torch.Tensor, pad: int, stride: int, n_out: int):
    """The zero-padded ``signal (K, B, L)`` cut into chunks of ``stride`` samples, each zero-filled to
    a multiple of 8 (16 bytes in bf16), and the weights ``w (K, kernel, O)`` spread to match (zero
    rows in the gaps): ``(chunks (K, B, n * width), weights (K, T * width, O), width)`` for
    :func:`~cl_conv_op.conv1d_windows`, whose windows then start every ``width`` samples, at aligned
    addresses. At ``stride`` apart (50 samples) every load of a window was a scalar one: the large
    branch's weight gradient took 232 us a step on an H200 (step 7), 62 us so on an H100 (step 8)."""
    K, B, L = signal.shape
    kernel = w.shape[1]
    span = -(-kernel // stride)  # chunks a window touches
    width = -(-stride // 8) * 8
    n_chunks = n_out + span - 1
    signal = F.pad(signal, (pad, n_chunks * stride - L - pad))  # a negative right pad crops unread samples
    chunks = F.pad(signal.reshape(K, B, n_chunks, stride), (0, width - stride)).reshape(K, B, n_chunks * width)
    spread = F.pad(w, (0, 0, 0, 1))[:, _spread_rows(kernel, stride, width, w.device)]
    return chunks, spread, width


@functools.cache
def _spread_rows(kernel: int, stride: int, width: int, device: torch.device) -> torch.Tensor:
    """The rows of the zero-extended weights that :func:`_aligned_windows`' spread weights take: sample
    ``q * stride + e`` of a window sits at ``q * width + e``; the gaps read row ``kernel``, a zero row.
    Made once, on the device (a CUDA graph cannot capture the copy of a list)."""
    span = -(-kernel // stride)
    at = [q * stride + e if e < stride and q * stride + e < kernel else kernel for q in range(span) for e in range(width)]
    return torch.tensor(at, device=device)


def _fusable_bn_act(run, bn: nn.Module, act: nn.Module | None) -> bool:
    # the evaluation-mode op has no gradient: evaluation with gradients takes the plain path
    return (FUSED and (run.training or not torch.is_grad_enabled()) and type(bn) is nn.BatchNorm1d and type(act) is nn.GELU
            and act.approximate == "none" and bn.affine and bn.track_running_stats and bn.momentum is not None)


def _fusable_pool_dropout(run, pool: nn.Module, drop: nn.Module | None) -> bool:
    return (FUSED and run.training and type(pool) is nn.MaxPool1d and type(drop) is nn.Dropout and drop.p > 0
            and pool.dilation == 1 and not pool.ceil_mode and not pool.return_indices)


def _cl_bn_gelu(run, bn: nn.BatchNorm1d, prefix, x):
    """Batch norm and exact GELU of ``(B, L, K, C)`` by one fused op (bn_act_op): in training with the
    batch's statistics, the running ones updated as ``F.batch_norm`` does (unbiased variance); in
    evaluation with the running ones."""
    B, L, K, C = x.shape
    if not run.training:
        y = bn_act_eval_cl(x.to(_autocast_dtype(x)).reshape(B * L, K * C), run.p(prefix, "weight").reshape(-1),
                           run.p(prefix, "bias").reshape(-1), run.buffers[prefix + "running_mean"].view(-1),
                           run.buffers[prefix + "running_var"].view(-1), bn.eps, "gelu")
        return y.view(B, L, K, C)
    nbt = run.buffers.get(prefix + "num_batches_tracked")
    if nbt is not None:
        nbt.add_(1)
    rows = x.to(_autocast_dtype(x)).reshape(B * L, K * C)
    running_mean = run.buffers[prefix + "running_mean"].view(-1)
    running_var = run.buffers[prefix + "running_var"].view(-1)
    y, mean, rstd = bn_act_cl(rows, run.p(prefix, "weight").reshape(-1), run.p(prefix, "bias").reshape(-1),
                              running_mean, bn.eps, "gelu")
    with torch.no_grad():
        n = rows.shape[0]
        unbiased_var = (rstd.pow(-2) - bn.eps) * (n / max(n - 1, 1))
        running_mean.lerp_(mean.to(running_mean.dtype), bn.momentum)
        running_var.lerp_(unbiased_var.to(running_var.dtype), bn.momentum)
    return y.view(B, L, K, C)


def _cl_pool_dropout(run, pool: nn.MaxPool1d, prefix, x, drop: nn.Dropout):
    """Max-pooling and dropout of ``(B, L, K, C)`` in one pass of ``max_pool_cl`` (the mask drawn
    from a seed of torch's generator, so runs repeat under ``torch.manual_seed``)."""
    B, L, K, C = x.shape
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
    y, _ = max_pool_cl(x.to(_autocast_dtype(x)).reshape(B, L, K * C), pool.kernel_size, pool.stride, pool.padding,
                       drop.p, seed)
    return y.view(B, y.shape[1], K, C)


def _cl_sequential(run, m: nn.Sequential, prefix, x, trailing: nn.Module | None = None):
    """A ``Sequential`` in cl mode, with :data:`FUSED`'s pairs of layers fused; ``trailing``: a module
    that follows its last one (the MRCNN's dropout), which the caller has checked fuses with it."""
    children = list(m.named_children())
    i = 0
    while i < len(children):
        name, child = children[i]
        following = children[i + 1][1] if i + 1 < len(children) else trailing
        if _fusable_bn_act(run, child, following):
            x = _cl_bn_gelu(run, child, _child(prefix, name), x)
            i += 2
        elif _fusable_pool_dropout(run, child, following):
            x = _cl_pool_dropout(run, child, _child(prefix, name), x, following)
            i += 2
        else:
            x = run(child, _child(prefix, name), x)
            i += 1
    return x


def _cl_max_pool(run, m: nn.MaxPool1d, prefix, x):
    """Max-pooling along ``L`` of ``(B, L, K, C)`` by cl_conv_op's kernels, in the autocast dtype
    (rounding commutes with the maximum; only the choice among maxima that rounding makes equal can
    differ: the first wins, as in ``max_pool1d``)."""
    if m.dilation != 1 or m.ceil_mode or m.return_indices:
        raise NotImplementedError(f"stacked max-pool supports dilation=1, ceil_mode=False only; got {m}")
    B, L, K, C = x.shape
    y, _ = max_pool_cl(x.to(_autocast_dtype(x)).reshape(B, L, K * C), m.kernel_size, m.stride, m.padding)
    return y.view(B, y.shape[1], K, C)


HANDLERS: dict[type, Callable] = {
    nn.Conv1d: _plain_conv,
    CausalConv1d: _causal_conv,
    UnfoldConv1d: _unfold_conv,
    nn.BatchNorm1d: _batch_norm,
    nn.MaxPool1d: _max_pool,
    nn.Linear: _linear,
    nn.Dropout: _dropout,
    nn.GELU: _pointwise(lambda m, x: F.gelu(x, approximate=m.approximate)),
    nn.ReLU: _pointwise(lambda m, x: F.relu(x)),
    nn.Sigmoid: _pointwise(lambda m, x: torch.sigmoid(x)),
    nn.Identity: _pointwise(lambda m, x: x),
    nn.Sequential: _sequential,
    StdLayerNorm: _std_layer_norm,
    SqueezeExcitation1d: _squeeze_excitation,
    SEResidualBlock1d: _se_residual,
    MRCNN: _mrcnn,
    CausalConvMultiHeadAttention: _attention,
    PositionwiseFeedForward: _feed_forward,
    TCEEncoderLayer: _tce_layer,
    TCE: _tce,
    FlattenLinearHead: _flatten_head,
    AttnSleep: _attnsleep,
}
"""Module type -> handler ``(run, module, prefix, x, *args)``; exact types only."""

CL_HANDLERS: dict[type, Callable] = {
    nn.Conv1d: _cl_conv,
    UnfoldConv1d: _cl_unfold_conv,
    nn.MaxPool1d: _cl_max_pool,
    nn.Sequential: _cl_sequential,
}
"""With ``cl_convs``, inside the MRCNN and the AFR: the handlers for ``(B, L, K, C)`` tensors (the
others there work in either order, taking the length axis from :attr:`_Run.length_dim`)."""

# containers that hold handled modules but are walked by their parent's handler
_CONTAINERS = (nn.ModuleList,)


def supports(model: nn.Module) -> bool:
    """Whether :func:`stacked_forward` can run ``model`` (every submodule's type is handled)."""
    if type(model) not in HANDLERS:
        return False
    return all(type(m) in HANDLERS or type(m) in _CONTAINERS for m in model.modules())


def stacked_forward(model: nn.Module, params: dict, buffers: dict, x: torch.Tensor,
                    *, bn_fp32: bool = False, cl_convs: bool = False) -> torch.Tensor:
    """Run K copies of ``model``, one per fold, as one network.

    Parameters
    ----------
    model : torch.nn.Module
        The skeleton (its own parameters are not used); ``model.training`` sets the mode.
        :func:`supports` must be true.
    params, buffers : dict of str -> torch.Tensor
        ``model``'s parameters and buffers by name, each with a leading fold axis ``K`` (as
        ``torch.func.stack_module_state`` gives). Batch-norm statistics are updated in place
        in training mode, as ``nn.BatchNorm1d`` does.
    x : torch.Tensor
        ``(K, B, C, T)`` or ``(K, B, T)``: each fold's batch.
    bn_fp32 : bool
        Normalise in fp32 (for bf16 autocast).
    cl_convs : bool
        The MRCNN and the AFR on ``(B, L, K, C)`` tensors, their convolutions by
        ``benchmarks/cl_conv_op.py`` (channels-last Triton kernels on CUDA; 1x1 ones as batched
        matrix products; see :data:`CL_HANDLERS`), and the attention's softmax spelled out.

    Returns
    -------
    torch.Tensor
        Logits ``(K, B, n_outputs)``.
    """
    if not supports(model):
        unsupported = sorted({type(m).__name__ for m in model.modules()
                              if type(m) not in HANDLERS and type(m) not in _CONTAINERS})
        raise NotImplementedError(f"stacked_forward cannot run {type(model).__name__}: no handler for "
                                  f"{', '.join(unsupported) or type(model).__name__}; use vmap")
    x = x.unsqueeze(2) if x.dim() == 3 else x
    run = _Run(params, buffers, model.training, bn_fp32, cl_convs)
    logits = run(model, "", x.transpose(0, 1))  # (B, K, n_outputs)
    return logits.transpose(0, 1)


class _FlatSplit(torch.autograd.Function):
    """The parameters as pieces of the engine's flat ``(K, P)`` matrix, whose gradient is one ``cat``.

    Sliced from it (``BatchedFolds._params``), their gradients reach the matrix as a sum of
    zero-padded slices, which inductor fused into one kernel of 66 masked loads per element
    (0.49 ms a step on an H200, step 7); a ``cat`` of more than ``max_pointwise_cat_inputs``
    pieces it writes piece by piece."""

    @staticmethod
    def forward(ctx, flat, sizes):
        ctx.sizes = sizes
        return tuple(flat.split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        some = next(g for g in grads if g is not None)  # an unused parameter's is None
        pieces = [g if g is not None else some.new_zeros(*some.shape[:-1], n) for g, n in zip(grads, ctx.sizes)]
        return torch.cat(pieces, dim=-1), None


def split_params(engine, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """``engine._params(flat)`` (the same views) with the gradient of :class:`_FlatSplit`."""
    pieces = _FlatSplit.apply(flat, tuple(engine.param_sizes))
    lead = flat.shape[:-1]
    return {name: piece.view(*lead, *shape) for name, shape, piece in zip(engine.param_names, engine.param_shapes, pieces)}


def use_stacked_forward(cl_convs: bool = False) -> None:
    """Make :class:`~sleeplib.train.fast.BatchedFolds` run supported models with :func:`stacked_forward`."""
    from sleeplib.train.fast import BatchedFolds

    vmap_forward = BatchedFolds._forward_all_eager

    def forward(self, flat, buffers, xb):
        if supports(self.skeleton):
            params = split_params(self, flat) if cl_convs else self._params(flat)
            return stacked_forward(self.skeleton, params, buffers, xb, bn_fp32=self.amp, cl_convs=cl_convs)
        return vmap_forward(self, flat, buffers, xb)

    BatchedFolds._forward_all_eager = forward


LAYOUT_FLAGS = {
    "--cl-convs": "channels-last (B, L, K, C) activations, convolutions and max-pooling by cl_conv_op's Triton kernels",
    "--tce-cudnn": "with --cl-convs: the TCE's convolutions by cuDNN (CL_OUTSIDE off)",
    "--einsum-1x1": "with --cl-convs: the AFR's 1x1 convolutions as einsum (EINSUM_1X1)",
    "--fused": "with --cl-convs: the MRCNN's batch norm + GELU by bn_act_op, max-pool + dropout by max_pool_cl (FUSED)",
    "--unaligned": "with --cl-convs: channels not zero-padded to 16 bytes (ALIGN_CHANNELS 1)",
    "--strided-windows": "with --cl-convs: the first layers' windows all read in place (ALIGNED_WINDOWS off)",
    "--tce-contiguous": "with --cl-convs: the TCE's tensors copied to (B, K, T, D) order (TCE_CONTIGUOUS)",
    "--attention-kernel": "with --cl-convs: the TCE's attention by attention_op (ATTENTION_KERNEL)",
    "--no-tma": "with --cl-convs: cl_conv_op's convolutions by pointer loads only (cl_conv_op.TMA off)",
}
"""The layout's command-line flags and what each does: read by :func:`configure`, declared by
:func:`add_layout_flags` (``conv_layouts.py``), passed on to the warming children."""
_OWN_FLAGS = tuple(LAYOUT_FLAGS)


def add_layout_flags(parser) -> None:
    """Declare :data:`LAYOUT_FLAGS` on an ``argparse`` parser (switches), for a script that then calls
    :func:`configure` with its command line."""
    for flag, help_text in LAYOUT_FLAGS.items():
        parser.add_argument(flag, action="store_true", help=help_text)


WARM_SHARDS = 6
"""Child processes that ``--warm-kernels`` starts, each compiling its share of the kernels
(:func:`compile_only_shard`): one child compiling all of them one after another took 30-33 s on an
H100, six took 7.5-13 s each (step 10)."""


def _specialisation(v) -> object:
    """What Triton's compiled code depends on in a launch argument, roughly: a tensor's dtype and
    16-byte alignment, an integer's being 1 or a multiple of 16, a descriptor's dtype and block, a
    constexpr's value (an approximation is enough: it only decides which shard compiles what)."""
    if isinstance(v, torch.Tensor):
        return str(v.dtype), v.data_ptr() % 16 == 0
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v == 1, v % 16 == 0
    if isinstance(v, float):
        return "float"
    if hasattr(v, "block_shape") and hasattr(v, "base"):  # a TensorDescriptor
        return "descriptor", str(v.base.dtype), tuple(v.block_shape)
    return repr(v)


def compile_only_shard(shard: int, n_shards: int) -> None:
    """In a warming child: run (so compile) only the Triton launches whose kernel and specialisation
    hash to ``shard`` of ``n_shards``, skip the others. The skipped kernels leave their outputs
    unwritten; no later launch's specialisation depends on values, only on shapes, strides and
    alignment, so the shards together compile what one child running everything would."""
    import zlib

    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def sharded(self, *args, grid, warmup, **kwargs):
        key = repr((self.fn.__qualname__, [_specialisation(a) for a in args],
                    sorted((k, _specialisation(v)) for k, v in kwargs.items())))
        if zlib.crc32(key.encode()) % n_shards != shard:
            return None
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = sharded


def configure(flags: list[str]) -> bool:
    """Set this module's layout choices (and ``cl_conv_op.TMA``) from the command-line ``flags`` of
    :data:`_OWN_FLAGS` (the others are ignored), as this script, its warming children and
    ``conv_layouts.py`` take them; returns whether ``--cl-convs`` is among them."""
    global CL_OUTSIDE, EINSUM_1X1, FUSED, ALIGN_CHANNELS, ALIGNED_WINDOWS, TCE_CONTIGUOUS, ATTENTION_KERNEL
    CL_OUTSIDE = "--tce-cudnn" not in flags
    EINSUM_1X1 = "--einsum-1x1" in flags
    FUSED = "--fused" in flags
    ALIGN_CHANNELS = 1 if "--unaligned" in flags else 8
    ALIGNED_WINDOWS = "--strided-windows" not in flags
    TCE_CONTIGUOUS = "--tce-contiguous" in flags
    ATTENTION_KERNEL = "--attention-kernel" in flags
    cl_conv_op.TMA = "--no-tma" not in flags
    return "--cl-convs" in flags


def warm_kernels(folds: int, batch: int, n_times: int, eval_batch: int, device: str = "cuda") -> float:
    """One eager training step and one evaluation of the engine, with :func:`stacked_forward`, on a
    small dataset of the real shapes: run in a child process while the parent compiles its graphs
    (``--warm-kernels``), it compiles the Triton kernels of this configuration into Triton's
    on-disk cache, where the parent then finds most of them (eager and compiled code can hand the
    kernels tensors of other strides or alignment: those the parent still compiles). Returns the
    seconds taken."""
    import time

    import numpy as np

    from sleeplib.models import build_model
    from sleeplib.train.config import get_recipe
    from sleeplib.train.fast import BatchedFolds

    t0 = time.perf_counter()
    n = max(2 * batch, eval_batch + 1)
    x = torch.randn(n, 1, n_times, device=device)
    y = torch.randint(0, 5, (n,), device=device)
    config = get_recipe("attnsleep", batch_size=batch, eval_batch_size=eval_batch, amp="bf16", progress=False)
    engine = BatchedFolds(lambda: build_model("attnsleep", n_times=n_times), x, y, [np.arange(n)] * folds,
                          [np.arange(n)] * folds, None, config, device=device, cuda_graphs=False, compile=False)
    engine._step()
    engine.evaluate()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def share_triton_cache() -> str:
    """Point Triton's on-disk cache, for this process and the children it starts, at the folder
    inductor would switch it to, and return it. Inductor sets ``TRITON_CACHE_DIR`` to a folder of
    its own (``<inductor cache>/triton/<device>``) when it loads its first kernel, if unset; from
    then on the engine's process looked for the benchmarks' kernels there, while the warming
    children, which compile nothing through inductor, had written them to Triton's default
    folder: the parent recompiled every one of them (52 kernels, 19-21 s, steps 9 and 10)."""
    import os

    if "TRITON_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

        os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return os.environ["TRITON_CACHE_DIR"]


def _start_warming(argv: list[str]) -> None:
    """``--warm-kernels``: :func:`warm_kernels` in :data:`WARM_SHARDS` child processes, for the run's
    shapes, each compiling its shard of the kernels."""
    import subprocess

    def value(flag, default):
        return argv[argv.index(flag) + 1] if flag in argv else default

    folds = value("--schedule-folds", "20") if "--full-only" in argv else value("--folds", "20")
    shapes = [folds, value("--batch", "128"), value("--n-times", "3000")]
    own = [a for a in argv if a in _OWN_FLAGS]
    for shard in range(WARM_SHARDS):
        subprocess.Popen([sys.executable, __file__, "--warm-kernels-child", *shapes, f"{shard}/{WARM_SHARDS}", *own])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import compile_helpers
    import train_speed

    cl = configure(sys.argv[1:])
    use_stacked_forward(cl_convs=cl)
    if "--warm-kernels-child" in sys.argv:
        child_args = sys.argv[sys.argv.index("--warm-kernels-child") + 1:]
        folds, batch, n_times = (int(v) for v in child_args[:3])
        shard, n_shards = (int(v) for v in child_args[3].split("/"))
        from sleeplib.train.config import get_recipe

        compile_only_shard(shard, n_shards)
        eval_batch = get_recipe("attnsleep").eval_batch_size  # what train_speed's engine evaluates in
        print(f"warm_kernels, shard {shard}/{n_shards}: {warm_kernels(folds, batch, n_times, eval_batch):.1f} s")
        sys.exit(0)
    if "--warm-kernels" in sys.argv and torch.cuda.is_available() and compile_helpers.role() is None:
        share_triton_cache()  # now: the children, and --compile-helpers' helpers, inherit it
        # started with the engine's timed build, as any work for the run is
        train_speed.AT_START.append(lambda: _start_warming(sys.argv[1:]))
    if compile_helpers.role() is None:
        print(f"fold layout: stacked (benchmarks/stacked_layout.py), cl_convs={cl}, TCE convolutions by "
              f"{'cl_conv_op' if cl and CL_OUTSIDE else 'cuDNN'}, 1x1 convolutions by "
              f"{'einsum' if EINSUM_1X1 else 'cl_conv_op'}, MRCNN batch norm + GELU by "
              f"{'bn_act_op' if cl and FUSED else 'inductor'}, first max-pool + dropout by "
              f"{'max_pool_cl' if cl and FUSED else 'max_pool_cl, inductor' if cl else 'inductor'}, channels padded to a multiple of {ALIGN_CHANNELS}, "
              f"first layers' windows {'aligned where free' if ALIGNED_WINDOWS else 'strided'}, TCE tensors "
              f"{'contiguous' if TCE_CONTIGUOUS else 'views of the AFR output'}, attention by "
              f"{'attention_op' if cl and ATTENTION_KERNEL else 'inductor'}, cl_conv_op's convolutions by "
              f"{'tensor descriptors where aligned' if cl_conv_op.TMA else 'pointer loads'}")
    train_speed.main([a for a in sys.argv[1:] if a not in (*_OWN_FLAGS, "--warm-kernels")])
