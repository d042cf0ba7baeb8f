"""DeepSleepNet (Supratak et al., 2017): epoch CNN (``DeepFeatureNet``) + sequence BiLSTM model."""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import SamePadConv1d, SamePadMaxPool1d, conv_output_length, init_lstm_tf_style

__all__ = ["DeepFeatureEncoder", "DeepFeatureNet", "DeepSleepNet", "FIRST_CONV_L2"]

FIRST_CONV_L2 = 1e-3
"""L2 coefficient of the original on the first convolution of the small-filter CNN.

The TF code adds ``FIRST_CONV_L2 * sum(w ** 2) / 2`` (``tf.nn.l2_loss``) to the loss for that
kernel only; every other layer is built with ``wd=0`` (no decay). With Adam this is an L2 term in
the loss, not decoupled (AdamW) decay. Get the tensor with ``first_conv_parameters()``.
"""

# TF's moving averages use decay 0.999, i.e. PyTorch momentum 1 - 0.999.
_BN_MOMENTUM = 0.001
_BN_EPS = 1e-5


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int,
                  batch_norm: bool = True) -> nn.Sequential:
    if not batch_norm:
        # SleepEEGNet's copy of this CNN: biased convolutions, no batch norm.
        return nn.Sequential(
            SamePadConv1d(in_channels, out_channels, kernel_size, stride, bias=True), nn.ReLU())
    return nn.Sequential(
        SamePadConv1d(in_channels, out_channels, kernel_size, stride, bias=False),
        nn.BatchNorm1d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM),
        nn.ReLU(),
    )


def _he_truncated_normal_(weight: torch.Tensor, fan_in: int) -> None:
    # TF truncated_normal_initializer(stddev) re-draws beyond 2 standard deviations.
    std = math.sqrt(2.0 / fan_in)
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _init_like_original(module: nn.Module) -> None:
    """Initialisation of ``deepsleep/nn.py``: He truncated normal, BN gamma ~ N(1, 0.002)."""
    if isinstance(module, nn.Conv1d):
        _he_truncated_normal_(module.weight, module.in_channels * module.kernel_size[0])
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        _he_truncated_normal_(module.weight, module.in_features)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d):
        nn.init.normal_(module.weight, 1.0, 0.002)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LSTM):
        init_lstm_tf_style(module)


