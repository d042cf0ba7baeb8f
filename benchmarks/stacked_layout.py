"""Benchmark of an alternative to vmap: K fold models run as one network, folds in the channels.

Measured slower than the vmap engine on an H100 (``benchmarks/RESULTS.md``, step 4), so it is
kept here, not in ``sleeplib``, to make that result reproducible::

    python3 benchmarks/stacked_layout.py --device cuda --folds 20 --epochs 3 --skip-naive --amp bf16 --compile

takes :mod:`benchmarks.train_speed`'s arguments and runs it with
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

import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


class _Run:
    """What every handler needs: the stacked parameters and buffers, by full name, and the mode."""

    def __init__(self, params: dict, buffers: dict, training: bool, bn_fp32: bool):
        self.params = params
        self.buffers = buffers
        self.training = training
        self.bn_fp32 = bn_fp32

    def __call__(self, module: nn.Module, prefix: str, x: torch.Tensor, *args):
        return HANDLERS[type(module)](self, module, prefix, x, *args)

    def p(self, prefix: str, name: str) -> torch.Tensor | None:
        return self.params.get(prefix + name)


def _child(prefix: str, name: str) -> str:
    return f"{prefix}{name}."


# ---------------------------------------------------------------------------- layers
def _conv(run: _Run, m: nn.Conv1d, prefix: str, x: torch.Tensor, left_pad: int = 0) -> torch.Tensor:
    """Per-fold ``conv1d`` of ``x`` ``(B, K, C, L)`` as one grouped channels-last ``conv2d``."""
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise NotImplementedError(f"stacked conv1d supports groups=1, zero integer padding; got {m}")
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
    if not m.track_running_stats or not m.affine or m.momentum is None:
        raise NotImplementedError("stacked batch norm needs affine=True, track_running_stats=True and a "
                                  "momentum (not the cumulative average)")
    B, K, C = x.shape[:3]
    training = run.training
    momentum = m.momentum
    nbt = run.buffers.get(prefix + "num_batches_tracked")
    if training and nbt is not None:
        nbt.add_(1)
    xin = x.float() if run.bn_fp32 else x
    y = F.batch_norm(xin.reshape(B, K * C, -1), run.buffers[prefix + "running_mean"].view(-1),
                     run.buffers[prefix + "running_var"].view(-1), run.p(prefix, "weight").reshape(-1),
                     run.p(prefix, "bias").reshape(-1), training, momentum, m.eps)
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
    weights = run(m.fc, _child(prefix, "fc"), x.mean(dim=-1))  # (B, K, C)
    return x * weights.unsqueeze(-1)


def _se_residual(run, m: SEResidualBlock1d, prefix, x):
    out = F.relu(run(m.bn1, _child(prefix, "bn1"), run(m.conv1, _child(prefix, "conv1"), x)))
    out = run(m.bn2, _child(prefix, "bn2"), run(m.conv2, _child(prefix, "conv2"), out))
    out = run(m.se, _child(prefix, "se"), out)
    return F.relu(out + run(m.shortcut, _child(prefix, "shortcut"), x))


def _mrcnn(run, m: MRCNN, prefix, x):
    small = run(m.small_kernel_branch, _child(prefix, "small_kernel_branch"), x)
    large = run(m.large_kernel_branch, _child(prefix, "large_kernel_branch"), x)
    return run(m.dropout, _child(prefix, "dropout"), torch.cat([small, large], dim=-1))


def _attention(run, m: CausalConvMultiHeadAttention, prefix, query, key_value_input):
    B, K, T, D = query.shape

    # folds join the batch here (4-D, as the module itself): inductor's attention-fusion pattern
    # assumes 4-D tensors and fails on a 5-D (B, K, heads, T, d) layout in torch 2.11
    def split_heads(t):
        return t.reshape(B * K, T, m.n_heads, m.d_head).transpose(1, 2)

    q = split_heads(query)
    k = split_heads(run(m.key_conv, _child(prefix, "key_conv"), key_value_input))
    v = split_heads(run(m.value_conv, _child(prefix, "value_conv"), key_value_input))
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(m.d_head)
    weights = run(m.attn_dropout, _child(prefix, "attn_dropout"), torch.softmax(scores, dim=-1))
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
    features = run(m.afr, _child(prefix, "afr"), run(m.feature_extractor, _child(prefix, "feature_extractor"), x))
    return run(m.head, _child(prefix, "head"), run(m.tce, _child(prefix, "tce"), features))


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

# containers that hold handled modules but are walked by their parent's handler
_CONTAINERS = (nn.ModuleList,)


def supports(model: nn.Module) -> bool:
    """Whether :func:`stacked_forward` can run ``model`` (every submodule's type is handled)."""
    if type(model) not in HANDLERS:
        return False
    return all(type(m) in HANDLERS or type(m) in _CONTAINERS for m in model.modules())


def stacked_forward(model: nn.Module, params: dict, buffers: dict, x: torch.Tensor,
                    *, bn_fp32: bool = False) -> torch.Tensor:
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
    run = _Run(params, buffers, model.training, bn_fp32)
    logits = run(model, "", x.transpose(0, 1))  # (B, K, n_outputs)
    return logits.transpose(0, 1)


def use_stacked_forward() -> None:
    """Make :class:`~sleeplib.train.fast.BatchedFolds` run supported models with :func:`stacked_forward`."""
    from sleeplib.train.fast import BatchedFolds

    vmap_forward = BatchedFolds._forward_all_eager

    def forward(self, flat, buffers, xb):
        if supports(self.skeleton):
            return stacked_forward(self.skeleton, self._params(flat), buffers, xb, bn_fp32=self.amp)
        return vmap_forward(self, flat, buffers, xb)

    BatchedFolds._forward_all_eager = forward


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_speed

    use_stacked_forward()
    print("fold layout: stacked (benchmarks/stacked_layout.py)")
    train_speed.main()
