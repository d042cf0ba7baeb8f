"""Sequence training of DeepSleepNet and SleepEEGNet (track F): batching, losses, balancing, recipes.

All data here are random or hand-made (synthetic); models run at 32 Hz (960-sample epochs) so the
end-to-end runs take seconds on two CPU cores.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sleeplib.data.dataset import Night, SleepNights
from sleeplib.train import trainer as engine
from sleeplib.train.batching import ArraySet
from sleeplib.train.losses import get_seq_loss, mfe_loss, msfe_loss, summed_sequence_ce
from sleeplib.train.recipes_seq import (
    DEEPSLEEPNET_FINETUNE,
    DEEPSLEEPNET_PRETRAIN,
    SLEEPEEGNET,
    cv_summary,
    load_seq_predictions,
    run_ablation,
    run_seq_cv,
    seq_splits,
)
from sleeplib.train.sequence import (
    NightSequenceBatcher,
    Seq2SeqBatcher,
    balanced_oversample_indices,
    sleepeegnet_training_set,
)

SFREQ, N_TIMES = 32.0, 960


def _indexed_set(lengths) -> ArraySet:
    """Epoch ``i`` carries its global index in ``x[i, 0, 0]`` and label ``i % 5``."""
    n = sum(lengths)
    x = torch.zeros(n, 1, 4)
    x[:, 0, 0] = torch.arange(n, dtype=torch.float32)
    night = np.concatenate([np.full(m, k) for k, m in enumerate(lengths)])
    return ArraySet.from_arrays(x, np.arange(n) % 5, night)


def _cohort(n_subjects=3, n_nights=1, n_epochs=40, seed=0) -> SleepNights:
    rng = np.random.default_rng(seed)
    nights = []
    for s in range(n_subjects):
        for k in range(1, n_nights + 1):
            y = np.repeat(rng.integers(0, 5, size=-(-n_epochs // 4)), 4)[:n_epochs]
            y[:5] = np.arange(5)  # every stage present
            x = rng.normal(size=(n_epochs, N_TIMES)).astype(np.float32) * (1 + y[:, None])
            nights.append(Night(x=x, y=y.astype(np.int64), subject=s, night=k, record=f"SYN{s:02d}{k}",
                                fs=SFREQ, channels=("SYNTHETIC",), synthetic=True))
    return SleepNights(nights)


# ------------------------------------------------------------------ losses


def test_mfe_and_msfe_by_hand():
    # Softmax rows chosen so the cross-entropies are logs of small integers.
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.5, 0.25, 0.25],
                          [0.25, 0.25, 0.5], [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])
    logits = probs.log()
    target = torch.tensor([0, 0, 1, 2, 2, 1])
    ln2, ln4 = math.log(2), math.log(4)
    ce = [ln2, ln4, ln4, ln2, ln4, ln2]  # -log p[target] per epoch
    # Pooled over the batch: class 0 -> (ln2 + ln4)/2, class 1 -> (ln4 + ln2)/2, class 2 -> (ln2 + ln4)/2
    class_means = [(ce[0] + ce[1]) / 2, (ce[2] + ce[5]) / 2, (ce[3] + ce[4]) / 2]
    assert float(mfe_loss(logits, target)) == pytest.approx(sum(class_means), rel=1e-6)
    assert float(msfe_loss(logits, target)) == pytest.approx(sum(m * m for m in class_means), rel=1e-6)
    # Per sequence of 3 (the released code): seq1 = [0, 0, 1], seq2 = [2, 2, 1]
    seq1 = (ce[0] + ce[1]) / 2 + ce[2]
    seq2 = (ce[3] + ce[4]) / 2 + ce[5]
    assert float(get_seq_loss("mfe", 3)(logits, target)) == pytest.approx((seq1 + seq2) / 2, rel=1e-6)
    msfe_seq = (((ce[0] + ce[1]) / 2) ** 2 + ce[2] ** 2 + ((ce[3] + ce[4]) / 2) ** 2 + ce[5] ** 2) / 2
    assert float(get_seq_loss("msfe", 3)(logits, target)) == pytest.approx(msfe_seq, rel=1e-6)
    # DeepSleepNet's fine-tuning loss is L times the mean cross-entropy
    assert float(summed_sequence_ce(3)(logits, target)) == pytest.approx(3 * sum(ce) / 6, rel=1e-6)


def test_mfe_balances_classes_unlike_ce():
    # one rare, badly classified epoch weighs as much as the whole frequent class under MFE
    logits = torch.tensor([[4.0, 0.0]] * 9 + [[4.0, 0.0]])
    target = torch.tensor([0] * 9 + [1])
    ce_rare = float(nn.functional.cross_entropy(logits[-1:], target[-1:]))
    ce_mean = float(nn.functional.cross_entropy(logits, target))
    assert float(mfe_loss(logits, target)) > 5 * ce_mean
    assert float(mfe_loss(logits, target)) == pytest.approx(ce_rare + float(
        nn.functional.cross_entropy(logits[:1], target[:1])), rel=1e-6)


def test_unknown_loss_lists_known():
    with pytest.raises(KeyError, match="mfe"):
        get_seq_loss("focal")
    with pytest.raises(ValueError, match="seq_length"):
        get_seq_loss("mfe")


# ------------------------------------------------------------------ balancing


def test_balanced_oversampling_keeps_every_original_epoch():
    y = np.array([0] * 5 + [1] * 2 + [2] * 9 + [3] * 1 + [4] * 3)
    idx = balanced_oversample_indices(y, seed=3)
    assert set(range(len(y))) <= set(idx.tolist())
    assert np.bincount(y[idx]).tolist() == [9, 9, 9, 9, 9]
    # class 1: each of its 2 epochs repeated 9 // 2 = 4 times, plus 1 distinct top-up
    counts = np.bincount(idx, minlength=len(y))
    assert sorted(counts[5:7].tolist()) == [4, 5]
    assert counts[16] == 9  # the single N3 epoch replicated 9 times


def test_sleepeegnet_training_set_smote_layout():
    data = _indexed_set([23, 31])
    data = ArraySet(torch.randn(len(data), 1, 8), data.y, data.night)
    out, summary = sleepeegnet_training_set(data, seq_length=5, scheme="edf-2013", seed=1)
    n_orig = len(data) // 5 * 5
    # original epochs come first, unchanged and in order
    assert torch.equal(out.x[:n_orig], data.x[:n_orig])
    assert torch.equal(out.y[:n_orig], data.y[:n_orig])
    assert len(out) % 5 == 0 and summary["n_sequences"] == len(out) // 5
    # few N2 epochs (<= 7000): every class raised to the N2 count, noted
    assert "N2" in summary["note"]
    after = np.bincount(out.y.numpy(), minlength=5)
    assert after.max() - after.min() <= 5  # balanced up to the dropped remainder
    # synthetic epochs lie between two epochs of their class
    assert torch.isfinite(out.x).all()


# ------------------------------------------------------------------ batchers


def test_night_sequence_batches_are_contiguous_rows_with_resets():
    data = _indexed_set([23, 31])
    batches = list(NightSequenceBatcher(seq_length=5).train_batches(data, 2, torch.Generator()))
    # night 0: rows of 23 // 2 = 11 epochs, 2 chunks; night 1: rows of 15, 3 chunks
    assert [b.reset for b in batches] == [True, False, True, False, False]
    first = batches[0].x[:, :, 0, 0]
    assert first.tolist() == [[0, 1, 2, 3, 4], [11, 12, 13, 14, 15]]
    assert batches[1].x[:, :, 0, 0].tolist() == [[5, 6, 7, 8, 9], [16, 17, 18, 19, 20]]
    assert batches[2].x[:, :, 0, 0].tolist()[1][0] == 23 + 15
    assert batches[0].x.shape == (2, 5, 1, 4) and batches[0].y.shape == (2, 5)


def test_state_is_reset_at_each_night_and_carried_within(monkeypatch):
    from sleeplib.models.deepsleepnet import DeepSleepNet

    received = []

    class Spy(DeepSleepNet):
        def forward(self, x, state=None, return_feats=False):
            received.append(None if state is None else float(state[0][0].abs().sum()))
            return super().forward(x, state, return_feats)

    torch.manual_seed(0)
    model = Spy(sfreq=SFREQ, n_times=N_TIMES, lstm_hidden=8, n_lstm_layers=1)
    lengths = [23, 31]
    data = ArraySet.from_arrays(torch.randn(sum(lengths), 1, N_TIMES), np.arange(sum(lengths)) % 5,
                                np.repeat([0, 1], lengths))
    batcher = NightSequenceBatcher(seq_length=5)
    config = DEEPSLEEPNET_FINETUNE.replace(epochs=1, batch_size=2, seq_length=5)
    engine.fit(model, data, None, config=config, batcher=batcher, loss_fn=get_seq_loss("summed_ce", 5))
    resets = [b.reset for b in batcher.train_batches(data, 2, torch.Generator())]
    assert len(received) == len(resets) == 5
    for got, reset in zip(received, resets):
        if reset:
            assert got is None  # a night starts from the zero state
        else:
            assert got is not None and got > 0  # the previous chunk's state is carried
    # None is the zero state
    model.eval()
    x = torch.randn(2, 5, 1, N_TIMES)
    zeros = tuple((torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)) for _ in range(2))
    assert torch.allclose(model(x, None)[0], model(x, zeros)[0], atol=1e-6)


class _EchoSeqModel(nn.Module):
    """Predicts the label stored in ``x[..., 0, 0]``; records whether it was given targets."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, targets=None, teacher_forcing=True):
        self.calls.append(targets is not None and teacher_forcing)
        return nn.functional.one_hot(x[..., 0, 0].long(), 5).float() * 10 + self.w


