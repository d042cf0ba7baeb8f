"""SleepEEGNet (Mousavi, Afghah and Acharya, 2019): CNN + sequence-to-sequence LSTM with attention."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import init_lstm_tf_style
from .deepsleepnet import DeepFeatureEncoder

__all__ = ["SleepEEGNet"]


def _init_tf_defaults(module: nn.Module) -> None:
    # TF1 layers default to Glorot-uniform kernels and zero biases.
    if isinstance(module, (nn.Conv1d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LSTM, nn.LSTMCell)):
        init_lstm_tf_style(module)


class SleepEEGNet(nn.Module):
    """Sequence-to-sequence sleep stager of Mousavi, Afghah and Acharya (2019).

    Every 30-s epoch of a sequence of ``L`` (10) epochs goes through the two-branch CNN of
    DeepSleepNet (``akara2017=True`` in the reference code: the same filters, strides, pools and
    dropout 0.5 as :class:`~sleeplib.models.deepsleepnet.DeepFeatureEncoder`, but biased
    convolutions and no batch norm), giving 3072 features per epoch at 100 Hz. An LSTM encoder
    (2 layers of 128 units, bidirectional by default) reads the sequence; an LSTM decoder
    (2 layers of 128, or 256 when the encoder is bidirectional) initialised with the encoder's
    final states emits one stage per epoch, attending over the encoder outputs with Luong
    (multiplicative, "general") attention, as ``tf.contrib.seq2seq.LuongAttention`` +
    ``AttentionWrapper`` in the code:

    * keys = ``W_m`` encoder outputs (no bias); score = ``h_t . key_s``; softmax over ``s``;
    * context = weighted sum of the encoder outputs;
    * attention vector ``a_t = W_a [h_t; context]`` (64 units, no bias, no non-linearity);
    * logits = ``W_o a_t`` (no bias);
    * input feeding: the decoder input at ``t`` is ``[embed(token_{t-1}); a_{t-1}]`` with
      ``a_{-1} = 0`` and a 10-dimensional label embedding initialised U(-1, 1).

    With teacher forcing ``token_{t-1}`` is the true label of epoch ``t-1`` (a start token at
    ``t=0``); free-running uses the argmax of the decoder's own previous logits (greedy decoding,
    as the code's ``GreedyEmbeddingHelper`` at test time).

    Parameters
    ----------
    n_outputs : int
        Number of classes.
    n_chans : int
        Input channels (1 in the paper).
    sfreq : float
        Sampling rate in Hz (CNN filter sizes depend on it as in DeepSleepNet).
    n_times : int
        Samples per epoch.
    n_lstm_layers : int
        Layers of the encoder and of the decoder (2).
    lstm_hidden : int
        Units per encoder direction (128).
    bidirectional : bool
        Bidirectional encoder (the paper; the released script's default is False).
    embed_size : int
        Size of the label embedding (10).
    attention_size : int
        Size of the attention vector (64).
    dropout : float
        Dropout of the CNN (0.5 while training).

    Notes
    -----
    Training facts from ``seq2seq_sleep_sleep-EDF.py`` of the reference code: sequences of
    ``max_time_step = 10`` epochs; batch 20; 120 epochs; RMSProp, lr 1e-3; evaluation every 5
    epochs, keeping the checkpoint with the best macro-F1 on the held-out fold; loss = sum over
    classes of that class's mean cross-entropy over the positions labelled with it (averaged over
    time per sequence, then over the batch) - the "MFE" (mean false error) loss of the paper, whose
    alternative "MSFE" is the sum of the squared per-class mean errors - plus
    ``0.001 * sum(||w||^2 / 2)`` over every non-bias trainable variable; training epochs are
    class-balanced with SMOTE before being cut into sequences (Sleep-EDF 2013: every class except
    N2 raised to ``n_N2 - 7000`` epochs; 2018: W and N2 first undersampled to 35000, the others
    oversampled to 30000), so training sequences are not contiguous nights.

    Implementation differences
    --------------------------
    * The code's label vocabulary also has start and end tokens and its decoder runs
      ``L + 1`` steps, the last one predicting the end token, with a 7-unit output layer. Here
      the decoder runs ``L`` steps and the output layer has ``n_outputs`` units; the start token
      is row ``n_outputs`` of the embedding.
    * The code's bidirectional encoder is used only when ``bidirectional=True`` is set; its
      released default is a unidirectional encoder (and a 128-unit decoder).
    * TF's constant ``forget_bias=1`` is folded into a learnable forget-gate bias initialised to 1.

    References
    ----------
    S. Mousavi, F. Afghah and U. R. Acharya, "SleepEEGNet: Automated sleep stage scoring with
    sequence to sequence deep learning approach", PLoS ONE 14(5):e0216456, 2019,
    doi:10.1371/journal.pone.0216456.
    Reference code: https://github.com/SajadMo/SleepEEGNet (``seq2seq_sleep_sleep-EDF.py``).
    """

    def __init__(self, n_outputs: int = 5, n_chans: int = 1, sfreq: float = 100.0,
                 n_times: int = 3000, *, n_lstm_layers: int = 2, lstm_hidden: int = 128,
                 bidirectional: bool = True, embed_size: int = 10, attention_size: int = 64,
                 dropout: float = 0.5):
        super().__init__()
        self.n_outputs = n_outputs
        self.n_chans = n_chans
        self.sfreq = float(sfreq)
        self.n_times = n_times
        self.bidirectional = bidirectional
        self.start_token = n_outputs

        self.feature_encoder = DeepFeatureEncoder(n_chans, sfreq, n_times, dropout, batch_norm=False)
        n_features = self.feature_encoder.n_features
        self.encoder_forward = nn.LSTM(n_features, lstm_hidden, n_lstm_layers, batch_first=True)
        self.encoder_backward = (nn.LSTM(n_features, lstm_hidden, n_lstm_layers, batch_first=True)
                                 if bidirectional else None)
        memory_size = lstm_hidden * (2 if bidirectional else 1)
        decoder_hidden = memory_size  # the decoder starts from the (concatenated) encoder states

        self.label_embedding = nn.Embedding(n_outputs + 1, embed_size)
        self.decoder_cells = nn.ModuleList(
            [nn.LSTMCell(embed_size + attention_size if layer == 0 else decoder_hidden, decoder_hidden)
             for layer in range(n_lstm_layers)])
        self.memory_layer = nn.Linear(memory_size, decoder_hidden, bias=False)
        self.attention_layer = nn.Linear(decoder_hidden + memory_size, attention_size, bias=False)
        self.output_layer = nn.Linear(attention_size, n_outputs, bias=False)
        self.attention_size = attention_size

        self.apply(_init_tf_defaults)
        nn.init.uniform_(self.label_embedding.weight, -1.0, 1.0)

    def _encode(self, x: torch.Tensor):
        batch, seq_len = x.shape[:2]
        features = self.feature_encoder(x.reshape(batch * seq_len, *x.shape[2:]))
        sequence = features.reshape(batch, seq_len, -1)
        memory, (h_n, c_n) = self.encoder_forward(sequence)
        if self.encoder_backward is not None:
            backward_out, (h_b, c_b) = self.encoder_backward(sequence.flip(1))
            memory = torch.cat([memory, backward_out.flip(1)], dim=-1)
            h_n = torch.cat([h_n, h_b], dim=-1)
            c_n = torch.cat([c_n, c_b], dim=-1)
        return memory, h_n, c_n

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                teacher_forcing: bool = True, return_feats: bool = False) -> torch.Tensor:
        """Score sequences of epochs.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, L, C, T)``, or ``(B, L, T)`` for one channel.
        targets : torch.Tensor, optional
            True labels ``(B, L)`` (int64), used for teacher forcing.
        teacher_forcing : bool
            Feed the true previous label to the decoder (training). Used only when ``targets``
            is given; otherwise (or with False) the decoder feeds back its own argmax.
        return_feats : bool
            Return the attention vectors ``(B, L, attention_size)`` instead of logits.

        Returns
        -------
        torch.Tensor
            Logits ``(B, L, n_outputs)``.
        """
        if x.dim() == 3:
            x = x.unsqueeze(2)
        batch, seq_len = x.shape[:2]
        memory, h_n, c_n = self._encode(x)
        keys = self.memory_layer(memory)
        hidden = list(h_n.unbind(0))
        cell = list(c_n.unbind(0))
        attention = memory.new_zeros(batch, self.attention_size)
        previous = torch.full((batch,), self.start_token, dtype=torch.long, device=x.device)
        use_targets = teacher_forcing and targets is not None

        step_logits, step_attention = [], []
        for t in range(seq_len):
            layer_input = torch.cat([self.label_embedding(previous), attention], dim=-1)
            for layer, lstm_cell in enumerate(self.decoder_cells):
                hidden[layer], cell[layer] = lstm_cell(layer_input, (hidden[layer], cell[layer]))
                layer_input = hidden[layer]
            scores = torch.bmm(keys, layer_input.unsqueeze(-1)).squeeze(-1)
            alignments = torch.softmax(scores, dim=-1)
            context = torch.bmm(alignments.unsqueeze(1), memory).squeeze(1)
            attention = self.attention_layer(torch.cat([layer_input, context], dim=-1))
            logits = self.output_layer(attention)
            step_logits.append(logits)
            step_attention.append(attention)
            previous = targets[:, t] if use_targets else logits.argmax(dim=-1)
        if return_feats:
            return torch.stack(step_attention, dim=1)
        return torch.stack(step_logits, dim=1)
