"""AttnSleep with its TCE encoder layers replaced by Conformer blocks (Gulati et al., 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attnsleep import AttnSleep

__all__ = ["ConformerBlock", "AttnSleepConformer", "sinusoidal_positions"]

SEQUENCE_AXES = ("channels", "time")


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """Sinusoidal position table ``(n_positions, d_model)`` of Vaswani et al. (2017).

    Works for odd ``d_model`` too (the last cosine column is dropped).
    """
    position = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)
    n_pairs = (d_model + 1) // 2
    frequency = torch.exp(torch.arange(n_pairs, dtype=torch.float32) * (-math.log(10000.0) * 2 / d_model))
    table = torch.zeros(n_positions, 2 * n_pairs)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table[:, :d_model]


class _FeedForwardModule(nn.Module):
    """Conformer feed-forward module: LN, linear, Swish, dropout, linear, dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(self.dropout(F.silu(self.w1(self.norm(x))))))


class _SelfAttentionModule(nn.Module):
    """LN, sinusoidal absolute positions added, multi-head self-attention, dropout."""

    def __init__(self, d_model: int, n_tokens: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.norm = nn.LayerNorm(d_model)
        self.register_buffer("positions", sinusoidal_positions(n_tokens, d_model), persistent=False)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, d_model = x.shape
        h = self.norm(x) + self.positions
        q, k, v = self.qkv(h).reshape(batch, n_tokens, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_head)
        weights = self.attn_dropout(torch.softmax(scores, dim=-1))
        heads = torch.matmul(weights, v).transpose(1, 2).reshape(batch, n_tokens, d_model)
        return self.dropout(self.out_proj(heads))


class _ConvolutionModule(nn.Module):
    """LN, pointwise conv (2d), GLU, depthwise conv, BatchNorm, Swish, pointwise conv, dropout."""

    def __init__(self, d_model: int, kernel_size: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Conv1d(d_model, 2 * d_model, kernel_size=1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2,
                                   groups=d_model)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise_out = nn.Conv1d(d_model, d_model, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).transpose(1, 2)  # convolve along the token sequence
        h = F.glu(self.pointwise_in(h), dim=1)
        h = F.silu(self.batch_norm(self.depthwise(h)))
        return self.dropout(self.pointwise_out(h).transpose(1, 2))


class ConformerBlock(nn.Module):
    """Conformer block (Gulati et al., Interspeech 2020) on ``(B, n_tokens, d_model)``.

    ``x + FFN/2 -> x + MHSA -> x + Conv -> x + FFN/2 -> LayerNorm`` (macaron feed-forward
    halves around attention and convolution).

    Parameters
    ----------
    d_model : int
        Token size.
    n_tokens : int
        Sequence length (for the position table).
    n_heads : int
        Attention heads; must divide ``d_model``.
    d_ff : int
        Hidden size of each feed-forward module.
    kernel_size : int
        Depthwise convolution kernel (odd; "same" padding).
    dropout : float
        Dropout of every module and of the attention weights.
    """

    def __init__(self, d_model: int, n_tokens: int, n_heads: int, d_ff: int, kernel_size: int = 7,
                 dropout: float = 0.1):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd to keep the sequence length")
        self.ff1 = _FeedForwardModule(d_model, d_ff, dropout)
        self.self_attn = _SelfAttentionModule(d_model, n_tokens, n_heads, dropout)
        self.conv = _ConvolutionModule(d_model, kernel_size, dropout)
        self.ff2 = _FeedForwardModule(d_model, d_ff, dropout)
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.self_attn(x)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.final_norm(x)


class _TimeMajorConformerBlock(ConformerBlock):
    """Conformer block over the time axis of a ``(B, channels, time)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class AttnSleepConformer(AttnSleep):
    """AttnSleep whose TCE encoder layers are Conformer blocks (one-module swap study).

    MRCNN, AFR, the encoder stack (2 layers + AttnSleep's final layer norm) and the linear
    head are AttnSleep's; each :class:`~sleeplib.models.blocks.TCEEncoderLayer` is replaced by
    a :class:`ConformerBlock`. Positions: sinusoidal absolute position encodings added to the
    (layer-normalised) attention input in every block; we chose them over Transformer-XL
    relative positions because the sequences are short (30 or 80 tokens) and fixed in length.

    ``sequence_axis`` picks what the Conformer treats as its sequence:

    * ``"channels"`` (default): the same layout as the TCE it replaces - 30 AFR channels are the
      tokens, the 80 time steps the features (``d_model`` 80) - so only the layer type changes;
    * ``"time"``: the 80 time steps are the tokens and the 30 AFR channels the features
      (``d_model`` 30), the orientation a Conformer has in speech.

    Defaults give 591,285 parameters in the "channels" layout (+13% over AttnSleep's
    522,805) and 463,385 in the "time" layout (-11%). AttnSleep's ``init_weights_normal`` is
    applied to the whole model, Conformer convolutions included.

    Parameters
    ----------
    n_outputs, n_chans, sfreq, n_times : int or float
        As :class:`~sleeplib.models.attnsleep.AttnSleep`.
    n_layers : int
        Conformer blocks (2, as TCE layers).
    n_heads : int
        Attention heads (5).
    d_ff : int
        Hidden size of each feed-forward half (120, AttnSleep's ``d_ff``).
    conv_kernel_size : int
        Depthwise kernel (7, AttnSleep's causal kernel).
    dropout : float
        Dropout inside the blocks (0.1).
    sequence_axis : {"channels", "time"}
        See above.
    **attnsleep_kwargs
        Other :class:`~sleeplib.models.attnsleep.AttnSleep` arguments (``afr_channels``,
        ``mrcnn_dropout``, ...).

    Implementation differences
    --------------------------
    Not a published model. Relative to Gulati et al.: absolute sinusoidal instead of relative
    positional encoding; depthwise kernel 7 instead of 32 (sequences of 30-80 tokens); BatchNorm
    in the convolution module as in the paper.

    References
    ----------
    A. Gulati et al., "Conformer: Convolution-augmented Transformer for Speech Recognition",
    Proc. Interspeech 2020, pp. 5036-5040, doi:10.21437/Interspeech.2020-3015.
    E. Eldele et al., IEEE Trans. Neural Syst. Rehabil. Eng. 29:809-818, 2021 (AttnSleep).
    """

    def __init__(self, n_outputs: int = 5, n_chans: int = 1, sfreq: float = 100.0,
                 n_times: int = 3000, *, n_layers: int = 2, n_heads: int = 5, d_ff: int = 120,
                 conv_kernel_size: int = 7, dropout: float = 0.1, sequence_axis: str = "channels",
                 **attnsleep_kwargs):
        if sequence_axis not in SEQUENCE_AXES:
            raise ValueError(f"sequence_axis must be one of {SEQUENCE_AXES}, got {sequence_axis!r}")

        def make_block(d_model: int, n_tokens: int) -> nn.Module:
            if sequence_axis == "channels":
                return ConformerBlock(d_model, n_tokens, n_heads, d_ff, conv_kernel_size, dropout)
            return _TimeMajorConformerBlock(n_tokens, d_model, n_heads, d_ff, conv_kernel_size, dropout)

        super().__init__(n_outputs, n_chans, sfreq, n_times, n_tce_layers=n_layers,
                         n_heads=n_heads, dropout=dropout, encoder_layer_factory=make_block,
                         **attnsleep_kwargs)
        self.sequence_axis = sequence_axis