def test_seq2seq_eval_scores_every_epoch_once_in_order():
    lengths = [23, 7, 30]
    data = _indexed_set(lengths)
    data.x[:, 0, 0] = data.y.float()
    model = _EchoSeqModel()
    batcher = Seq2SeqBatcher(seq_length=10)
    probs = engine.predict(model, data, batch_size=4, batcher=batcher)
    assert probs.shape == (len(data), 5)
    assert np.array_equal(probs.argmax(1), data.y.numpy())
    assert not any(model.calls)  # evaluation decodes freely
    train_batch = next(batcher.train_batches(data, 2, torch.Generator().manual_seed(0)))
    assert train_batch.x.shape == (2, 10, 1, 4)
    model.train()
    batcher.forward(model, train_batch)
    assert model.calls[-1] is True  # teacher forcing in training
    Seq2SeqBatcher(10, teacher_forcing=False).forward(model, train_batch)
    assert model.calls[-1] is False


# ------------------------------------------------------------------ recipes and protocols


def test_recipe_numbers_and_optimizer_groups():
    from sleeplib.models.deepsleepnet import DeepSleepNet

    assert (DEEPSLEEPNET_PRETRAIN.lr, DEEPSLEEPNET_PRETRAIN.batch_size, DEEPSLEEPNET_PRETRAIN.epochs) == (1e-4, 100, 100)
    assert (DEEPSLEEPNET_FINETUNE.batch_size, DEEPSLEEPNET_FINETUNE.seq_length, DEEPSLEEPNET_FINETUNE.epochs) == (10, 25, 200)
    assert DEEPSLEEPNET_FINETUNE.grad_clip == 10.0
    assert (SLEEPEEGNET.optimizer, SLEEPEEGNET.lr, SLEEPEEGNET.batch_size, SLEEPEEGNET.epochs,
            SLEEPEEGNET.seq_length) == ("rmsprop", 1e-3, 20, 120, 10)
    model = DeepSleepNet(sfreq=SFREQ, n_times=N_TIMES, lstm_hidden=8, n_lstm_layers=1)
    opt = engine.build_optimizer(model, DEEPSLEEPNET_FINETUNE)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.first_conv_parameters()[0])] == (1e-6, 1e-3)
    assert all(by_param[id(p)][0] == 1e-6 for p in model.feature_net_parameters())
    assert all(by_param[id(p)] == (1e-4, 0.0) for p in model.sequence_parameters())
    rms = engine.build_optimizer(model, SLEEPEEGNET)
    assert isinstance(rms, torch.optim.RMSprop)
    assert (rms.defaults["alpha"], rms.defaults["eps"]) == (0.9, 1e-10)  # TensorFlow's RMSProp defaults
    decay = {id(p): g["weight_decay"] for g in rms.param_groups for p in g["params"]}
    assert all(decay[id(p)] == 0.0 for n, p in model.named_parameters() if "bias" in n)


