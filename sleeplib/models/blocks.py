"""Reusable building blocks of the sleep-staging models.

AttnSleep (Eldele et al., 2021) is assembled here from parts so that the study variants
(:mod:`sleeplib.models.attnsleep_conformer`, :mod:`sleeplib.models.attnsleep_msmp`) can swap one
part without copying the rest:

* :class:`MRCNN` - multi-resolution CNN feature extractor (two convolutional branches);
* :class:`SEResidualBlock1d` - adaptive feature recalibration (AFR), an SE residual block;
* :class:`CausalConvMultiHeadAttention`, :class:`TCEEncoderLayer`, :class:`TCE` - the temporal
  context encoder (transformer encoder whose keys/values/queries come from causal convolutions);
* :class:`FlattenLinearHead` - classifier on the flattened feature map;
* :func:`init_weights_normal` - the original code's ``weights_init_normal``.

Every block's ``forward`` is free of data-dependent Python control flow, ``.item()`` calls and
module-state mutation, so that models built from them can be trained under
``torch.func.functional_call``/``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "init_weights_normal",
    "conv_output_length",
    "StdLayerNorm",
    "CausalConv1d",
    "SqueezeExcitation1d",
    "SEResidualBlock1d",
    "MRCNN",
    "UnfoldConv1d",
    "CausalConvMultiHeadAttention",
    "PositionwiseFeedForward",
    "TCEEncoderLayer",
    "TCE",
    "FlattenLinearHead",
    "as_batch_channels_times",
    "init_lstm_tf_style",
    "same_padding",
    "SamePadConv1d",
    "SamePadMaxPool1d",
]


def init_weights_normal(module: nn.Module) -> None:
    """Initialise one module as AttnSleep's ``weights_init_normal`` does; use with ``model.apply``.

    Convolution weights are drawn from N(0, 0.02), batch-norm weights from N(1, 0.02) and
    batch-norm biases are set to 0. Everything else keeps PyTorch's default initialisation
    (linear layers, convolution biases, layer norms).

    Parameters
    ----------
    module : torch.nn.Module
        The module to initialise (``Model.apply(init_weights_normal)`` visits all of them).

    Notes
    -----
    The original tests ``type(m) == nn.Conv1d``, an exact type match, so its ``CausalConv1d``
    (a ``Conv1d`` subclass) keeps PyTorch's default initialisation. We match on the exact type
    too, so :class:`CausalConv1d` layers are left at their defaults as in the original.
    """
    module_type = type(module)
    # UnfoldConv1d stands in for the original's plain Conv1d (same maths), so it is initialised too.
    if module_type in (nn.Conv1d, nn.Conv2d, UnfoldConv1d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif module_type in (nn.BatchNorm1d, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def conv_output_length(layers: nn.Module, n_times: int) -> int:
    """Length of the time axis after a stack of 1-D convolutions and max-pools.

    Computed from the layers' hyper-parameters, without running the network, so that model
    constructors do not need a dry run (which would disturb batch-norm statistics).

    Parameters
    ----------
    layers : torch.nn.Module
        A module whose submodules (in registration order) are applied in sequence; only
        ``Conv1d`` and ``MaxPool1d`` (including the causal and TF-'SAME' ones defined here)
        change the length.
    n_times : int
        Input length in samples.

    Returns
    -------
    int
        Output length.
    """
    length = n_times
    for layer in layers.modules():
        if isinstance(layer, (SamePadConv1d, SamePadMaxPool1d)):
            length = -(-length // _first(layer.stride))
        elif isinstance(layer, (nn.Conv1d, nn.MaxPool1d)):
            kernel = _first(layer.kernel_size)
            stride = _first(layer.stride)
            padding = _first(layer.padding)
            dilation = _first(layer.dilation)
            if isinstance(layer, CausalConv1d):
                padding_total = layer.causal_padding
            else:
                padding_total = 2 * padding
            length = (length + padding_total - dilation * (kernel - 1) - 1) // stride + 1
    return length


def _first(value) -> int:
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def as_batch_channels_times(x: torch.Tensor) -> torch.Tensor:
    """Accept ``(B, T)`` for a single channel and return ``(B, 1, T)``; ``(B, C, T)`` unchanged.

    The test is on the number of dimensions, which is static for a compiled graph.
    """
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x


class StdLayerNorm(nn.Module):
    """Layer norm as written in AttnSleep: ``a * (x - mean) / (std + eps) + b``.

    It differs from :class:`torch.nn.LayerNorm` in two ways, both kept for fidelity: the standard
    deviation is the unbiased one (``N - 1``), and ``eps`` is added to the standard deviation
    rather than to the variance.

    Parameters
    ----------
    n_features : int
        Size of the last axis.
    eps : float
        Added to the standard deviation.
    """

    def __init__(self, n_features: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_features))
        self.bias = nn.Parameter(torch.zeros(n_features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


class CausalConv1d(nn.Conv1d):
    """1-D convolution whose output at ``t`` sees only inputs at ``<= t``.

    The original pads ``(k - 1) * dilation`` on both sides and drops the last outputs; padding on
    the left only gives the same numbers without computing outputs that are then discarded.

    Parameters
    ----------
    in_channels, out_channels, kernel_size : int
        As :class:`torch.nn.Conv1d`.
    dilation : int
        Dilation of the kernel.
    bias : bool
        Whether the convolution has a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=0,
                         dilation=dilation, bias=bias)
        self.causal_padding = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0)))


