"""AttnSleep (Eldele et al., 2021), assembled from :mod:`sleeplib.models.blocks`."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .blocks import (
    MRCNN,
    TCE,
    FlattenLinearHead,
    SEResidualBlock1d,
    TCEEncoderLayer,
    as_batch_channels_times,
    init_weights_normal,
)

__all__ = ["AttnSleep"]

#: Sampling rate of SHHS EEG; at this rate the original uses ``MRCNN_SHHS`` (kernel 6).
SHHS_SFREQ = 125.0


class AttnSleep(nn.Module):
    """Attention-based single-channel sleep stager of Eldele et al. (2021).

    A multi-resolution CNN (MRCNN) extracts features from a 30-s epoch, adaptive feature
    recalibration (AFR, an SE residual block) reduces them to 30 channels, a temporal context
    encoder (TCE: transformer encoder layers whose queries, keys and values come from causal
    convolutions) models their dependencies, and a linear layer classifies the flattened map.

    At 100 Hz with 3000 samples the TCE input is ``30 x 80`` and the model has 522,805
    trainable parameters (5 classes), as the original. At 125 Hz (SHHS, 3750 samples) the large
    kernel branch uses kernel 6 (the original's ``MRCNN_SHHS``) and ``d_model`` is 100.

    Parameters
    ----------
    n_outputs : int
        Number of classes.
    n_chans : int
        Input channels (1 in the paper).
    sfreq : float
        Sampling rate in Hz; only used to pick the SHHS kernel when ``second_branch_kernel`` is
        None (the MRCNN kernels are in samples and are not rescaled, as in the original).
    n_times : int
        Samples per epoch.
    n_tce_layers : int
        Encoder layers (2).
    n_heads : int
        Attention heads (5); must divide ``d_model``.
    d_ff : int
        Feed-forward hidden size (120).
    afr_channels : int
        Channels after AFR = tokens of the TCE (30).
    se_reduction : int
        SE bottleneck ratio (16).
    dropout : float
        Dropout in the TCE (0.1).
    mrcnn_dropout : float
        Dropout in the MRCNN (0.5).
    second_branch_kernel : int, optional
        Kernel of the 128-filter convolutions of the large-kernel branch; None chooses 6 at
        125 Hz (SHHS) and 7 otherwise.
    causal_kernel_size : int
        Kernel of the TCE's causal convolutions (7).
    keep_unused_params : bool
        Register the parameters that the original creates but never uses (one causal
        convolution and one layer norm per encoder layer, 12,980 parameters in all) so that
        parameter counts and state dicts match. They receive no gradient.
    init_weights : bool
        Apply :func:`~sleeplib.models.blocks.init_weights_normal` (the original's
        ``weights_init_normal``, applied by its training script).
    feature_extractor : torch.nn.Module, optional
        Replaces the MRCNN. It maps ``(B, n_chans, n_times)`` to ``(B, F, L)`` and must expose
        ``n_out_channels`` (``F``) and ``output_length(n_times)`` (``L``). Used by the variants.
    encoder_layer_factory : callable, optional
        ``encoder_layer_factory(d_model, n_tokens)`` returns one encoder layer mapping
        ``(B, n_tokens, d_model)`` to the same shape; replaces :class:`TCEEncoderLayer`.
        The stack (``n_tce_layers`` layers + final layer norm) is kept.

    Attributes
    ----------
    d_model : int
        Feature size per token entering the TCE (80 at 100 Hz).
    n_tokens : int
        Tokens entering the TCE (``afr_channels``).
    n_features : int
        ``n_tokens * d_model``, the size of ``return_feats`` output.

    Notes
    -----
    For training under ``torch.func.vmap`` the caller must choose ``randomness`` for dropout.
    ``forward`` has no data-dependent control flow, ``.item()`` or state mutation.

    Implementation differences
    --------------------------
    None in the computation. Cosmetic: causal convolutions pad on the left only instead of
    padding both sides and slicing (same outputs); the original's never-used attention query
    convolution and first-sublayer norm are kept as explicitly named unused parameters
    (``keep_unused_params``); module names differ from the original state dict.

    References
    ----------
    E. Eldele, Z. Chen, C. Liu, M. Wu, C.-K. Kwoh, X. Li and C. Guan, "An Attention-Based Deep
    Learning Approach for Sleep Stage Classification With Single-Channel EEG", IEEE Trans.
    Neural Syst. Rehabil. Eng. 29:809-818, 2021, doi:10.1109/TNSRE.2021.3076234.
    Reference code: https://github.com/emadeldeen24/AttnSleep (``model/model.py``).
    """

    def __init__(
        self,
        n_outputs: int = 5,
        n_chans: int = 1,
        sfreq: float = 100.0,
        n_times: int = 3000,
        *,
        n_tce_layers: int = 2,
        n_heads: int = 5,
        d_ff: int = 120,
        afr_channels: int = 30,
        se_reduction: int = 16,
        dropout: float = 0.1,
        mrcnn_dropout: float = 0.5,
        second_branch_kernel: int | None = None,
        causal_kernel_size: int = 7,
        keep_unused_params: bool = True,
        init_weights: bool = True,
        feature_extractor: nn.Module | None = None,
        encoder_layer_factory: Callable[[int, int], nn.Module] | None = None,
    ):
        super().__init__()
        self.n_outputs = n_outputs
        self.n_chans = n_chans
        self.sfreq = float(sfreq)
        self.n_times = n_times

        if feature_extractor is None:
            if second_branch_kernel is None:
                second_branch_kernel = 6 if self.sfreq == SHHS_SFREQ else 7
            feature_extractor = MRCNN(n_chans, second_branch_kernel, mrcnn_dropout)
        self.feature_extractor = feature_extractor
        self.d_model = int(feature_extractor.output_length(n_times))
        self.n_tokens = afr_channels
        self.n_features = self.n_tokens * self.d_model
        if self.d_model % n_heads and encoder_layer_factory is None:
            raise ValueError(
                f"the feature map is {self.d_model} long, not divisible by n_heads={n_heads}; "
                "change n_times, n_heads or second_branch_kernel")

        self.afr = SEResidualBlock1d(feature_extractor.n_out_channels, afr_channels, se_reduction)

        d_model, n_tokens = self.d_model, self.n_tokens
        if encoder_layer_factory is None:
            def make_layer() -> nn.Module:
                return TCEEncoderLayer(d_model, n_tokens, n_heads, d_ff, dropout,
                                       causal_kernel_size, keep_unused_params)
        else:
            def make_layer() -> nn.Module:
                return encoder_layer_factory(d_model, n_tokens)
        self.tce = TCE(make_layer, n_tce_layers, d_model)
        self.head = FlattenLinearHead(self.n_features, n_outputs)

        if init_weights:
            self.apply(init_weights_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """TCE input: the AFR map ``(B, n_tokens, d_model)`` for ``x`` ``(B, C, T)`` or ``(B, T)``."""
        return self.afr(self.feature_extractor(as_batch_channels_times(x)))

    def forward(self, x: torch.Tensor, return_feats: bool = False) -> torch.Tensor:
        """Classify epochs.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, n_chans, n_times)``, or ``(B, n_times)`` for one channel.
        return_feats : bool
            Return the flattened TCE output ``(B, n_tokens * d_model)`` instead of logits.

        Returns
        -------
        torch.Tensor
            Logits ``(B, n_outputs)`` or features ``(B, n_features)``.
        """
        encoded = self.tce(self.forward_features(x)).flatten(1)
        if return_feats:
            return encoded
        return self.head(encoded)