def test_splits_paper_vs_clean():
    cohort = _cohort(n_subjects=4, n_nights=2, n_epochs=12)
    paper = seq_splits(cohort, "sleepeegnet", "paper", n_folds=4, seed=0)
    assert all(np.array_equal(f.select, f.test) for f in paper)  # selection on the test fold
    assert sorted(np.concatenate([f.test for f in paper]).tolist()) == list(range(8))
    clean = seq_splits(cohort, "sleepeegnet", "clean", n_folds=4, seed=0)
    subj = np.array([n.subject for n in cohort])
    for f in clean:
        sets = [set(subj[f.train]), set(subj[f.select]), set(subj[f.test])]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    dsn = seq_splits(cohort, "deepsleepnet", "paper")
    assert [sorted(set(subj[f.test])) for f in dsn] == [[0], [1], [2], [3]]
    assert all(f.select is None for f in dsn)  # last epoch, no selection


def test_deepsleepnet_recipe_end_to_end(tmp_path):
    cohort = _cohort(n_subjects=3, n_epochs=30)
    pre = DEEPSLEEPNET_PRETRAIN.replace(epochs=1, batch_size=32)
    fin = DEEPSLEEPNET_FINETUNE.replace(epochs=1, batch_size=2, seq_length=5)
    res = run_seq_cv(cohort, "deepsleepnet", protocol="paper", max_folds=1, config=fin, pretrain=pre,
                     model_kw={"lstm_hidden": 8, "n_lstm_layers": 1}, out_dir=tmp_path)
    pred = res["predictions"]
    assert len(pred) == 30 and set(pred["subject"]) == {0}
    assert res["folds"][0]["histories"]["finetune"]["epoch"].tolist() == [1]
    assert np.isfinite(res["folds"][0]["histories"]["pretrain"]["train_loss"]).all()
    assert (tmp_path / "fold00" / "finetune" / "checkpoint.pt").exists()
    assert 0.0 <= cv_summary(res)["pooled"]["accuracy"] <= 1.0