class SqueezeExcitation1d(nn.Module):
    """Squeeze-and-excitation over channels (Hu et al., CVPR 2018), as AttnSleep's ``SELayer``.

    Parameters
    ----------
    n_channels : int
        Number of channels.
    reduction : int
        Bottleneck ratio; the hidden size is ``n_channels // reduction`` (at least 1).
    """

    def __init__(self, n_channels: int, reduction: int = 16):
        super().__init__()
        n_hidden = max(n_channels // reduction, 1)
        self.fc = nn.Sequential(
            nn.Linear(n_channels, n_hidden, bias=False),
            nn.ReLU(),
            nn.Linear(n_hidden, n_channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_weights = self.fc(x.mean(dim=-1))
        return x * channel_weights.unsqueeze(-1)


class SEResidualBlock1d(nn.Module):
    """AttnSleep's adaptive feature recalibration (AFR): one SE basic residual block.

    ``relu(se(bn(conv1x1(relu(bn(conv1x1(x)))))) + shortcut(x))`` where the shortcut is a
    1x1 convolution + batch norm when the number of channels changes.

    Parameters
    ----------
    in_channels : int
        Channels of the incoming feature map (128 after MRCNN).
    out_channels : int
        Channels after recalibration (30 in AttnSleep).
    reduction : int
        SE bottleneck ratio.

    Notes
    -----
    The original builds ``nn.Conv1d(inplanes, planes, stride)``, i.e. the third positional
    argument is the kernel size, so with ``stride=1`` both convolutions are 1x1 (with bias).
    We reproduce that.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 16):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size=1)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size=1)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.se = SqueezeExcitation1d(out_channels, reduction)
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm1d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class UnfoldConv1d(nn.Conv1d):
    """A ``Conv1d`` computed as unfold + matrix product: same parameters, same maths.

    Used for convolutions with few input channels and long, strided kernels (the first layer of
    each MRCNN branch: 1 channel, kernel 50 or 400). When several fold models are trained at once
    with ``torch.func.vmap``, an ordinary ``Conv1d`` there becomes a depthwise convolution (one
    input channel per group) for which PyTorch falls back to a slow generic kernel (22 ms per
    call for 20 folds on an H100, ``benchmarks/conv_layouts.py``); as a matrix product it becomes
    one batched GEMM (about 1 ms). Only ``groups=1`` and ``dilation=1`` are supported.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.dilation[0] != 1 or not isinstance(self.padding, tuple):
            raise ValueError("UnfoldConv1d supports groups=1, dilation=1 and integer padding only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride, pad = self.kernel_size[0], self.stride[0], self.padding[0]
        cols = F.pad(x, (pad, pad)).unfold(-1, kernel, stride)  # (B, C, L, kernel)
        batch, chans, length, _ = cols.shape
        cols = cols.transpose(1, 2).reshape(batch, length, chans * kernel)
        out = cols @ self.weight.reshape(self.out_channels, chans * kernel).t()  # (B, L, C_out)
        if self.bias is not None:
            out = out + self.bias
        return out.transpose(1, 2)


class MRCNN(nn.Module):
    """AttnSleep's multi-resolution CNN: two convolutional branches concatenated in time.

    The small-kernel branch (kernel 50, stride 6) sees high frequencies, the large-kernel branch
    (kernel 400, stride 50) low frequencies. Each is conv-BN-GELU, max-pool, dropout, two more
    conv-BN-GELU (128 filters) and a max-pool; outputs are concatenated along time and dropped
    out. At 100 Hz and 3000 samples the output is ``(B, 128, 64 + 16 = 80)``.

    Parameters
    ----------
    n_chans : int
        Input channels.
    second_branch_kernel : int
        Kernel of the two 128-filter convolutions of the large-kernel branch: 7 in ``MRCNN``
        (Sleep-EDF, 100 Hz), 6 in ``MRCNN_SHHS`` (125 Hz); padding is 3 in both.
    dropout : float
        Dropout after the first pooling of each branch and after the concatenation.
    n_filters : int
        Filters of the first convolution of each branch (64).
    n_out_channels : int
        Filters of the later convolutions, hence output channels (128).
    """

    def __init__(self, n_chans: int = 1, second_branch_kernel: int = 7, dropout: float = 0.5,
                 n_filters: int = 64, n_out_channels: int = 128):
        super().__init__()
        self.n_out_channels = n_out_channels
        self.small_kernel_branch = nn.Sequential(
            UnfoldConv1d(n_chans, n_filters, kernel_size=50, stride=6, padding=24, bias=False),
            nn.BatchNorm1d(n_filters),
            nn.GELU(),
            nn.MaxPool1d(kernel_size=8, stride=2, padding=4),
            nn.Dropout(dropout),
            nn.Conv1d(n_filters, n_out_channels, kernel_size=8, padding=4, bias=False),
            nn.BatchNorm1d(n_out_channels),
            nn.GELU(),
            nn.Conv1d(n_out_channels, n_out_channels, kernel_size=8, padding=4, bias=False),
            nn.BatchNorm1d(n_out_channels),
            nn.GELU(),
            nn.MaxPool1d(kernel_size=4, stride=4, padding=2),
        )
        self.large_kernel_branch = nn.Sequential(
            UnfoldConv1d(n_chans, n_filters, kernel_size=400, stride=50, padding=200, bias=False),
            nn.BatchNorm1d(n_filters),
            nn.GELU(),
            nn.MaxPool1d(kernel_size=4, stride=2, padding=2),
            nn.Dropout(dropout),
            nn.Conv1d(n_filters, n_out_channels, kernel_size=second_branch_kernel, padding=3,
                      bias=False),
            nn.BatchNorm1d(n_out_channels),
            nn.GELU(),
            nn.Conv1d(n_out_channels, n_out_channels, kernel_size=second_branch_kernel,
                      padding=3, bias=False),
            nn.BatchNorm1d(n_out_channels),
            nn.GELU(),
            nn.MaxPool1d(kernel_size=2, stride=2, padding=1),
        )
        self.dropout = nn.Dropout(dropout)

    def output_length(self, n_times: int) -> int:
        """Length of the concatenated time axis for an input of ``n_times`` samples."""
        return (conv_output_length(self.small_kernel_branch, n_times)
                + conv_output_length(self.large_kernel_branch, n_times))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.small_kernel_branch(x), self.large_kernel_branch(x)], dim=2)
        return self.dropout(features)


class CausalConvMultiHeadAttention(nn.Module):
    """AttnSleep's multi-head attention with keys and values from causal convolutions.

    The input is the AFR map ``(B, n_tokens, d_model)``: the ``n_tokens`` (30) recalibrated
    channels are the sequence and the ``d_model`` (80) time steps are the features, as in the
    original. Keys and values are causal convolutions (kernel 7) across the feature axis with the
    tokens as convolution channels; the query arrives already projected (by the encoder layer's
    own causal convolution). Heads split the feature axis; dropout acts on the attention weights;
    a linear layer mixes the heads.

    Parameters
    ----------
    n_heads : int
        Number of heads; must divide ``d_model``.
    d_model : int
        Feature size per token.
    n_tokens : int
        Sequence length (channels of the convolutions).
    kernel_size : int
        Kernel of the causal convolutions.
    dropout : float
        Dropout on the attention weights.
    keep_unused_query_conv : bool
        The original clones three causal convolutions but uses only the key and value ones (the
        query is projected by the encoder layer). With True the unused one is registered (as
        ``unused_query_conv``) so that the parameter count (522,805) and state dict match the
        original; it never enters the computation and gets no gradient.
    """

    def __init__(self, n_heads: int, d_model: int, n_tokens: int, kernel_size: int = 7,
                 dropout: float = 0.1, keep_unused_query_conv: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        if keep_unused_query_conv:
            self.unused_query_conv = CausalConv1d(n_tokens, n_tokens, kernel_size)
        self.key_conv = CausalConv1d(n_tokens, n_tokens, kernel_size)
        self.value_conv = CausalConv1d(n_tokens, n_tokens, kernel_size)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        return x.reshape(batch, n_tokens, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, query: torch.Tensor, key_value_input: torch.Tensor) -> torch.Tensor:
        """Attend from ``query`` (already projected) to the convolved ``key_value_input``.

        Parameters
        ----------
        query : torch.Tensor
            ``(B, n_tokens, d_model)``.
        key_value_input : torch.Tensor
            ``(B, n_tokens, d_model)``, the layer input.

        Returns
        -------
        torch.Tensor
            ``(B, n_tokens, d_model)``.
        """
        batch, n_tokens, d_model = query.shape
        q = self._split_heads(query)
        k = self._split_heads(self.key_conv(key_value_input))
        v = self._split_heads(self.value_conv(key_value_input))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_head)
        weights = self.attn_dropout(torch.softmax(scores, dim=-1))
        heads = torch.matmul(weights, v).transpose(1, 2).reshape(batch, n_tokens, d_model)
        return self.out_proj(heads)


class PositionwiseFeedForward(nn.Module):
    """``w2(dropout(relu(w1(x))))`` applied to each token.

    Parameters
    ----------
    d_model : int
        Token size.
    d_ff : int
        Hidden size.
    dropout : float
        Dropout between the two layers.
    activation : callable
        Non-linearity between the layers (ReLU in AttnSleep).
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1,
                 activation: Callable[[torch.Tensor], torch.Tensor] = F.relu):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(self.activation(self.w1(x))))


class TCEEncoderLayer(nn.Module):
    """One layer of AttnSleep's temporal context encoder.

    As in the original code::

        query = causal_conv(x)
        x = query + dropout(attention(query, x))          # no layer norm on this sublayer
        x = x + dropout(feed_forward(layer_norm(x)))      # pre-norm feed-forward

    The original wraps the attention in the same "norm, sublayer, dropout, residual" helper as
    the feed-forward, but its lambda ignores the normalised input, so the attention sublayer is
    effectively un-normalised and its norm's parameters are unused. We reproduce the computation
    and, with ``keep_unused_params=True``, register the unused norm (``unused_attention_norm``)
    and the attention's unused query convolution so the parameter count matches the original.

    Parameters
    ----------
    d_model : int
        Feature size per token (80 at 100 Hz).
    n_tokens : int
        Sequence length (30 AFR channels).
    n_heads : int
        Attention heads.
    d_ff : int
        Feed-forward hidden size.
    dropout : float
        Dropout of attention weights, sublayer outputs and the feed-forward.
    kernel_size : int
        Kernel of the causal convolutions.
    keep_unused_params : bool
        Register the original's unused parameters (see above).
    """

    def __init__(self, d_model: int, n_tokens: int, n_heads: int = 5, d_ff: int = 120,
                 dropout: float = 0.1, kernel_size: int = 7, keep_unused_params: bool = True):
        super().__init__()
        self.query_conv = CausalConv1d(n_tokens, n_tokens, kernel_size)
        self.self_attn = CausalConvMultiHeadAttention(
            n_heads, d_model, n_tokens, kernel_size, dropout,
            keep_unused_query_conv=keep_unused_params)
        if keep_unused_params:
            self.unused_attention_norm = StdLayerNorm(d_model)
        self.attn_dropout = nn.Dropout(dropout)
        self.ff_norm = StdLayerNorm(d_model)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout)
        self.ff_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.query_conv(x)
        x = query + self.attn_dropout(self.self_attn(query, x))
        return x + self.ff_dropout(self.feed_forward(self.ff_norm(x)))


class TCE(nn.Module):
    """A stack of encoder layers followed by a final layer norm.

    Parameters
    ----------
    layer_factory : callable
        ``layer_factory()`` returns a new, independently initialised layer mapping
        ``(B, n_tokens, d_model)`` to the same shape (e.g. :class:`TCEEncoderLayer` or a
        Conformer block).
    n_layers : int
        Number of layers.
    d_model : int
        Feature size per token, for the final norm.
    final_norm : torch.nn.Module, optional
        Final normalisation; AttnSleep's :class:`StdLayerNorm` by default.
    """

    def __init__(self, layer_factory: Callable[[], nn.Module], n_layers: int, d_model: int,
                 final_norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList([layer_factory() for _ in range(n_layers)])
        self.norm = final_norm if final_norm is not None else StdLayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class FlattenLinearHead(nn.Module):
    """Flatten ``(B, n_tokens, d_model)`` and map it linearly to ``n_outputs`` logits.

    Parameters
    ----------
    n_features : int
        ``n_tokens * d_model``.
    n_outputs : int
        Number of classes.
    """

    def __init__(self, n_features: int, n_outputs: int):
        super().__init__()
        self.fc = nn.Linear(n_features, n_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.flatten(1))


def same_padding(length: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``padding='SAME'``: ``(left, right)`` padding so the output is ``ceil(length / stride)``.

    Parameters
    ----------
    length : int
        Input length.
    kernel_size, stride : int
        Of the convolution or pooling.

    Returns
    -------
    tuple of int
        Padding before and after; TF puts the odd sample after.
    """
    out_length = -(-length // stride)
    total = max((out_length - 1) * stride + kernel_size - length, 0)
    return total // 2, total - total // 2


class SamePadConv1d(nn.Conv1d):
    """1-D convolution with TensorFlow's ``'SAME'`` padding (output length ``ceil(T / stride)``).

    The padding depends on the input length only (a static shape), so it is computed in
    ``forward`` from ``x.shape`` without data-dependent control flow.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = same_padding(x.shape[-1], self.kernel_size[0], self.stride[0])
        return super().forward(F.pad(x, (left, right)))


class SamePadMaxPool1d(nn.MaxPool1d):
    """Max-pooling with TensorFlow's ``'SAME'`` padding; padded positions never win the max."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        return super().forward(F.pad(x, (left, right), value=float("-inf")))


def init_lstm_tf_style(lstm: nn.LSTM | nn.LSTMCell) -> None:
    """Initialise an LSTM as TensorFlow 1's ``LSTMCell`` is by default.

    TF keeps one kernel of shape ``(input + hidden, 4 * hidden)`` with Glorot-uniform init, zero
    biases, and adds a constant ``forget_bias=1`` to the forget gate. Here both weight matrices
    get the Glorot bound of that joint kernel, and the learnable forget-gate bias starts at 1,
    which is the same function.

    Parameters
    ----------
    lstm : torch.nn.LSTM or torch.nn.LSTMCell
        Initialised in place.
    """
    hidden = lstm.hidden_size
    suffixes = [f"_l{layer}" for layer in range(lstm.num_layers)] if isinstance(lstm, nn.LSTM) else [""]
    with torch.no_grad():
        for suffix in suffixes:
            w_ih = getattr(lstm, "weight_ih" + suffix)
            w_hh = getattr(lstm, "weight_hh" + suffix)
            bound = math.sqrt(6.0 / (w_ih.shape[1] + hidden + 4 * hidden))
            w_ih.uniform_(-bound, bound)
            w_hh.uniform_(-bound, bound)
            b_ih = getattr(lstm, "bias_ih" + suffix, None)
            b_hh = getattr(lstm, "bias_hh" + suffix, None)
            if b_ih is not None:
                b_ih.zero_()
                b_hh.zero_()
                b_ih[hidden:2 * hidden] = 1.0  # PyTorch gate order: input, forget, cell, output