class DeepFeatureEncoder(nn.Module):
    """DeepSleepNet's representation learning part: two CNNs on a raw 30-s epoch.

    Small filters (temporal detail): conv 64 of size ``Fs/2`` stride ``Fs/16``, max-pool 8/8,
    dropout, three conv 128 of size 8, max-pool 4/4. Large filters (frequency content): conv 64
    of size ``4 Fs`` stride ``Fs/2``, max-pool 4/4, dropout, three conv 128 of size 6, max-pool
    2/2. Each conv has no bias and is followed by batch norm and ReLU; all paddings are TF
    ``'SAME'``. Both outputs are flattened, concatenated and dropped out. At 100 Hz and 3000
    samples: ``128 * 16 + 128 * 8 = 3072`` features.

    Parameters
    ----------
    n_chans : int
        Input channels.
    sfreq : float
        Sampling rate; sizes ``Fs/2``, ``Fs/16``, ``4 Fs`` are ``int(sfreq // 2)``,
        ``int(sfreq // 16)``, ``int(4 * sfreq)`` (50, 6, 400 at 100 Hz as in the code).
    n_times : int
        Samples per epoch.
    dropout : float
        Dropout rate (0.5).
    batch_norm : bool
        Batch norm after each convolution (DeepSleepNet). False gives biased convolutions
        without batch norm, as in SleepEEGNet's reuse of this CNN.
    """

    def __init__(self, n_chans: int = 1, sfreq: float = 100.0, n_times: int = 3000,
                 dropout: float = 0.5, batch_norm: bool = True):
        super().__init__()
        half_fs = int(sfreq // 2)
        bn = batch_norm
        self.small_filter_cnn = nn.Sequential(
            _conv_bn_relu(n_chans, 64, kernel_size=half_fs, stride=int(sfreq // 16), batch_norm=bn),
            SamePadMaxPool1d(8, 8),
            nn.Dropout(dropout),
            _conv_bn_relu(64, 128, 8, 1, bn),
            _conv_bn_relu(128, 128, 8, 1, bn),
            _conv_bn_relu(128, 128, 8, 1, bn),
            SamePadMaxPool1d(4, 4),
        )
        self.large_filter_cnn = nn.Sequential(
            _conv_bn_relu(n_chans, 64, kernel_size=int(4 * sfreq), stride=half_fs, batch_norm=bn),
            SamePadMaxPool1d(4, 4),
            nn.Dropout(dropout),
            _conv_bn_relu(64, 128, 6, 1, bn),
            _conv_bn_relu(128, 128, 6, 1, bn),
            _conv_bn_relu(128, 128, 6, 1, bn),
            SamePadMaxPool1d(2, 2),
        )
        self.dropout = nn.Dropout(dropout)
        self.n_features = 128 * (conv_output_length(self.small_filter_cnn, n_times)
                                 + conv_output_length(self.large_filter_cnn, n_times))

    @property
    def first_conv(self) -> nn.Conv1d:
        """First convolution of the small-filter CNN, the only layer the original L2-penalises."""
        return self.small_filter_cnn[0][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, T)`` epochs to ``(B, n_features)``."""
        # Flatten time-major, as TF's NHWC flatten does, so weights of later layers could be ported.
        small = self.small_filter_cnn(x).transpose(1, 2).flatten(1)
        large = self.large_filter_cnn(x).transpose(1, 2).flatten(1)
        return self.dropout(torch.cat([small, large], dim=1))


class DeepFeatureNet(nn.Module):
    """DeepSleepNet's epoch classifier used for pre-training (Supratak et al., 2017).

    :class:`DeepFeatureEncoder` followed by a linear softmax layer. The original pre-trains it on
    a class-balanced (oversampled) training set and then copies the CNN weights into
    :class:`DeepSleepNet` (the softmax layer is not copied).

    Parameters
    ----------
    n_outputs : int
        Number of classes.
    n_chans : int
        Input channels.
    sfreq : float
        Sampling rate in Hz (filter sizes depend on it).
    n_times : int
        Samples per epoch.
    dropout : float
        Dropout of the CNNs (0.5).

    Notes
    -----
    Training facts from ``akaraspt/deepsleepnet`` (``train.py``, ``deepsleep/trainer.py``):
    pre-training 100 epochs, batch 100, Adam (lr 1e-4, beta1 0.9, beta2 0.999, eps 1e-8),
    cross-entropy plus L2 ``FIRST_CONV_L2 * ||w||^2 / 2`` on :meth:`first_conv_parameters` only,
    class-balanced oversampling of the training epochs.

    Implementation differences
    --------------------------
    None in the computation. PyTorch batch norm uses the unbiased batch variance for its running
    estimate (TF the biased one), a negligible difference. ``sfreq`` other than 100 Hz rounds
    the filter sizes down.

    References
    ----------
    A. Supratak, H. Dong, C. Wu and Y. Guo, "DeepSleepNet: A Model for Automatic Sleep Stage
    Scoring Based on Raw Single-Channel EEG", IEEE Trans. Neural Syst. Rehabil. Eng.
    25(11):1998-2008, 2017, doi:10.1109/TNSRE.2017.2721116.
    Reference code: https://github.com/akaraspt/deepsleepnet (``deepsleep/model.py``).
    """

    def __init__(self, n_outputs: int = 5, n_chans: int = 1, sfreq: float = 100.0,
                 n_times: int = 3000, *, dropout: float = 0.5):
        super().__init__()
        self.n_outputs = n_outputs
        self.n_chans = n_chans
        self.sfreq = float(sfreq)
        self.n_times = n_times
        self.encoder = DeepFeatureEncoder(n_chans, sfreq, n_times, dropout)
        self.n_features = self.encoder.n_features
        self.classifier = nn.Linear(self.n_features, n_outputs)
        self.apply(_init_like_original)

    def first_conv_parameters(self) -> list[nn.Parameter]:
        """Parameters the original L2-penalises (coefficient :data:`FIRST_CONV_L2`)."""
        return [self.encoder.first_conv.weight]

    def forward(self, x: torch.Tensor, return_feats: bool = False) -> torch.Tensor:
        """Classify epochs ``(B, C, T)`` (or ``(B, T)``); ``return_feats`` gives ``(B, n_features)``."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        features = self.encoder(x)
        if return_feats:
            return features
        return self.classifier(features)


LSTMState = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""One ``(h, c)`` pair per direction (forward first), each ``(n_lstm_layers, B, hidden)``."""


class DeepSleepNet(nn.Module):
    """DeepSleepNet sequence model (Supratak et al., 2017).

    Representation learning (:class:`DeepFeatureEncoder`, applied to every epoch) followed by
    sequence residual learning: a bidirectional LSTM (2 layers, 512 units per direction) whose
    output is added to a shortcut ``relu(bn(fc(features)))`` (1024 units, no bias), then dropout
    and a linear softmax layer. As in the original, each direction is a separate 2-layer stack
    (the second backward layer sees only the first backward layer) and dropout 0.5 acts on the
    output of every LSTM layer.

    ``forward(x, state)`` returns the new LSTM state so it can be carried from one chunk of a
    night to the next and reset (``state=None``) between nights, as the original's trainer does
    (it feeds each direction's final state as the next chunk's initial state). For the forward
    direction this makes chunked processing equal to processing the whole night; the backward
    direction cannot be chunked exactly (it would need the future), so for a bidirectional model
    chunked and whole-night outputs differ, in the original as here. ``bidirectional=False``
    gives an exactly chunkable (online) model.

    Parameters
    ----------
    n_outputs : int
        Number of classes.
    n_chans : int
        Input channels.
    sfreq : float
        Sampling rate in Hz.
    n_times : int
        Samples per epoch.
    n_lstm_layers : int
        LSTM layers per direction (2).
    lstm_hidden : int
        Units per direction (512).
    dropout : float
        Dropout of the sequence part (0.5).
    feature_dropout : float
        Dropout of the CNNs (0.5).
    bidirectional : bool
        Backward LSTM stack as in the paper (True).

    Notes
    -----
    Training facts from ``akaraspt/deepsleepnet``: fine-tuning 200 epochs, batch 10 sequences of
    25 epochs; each batch row walks through one part of a night with the state carried between
    successive chunks and reset per night; Adam with lr 1e-6 for the pre-trained CNN
    (:meth:`feature_net_parameters`) and 1e-4 for the rest (:meth:`sequence_parameters`), gradient
    clipping to global norm 10; loss = summed cross-entropy / batch size + L2
    ``FIRST_CONV_L2 * ||w||^2 / 2`` on :meth:`first_conv_parameters`; no oversampling.

    Implementation differences
    --------------------------
    * PyTorch's LSTM has no peephole connections; the original's TF ``LSTMCell`` uses them
      (``use_peepholes=True``), so each cell here has ``3 * 512`` fewer weights.
    * TF's constant ``forget_bias=1`` is folded into a learnable forget-gate bias initialised to 1
      (same function).
    * PyTorch batch norm keeps the unbiased running variance (TF the biased one).

    References
    ----------
    A. Supratak, H. Dong, C. Wu and Y. Guo, "DeepSleepNet: A Model for Automatic Sleep Stage
    Scoring Based on Raw Single-Channel EEG", IEEE Trans. Neural Syst. Rehabil. Eng.
    25(11):1998-2008, 2017, doi:10.1109/TNSRE.2017.2721116.
    Reference code: https://github.com/akaraspt/deepsleepnet (``deepsleep/model.py``).
    """

    def __init__(self, n_outputs: int = 5, n_chans: int = 1, sfreq: float = 100.0,
                 n_times: int = 3000, *, n_lstm_layers: int = 2, lstm_hidden: int = 512,
                 dropout: float = 0.5, feature_dropout: float = 0.5, bidirectional: bool = True):
        super().__init__()
        self.n_outputs = n_outputs
        self.n_chans = n_chans
        self.sfreq = float(sfreq)
        self.n_times = n_times
        self.bidirectional = bidirectional
        self.feature_encoder = DeepFeatureEncoder(n_chans, sfreq, n_times, feature_dropout)
        n_features = self.feature_encoder.n_features
        self.n_hidden_out = lstm_hidden * (2 if bidirectional else 1)

        self.shortcut = nn.Sequential(
            nn.Linear(n_features, self.n_hidden_out, bias=False),
            nn.BatchNorm1d(self.n_hidden_out, eps=_BN_EPS, momentum=_BN_MOMENTUM),
            nn.ReLU(),
        )
        lstm_dropout = dropout if n_lstm_layers > 1 else 0.0
        self.lstm_forward = nn.LSTM(n_features, lstm_hidden, n_lstm_layers, batch_first=True,
                                    dropout=lstm_dropout)
        self.lstm_backward = (nn.LSTM(n_features, lstm_hidden, n_lstm_layers, batch_first=True,
                                      dropout=lstm_dropout) if bidirectional else None)
        # nn.LSTM drops out between layers only; the original also drops the last layer's output.
        self.lstm_output_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.n_hidden_out, n_outputs)
        self.apply(_init_like_original)

    @classmethod
    def from_feature_net(cls, feature_net: DeepFeatureNet, **kwargs) -> "DeepSleepNet":
        """Build a sequence model whose CNNs are copies of a pre-trained :class:`DeepFeatureNet`.

        Parameters
        ----------
        feature_net : DeepFeatureNet
            The pre-trained epoch model (its softmax layer is not used).
        **kwargs
            Sequence hyper-parameters (``n_lstm_layers``, ``lstm_hidden``, ...).
        """
        model = cls(n_outputs=feature_net.n_outputs, n_chans=feature_net.n_chans,
                    sfreq=feature_net.sfreq, n_times=feature_net.n_times, **kwargs)
        model.load_feature_net(feature_net)
        return model

    def load_feature_net(self, feature_net: DeepFeatureNet) -> None:
        """Copy the CNN weights (and batch-norm statistics) of a pre-trained feature net."""
        self.feature_encoder.load_state_dict(feature_net.encoder.state_dict())

    def feature_net_parameters(self) -> list[nn.Parameter]:
        """Pre-trained CNN parameters (fine-tuned with lr 1e-6 in the original)."""
        return list(self.feature_encoder.parameters())

    def sequence_parameters(self) -> list[nn.Parameter]:
        """Parameters not in the pre-trained CNN (lr 1e-4 in the original)."""
        cnn = {id(p) for p in self.feature_encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in cnn]

    def first_conv_parameters(self) -> list[nn.Parameter]:
        """Parameters the original L2-penalises (coefficient :data:`FIRST_CONV_L2`)."""
        return [self.feature_encoder.first_conv.weight]

    def forward(self, x: torch.Tensor, state: LSTMState | None = None,
                return_feats: bool = False) -> tuple[torch.Tensor, LSTMState]:
        """Score sequences of epochs.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, L, C, T)``, or ``(B, L, T)`` for one channel: ``B`` sequences of ``L``
            consecutive epochs.
        state : tuple, optional
            LSTM state returned by the previous call for the preceding chunk of the same
            nights; None starts from zeros (new nights).
        return_feats : bool
            Return the ``(B, L, n_hidden_out)`` features before the softmax layer.

        Returns
        -------
        logits : torch.Tensor
            ``(B, L, n_outputs)`` (or features with ``return_feats``).
        new_state : tuple
            ``((h, c),)`` per direction; pass it (detached, if training with truncated
            back-propagation) with the next chunk.
        """
        if x.dim() == 3:
            x = x.unsqueeze(2)
        batch, seq_len = x.shape[:2]
        features = self.feature_encoder(x.reshape(batch * seq_len, *x.shape[2:]))
        shortcut = self.shortcut(features).reshape(batch, seq_len, -1)
        sequence = features.reshape(batch, seq_len, -1)

        forward_state = state[0] if state is not None else None
        forward_out, forward_new = self.lstm_forward(sequence, forward_state)
        outputs, new_state = [forward_out], [forward_new]
        if self.lstm_backward is not None:
            backward_state = state[1] if state is not None else None
            backward_out, backward_new = self.lstm_backward(sequence.flip(1), backward_state)
            outputs.append(backward_out.flip(1))
            new_state.append(backward_new)
        recurrent = self.lstm_output_dropout(torch.cat(outputs, dim=-1))
        hidden = self.dropout(recurrent + shortcut)
        if return_feats:
            return hidden, tuple(new_state)
        return self.classifier(hidden), tuple(new_state)