def test_sleepeegnet_recipe_end_to_end_resume_and_ablation(tmp_path):
    cohort = _cohort(n_subjects=3, n_epochs=30)
    cfg = SLEEPEEGNET.replace(epochs=3, select_every=1, batch_size=4, seq_length=5, eval_batch_size=8)
    kw = {"lstm_hidden": 8, "bidirectional": False}
    res = run_seq_cv(cohort, "sleepeegnet", protocol="clean", max_folds=1, config=cfg, model_kw=kw, sfreq=SFREQ,
                     out_dir=tmp_path)
    hist = res["folds"][0]["histories"]["train"]
    assert hist["select_macro_f1"].notna().all() and res["folds"][0]["best_epoch"] in (1, 2, 3)
    assert len(res["predictions"]) == 30
    # a finished run is reloaded, not retrained, and keeps the checkpoint it had selected
    again = run_seq_cv(cohort, "sleepeegnet", protocol="clean", max_folds=1, config=cfg, model_kw=kw, sfreq=SFREQ,
                       out_dir=tmp_path)
    assert again["folds"][0]["best_epoch"] == res["folds"][0]["best_epoch"]
    assert (again["predictions"]["y_pred"] == res["predictions"]["y_pred"]).all()
    # the saved predictions recompute the tables without any model
    saved = load_seq_predictions(tmp_path)
    pd.testing.assert_frame_equal(saved, res["predictions"], check_dtype=False)
    assert cv_summary({"predictions": saved})["pooled"] == cv_summary(res)["pooled"]
    table = run_ablation(cohort, "sleepeegnet", {"base": {}, "free running": {"teacher_forcing": False}},
                         config=cfg.replace(epochs=1), protocol="clean", max_folds=1, model_kw=kw)
    assert list(table.index) == ["base", "free running"] and (table["n_epochs"] == 30).all()


def test_time_block_on_one_night():
    cohort = _cohort(n_subjects=1, n_epochs=60)
    folds = seq_splits(cohort, "sleepeegnet", "time-block", n_folds=3)
    assert "NOT comparable" in folds[0].label
    with pytest.raises(ValueError, match="time-block"):
        seq_splits(cohort, "deepsleepnet", "paper")
