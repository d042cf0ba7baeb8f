"""AttnSleep with its MRCNN replaced by a multi-scale multi-period CRNN (one-module swap study)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attnsleep import AttnSleep

__all__ = ["MultiPeriodBlock", "MultiScaleMultiPeriodCRNN", "AttnSleepMSMP"]


class MultiPeriodBlock(nn.Module):
    """TimesNet-style block (Wu et al., ICLR 2023) on a ``(B, C, T)`` feature sequence.

    1. The amplitude spectrum ``|rfft(x)|`` along time, averaged over the batch and channels
       (DC excluded), gives the ``top_k`` dominant frequencies ``f_i`` of the batch, hence the
       periods ``p_i = T // f_i``.
    2. For each period the sequence is zero-padded to a multiple of ``p_i``, folded into a 2-D
       map ``(C, ceil(T / p_i), p_i)`` (rows = successive cycles, columns = phase) and passed
       through a shared 2-D CNN (conv 3x3, GELU, conv 3x3), then unfolded and cropped to ``T``.
    3. The ``top_k`` results are averaged with per-sample softmax weights of the amplitudes of
       their frequencies, and added to the input (residual).

    Parameters
    ----------
    n_channels : int
        Channels ``C`` of the sequence.
    n_hidden : int
        Channels inside the 2-D CNN.
    top_k : int
        Number of periods.
    kernel_size : int
        Kernel of the 2-D convolutions (odd).
    fixed_periods : tuple of int, optional
        Use these periods instead of selecting them per batch; the softmax weights still come
        from the amplitudes at ``T // p``. This makes the forward pass free of data-dependent
        shapes and host synchronisation (``torch.compile``/``vmap`` friendly).

    Notes
    -----
    The per-batch selection is data-dependent: the chosen periods are read back to the host
    (one synchronisation per forward pass on CUDA) and shape the folding, as in TimesNet, so the
    block breaks a ``torch.compile`` graph and cannot run under ``vmap``. The FFT runs in float32
    (half-precision FFTs need power-of-two lengths on CUDA).
    """

    def __init__(self, n_channels: int, n_hidden: int = 32, top_k: int = 3, kernel_size: int = 3,
                 fixed_periods: tuple[int, ...] | None = None):
        super().__init__()
        self.top_k = top_k if fixed_periods is None else len(fixed_periods)
        self.fixed_periods = tuple(fixed_periods) if fixed_periods is not None else None
        padding = kernel_size // 2
        self.conv2d = nn.Sequential(
            nn.Conv2d(n_channels, n_hidden, kernel_size, padding=padding),
            nn.GELU(),
            nn.Conv2d(n_hidden, n_channels, kernel_size, padding=padding),
        )

    def select_periods(self, x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Periods (list of int) and their per-sample amplitudes ``(B, top_k)`` for ``x`` ``(B, C, T)``."""
        n_times = x.shape[-1]
        amplitude = torch.fft.rfft(x.float(), dim=-1).abs().mean(dim=1)  # (B, n_freqs)
        if self.fixed_periods is not None:
            frequencies = [max(n_times // period, 1) for period in self.fixed_periods]
            return list(self.fixed_periods), amplitude[:, frequencies]
        batch_amplitude = amplitude.mean(dim=0)
        batch_amplitude = torch.cat([batch_amplitude.new_zeros(1), batch_amplitude[1:]])  # no DC
        top_frequencies = torch.topk(batch_amplitude, self.top_k).indices
        periods = [n_times // max(int(f), 1) for f in top_frequencies.tolist()]
        return periods, amplitude[:, top_frequencies]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_channels, n_times = x.shape
        periods, amplitudes = self.select_periods(x)
        outputs = []
        for period in periods:
            n_rows = -(-n_times // period)
            folded = F.pad(x, (0, n_rows * period - n_times)).reshape(batch, n_channels, n_rows, period)
            unfolded = self.conv2d(folded).reshape(batch, n_channels, n_rows * period)
            outputs.append(unfolded[..., :n_times])
        weights = torch.softmax(amplitudes, dim=1).to(x.dtype)  # (B, top_k)
        mixed = (torch.stack(outputs, dim=-1) * weights[:, None, None, :]).sum(dim=-1)
        return x + mixed


class MultiScaleMultiPeriodCRNN(nn.Module):
    """Multi-scale multi-period convolutional-recurrent feature extractor for one epoch.

    * Multi-scale: parallel 1-D convolutions on the raw signal with kernels of 0.25-4 s
      (``kernel_sizes``, 25/50/100/200/400 samples at 100 Hz), all with the same stride so their
      outputs align; concatenated, batch norm, GELU, max-pool, dropout -> feature sequence.
    * Multi-period: a :class:`MultiPeriodBlock` on that feature sequence (3.3 steps per
      second at 100 Hz, so its periods capture slow-wave and slower rhythms).
    * Fusion: both views concatenated and mixed by a 1x1 convolution + BN + GELU, dropout.
    * Recurrent: a bidirectional GRU along time with a residual connection.

    Output ``(B, n_out_channels, output_length(n_times))``: 128 x 100 at 100 Hz / 3000 samples.

    Parameters
    ----------
    n_chans : int
        Input channels.
    kernel_sizes : tuple of int
        Kernels of the multi-scale branches, in samples.
    n_filters_per_scale : int
        Filters of each branch.
    stride : int
        Stride of every branch.
    pool_size : int
        Max-pool size and stride after the branches.
    n_out_channels : int
        Channels after fusion and of the GRU output (``2 * rnn_hidden`` must equal it).
    top_k : int
        Periods of the multi-period block.
    period_hidden : int
        Channels inside the multi-period 2-D CNN.
    dropout : float
        Dropout after the branches and after fusion.
    fixed_periods : tuple of int, optional
        See :class:`MultiPeriodBlock`.
    """

    def __init__(self, n_chans: int = 1, kernel_sizes: tuple[int, ...] = (25, 50, 100, 200, 400),
                 n_filters_per_scale: int = 32, stride: int = 6, pool_size: int = 5,
                 n_out_channels: int = 128, top_k: int = 3, period_hidden: int = 80,
                 dropout: float = 0.5, fixed_periods: tuple[int, ...] | None = None):
        super().__init__()
        if n_out_channels % 2:
            raise ValueError("n_out_channels must be even (bidirectional GRU)")
        self.n_out_channels = n_out_channels
        self.kernel_sizes = tuple(kernel_sizes)
        self.stride = stride
        self.scale_convs = nn.ModuleList(
            [nn.Conv1d(n_chans, n_filters_per_scale, k, stride=stride, padding=k // 2, bias=False)
             for k in kernel_sizes])
        n_scale_channels = n_filters_per_scale * len(kernel_sizes)
        self.scale_norm = nn.BatchNorm1d(n_scale_channels)
        self.pool = nn.MaxPool1d(pool_size, pool_size)
        self.multi_period = MultiPeriodBlock(n_scale_channels, period_hidden, top_k,
                                             fixed_periods=fixed_periods)
        self.fuse = nn.Sequential(
            nn.Conv1d(2 * n_scale_channels, n_out_channels, kernel_size=1, bias=False),
            nn.BatchNorm1d(n_out_channels),
            nn.GELU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(n_out_channels, n_out_channels // 2, batch_first=True, bidirectional=True)

    def _branch_length(self, n_times: int) -> int:
        # Odd and even kernels give lengths differing by one; all branches are cut to the shortest.
        return min((n_times + 2 * (k // 2) - k) // self.stride + 1 for k in self.kernel_sizes)

    def output_length(self, n_times: int) -> int:
        """Length of the output sequence for an input of ``n_times`` samples."""
        return self._branch_length(n_times) // self.pool.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = self._branch_length(x.shape[-1])
        scales = torch.cat([conv(x)[..., :length] for conv in self.scale_convs], dim=1)
        scales = self.dropout(self.pool(F.gelu(self.scale_norm(scales))))
        periods = self.multi_period(scales)
        fused = self.dropout(self.fuse(torch.cat([scales, periods], dim=1)))
        recurrent, _ = self.rnn(fused.transpose(1, 2))
        return fused + recurrent.transpose(1, 2)


class AttnSleepMSMP(AttnSleep):
    """AttnSleep whose MRCNN is replaced by a multi-scale multi-period CRNN.

    :class:`MultiScaleMultiPeriodCRNN` (multi-scale 1-D convolutions, a TimesNet-style
    multi-period 2-D block selected by FFT, fusion, bidirectional GRU) produces a
    ``128 x 100`` map at 100 Hz; AFR (to 30 channels), the TCE (2 layers, 5 heads,
    ``d_model`` = 100) and the linear head are AttnSleep's. 515,637 parameters with the
    defaults (-1.4% from AttnSleep's 522,805; ``period_hidden=80`` was chosen for that).

    Design choices: kernels span 0.25-4 s, bracketing MRCNN's 0.5 s and 4 s kernels; a common
    stride (6, as MRCNN's small branch) aligns the branches so they can be stacked as channels
    rather than concatenated in time; the pooled sequence (100 steps) is long enough for the FFT
    to resolve periods of 2-50 steps (0.6-15 s); ``top_k=3`` periods (TimesNet uses 2-5); the
    GRU is residual so the convolutional features reach AFR directly; output length 100 is
    divisible by the 5 heads.

    Parameters
    ----------
    n_outputs, n_chans, sfreq, n_times : int or float
        As :class:`~sleeplib.models.attnsleep.AttnSleep`.
    kernel_sizes, n_filters_per_scale, stride, pool_size, top_k, period_hidden, fixed_periods
        Passed to :class:`MultiScaleMultiPeriodCRNN`.
    feature_dropout : float
        Dropout of the feature extractor (0.5, as MRCNN's).
    **attnsleep_kwargs
        Other :class:`~sleeplib.models.attnsleep.AttnSleep` arguments (``n_heads``, ``d_ff``...).

    Notes
    -----
    Runs on CPU and CUDA. With the default per-batch period selection the forward pass reads the
    periods back to the host and has data-dependent shapes (see :class:`MultiPeriodBlock`), so
    unlike AttnSleep it is not suited to ``vmap`` over folds or CUDA graphs; pass
    ``fixed_periods`` for a static graph (the GRU still rules out ``vmap``).

    Implementation differences
    --------------------------
    Not a published model; its multi-period block follows TimesNet's ``TimesBlock`` with a plain
    two-layer 2-D CNN instead of TimesNet's Inception block.

    References
    ----------
    H. Wu, T. Hu, Y. Liu, H. Zhou, J. Wang and M. Long, "TimesNet: Temporal 2D-Variation Modeling
    for General Time Series Analysis", ICLR 2023.
    E. Eldele et al., IEEE Trans. Neural Syst. Rehabil. Eng. 29:809-818, 2021 (AttnSleep).
    """

    def __init__(self, n_outputs: int = 5, n_chans: int = 1, sfreq: float = 100.0,
                 n_times: int = 3000, *, kernel_sizes: tuple[int, ...] = (25, 50, 100, 200, 400),
                 n_filters_per_scale: int = 32, stride: int = 6, pool_size: int = 5,
                 top_k: int = 3, period_hidden: int = 80, feature_dropout: float = 0.5,
                 fixed_periods: tuple[int, ...] | None = None, **attnsleep_kwargs):
        feature_extractor = MultiScaleMultiPeriodCRNN(
            n_chans, kernel_sizes, n_filters_per_scale, stride, pool_size, 128, top_k,
            period_hidden, feature_dropout, fixed_periods)
        super().__init__(n_outputs, n_chans, sfreq, n_times, feature_extractor=feature_extractor,
                         **attnsleep_kwargs)
