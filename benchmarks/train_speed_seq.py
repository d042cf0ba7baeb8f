"""Seconds per fold-epoch of the sequence models' training, engine vs a naive loop, same run.

For each model the same random cohort (labelled SYNTHETIC timing data) is trained for a few epochs

* ``engine``: :func:`sleeplib.train.trainer.fit` with the sequence batchers of
  :mod:`sleeplib.train.sequence`, the data moved to the device once (``ArraySet.to``), so a batch is
  an index gather on the device;
* ``naive``: a direct port of the original training loops (akaraspt/deepsleepnet
  ``DeepSleepNetTrainer._run_epoch``, SleepEEGNet ``batch_data``): batches assembled in NumPy on the
  host every step and copied to the device, as a TF ``feed_dict`` does.

Both run the same model, optimiser, loss and batch layout, so the difference is the data path and
loop overhead. DeepSleepNet is timed on its fine-tuning step (state carried along each night),
SleepEEGNet on its training epochs (teacher forcing). Prints one JSON object per model and a summary
table; ``--out`` also writes them to a file.

CPU here with tiny sizes, e.g.::

    python benchmarks/train_speed_seq.py --nights 2 --epochs-per-night 260 --lstm-hidden 16 --lstm-hidden-seg 16 --epochs 1

On a CUDA GPU with the papers' sizes (the lead runs this)::

    python benchmarks/train_speed_seq.py --device cuda --nights 20 --epochs-per-night 1000 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sleeplib.train import trainer as engine  # noqa: E402
from sleeplib.train.batching import ArraySet  # noqa: E402
from sleeplib.train.losses import get_seq_loss  # noqa: E402
from sleeplib.train.recipes_seq import DEEPSLEEPNET_FINETUNE, SLEEPEEGNET  # noqa: E402
from sleeplib.train.sequence import NightSequenceBatcher, Seq2SeqBatcher, detach_state, night_bounds  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_cohort(n_nights: int, epochs_per_night: int, n_times: int, seed: int = 0) -> ArraySet:
    """Random epochs with random labels (SYNTHETIC timing data, never a result)."""
    rng = np.random.default_rng(seed)
    n = n_nights * epochs_per_night
    x = rng.normal(size=(n, 1, n_times)).astype(np.float32)
    y = rng.integers(0, 5, size=n)
    night = np.repeat(np.arange(n_nights), epochs_per_night)
    return ArraySet.from_arrays(x, y, night)


def naive_deepsleepnet_epoch(model, x_np, y_np, bounds, optimizer, loss_fn, batch_size, seq_length, clip, device):
    """One fine-tuning epoch as the original: per night, NumPy batches, state fed back each chunk."""
    model.train()
    for start, stop in bounds:
        n = stop - start
        row = n // batch_size
        chunks = row // seq_length
        if chunks == 0:
            continue
        seq_x = np.stack([x_np[start + i * row : start + (i + 1) * row] for i in range(batch_size)])
        seq_y = np.stack([y_np[start + i * row : start + (i + 1) * row] for i in range(batch_size)])
        state = None
        for c in range(chunks):
            xb = torch.from_numpy(np.ascontiguousarray(seq_x[:, c * seq_length : (c + 1) * seq_length])).to(device)
            yb = torch.from_numpy(np.ascontiguousarray(seq_y[:, c * seq_length : (c + 1) * seq_length])).to(device)
            optimizer.zero_grad()
            logits, state = model(xb, state)
            state = detach_state(state)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            float(loss.detach())  # the original fetches the loss value every step


def naive_sleepeegnet_epoch(model, x_seq, y_seq, optimizer, loss_fn, batch_size, device, rng):
    """One epoch as their ``batch_data``: shuffled NumPy sequences, incomplete batch dropped."""
    model.train()
    order = rng.permutation(len(x_seq))
    for b in range(len(order) // batch_size):
        idx = order[b * batch_size : (b + 1) * batch_size]
        xb = torch.from_numpy(x_seq[idx]).to(device)
        yb = torch.from_numpy(y_seq[idx]).to(device)
        optimizer.zero_grad()
        logits = model(xb, targets=yb, teacher_forcing=True)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
        loss.backward()
        optimizer.step()
        float(loss.detach())


def bench_deepsleepnet(args, device) -> dict:
    from sleeplib.models.deepsleepnet import DeepSleepNet

    data = make_cohort(args.nights, args.epochs_per_night, int(30 * args.sfreq))
    config = DEEPSLEEPNET_FINETUNE.replace(epochs=args.epochs, batch_size=args.batch_size, seq_length=args.seq_length)
    loss_fn = get_seq_loss("summed_ce", args.seq_length)
    kw = dict(sfreq=args.sfreq, n_times=int(30 * args.sfreq), lstm_hidden=args.lstm_hidden,
              n_lstm_layers=args.lstm_layers)

    resident = data.to(device)
    # one untimed epoch of each loop first: lazy imports (the first optimiser imports torch._dynamo)
    # and cuDNN's algorithm search would otherwise be charged to whichever loop runs first
    engine.fit(DeepSleepNet(**kw), resident, None, config=config.replace(epochs=1),
               batcher=NightSequenceBatcher(args.seq_length), loss_fn=loss_fn, device=device)
    warm = DeepSleepNet(**kw).to(device)
    naive_deepsleepnet_epoch(warm, data.x.numpy(), data.y.numpy(), night_bounds(data.night),
                             engine.build_optimizer(warm, config), lambda a, b: loss_fn(a, b, None),
                             args.batch_size, args.seq_length, config.grad_clip, device)
    torch.manual_seed(0)
    model = DeepSleepNet(**kw)
    _sync(device)
    t0 = time.perf_counter()
    engine.fit(model, resident, None, config=config, batcher=NightSequenceBatcher(args.seq_length), loss_fn=loss_fn,
               device=device)
    _sync(device)
    engine_s = (time.perf_counter() - t0) / args.epochs

    torch.manual_seed(0)
    model = DeepSleepNet(**kw).to(device)
    optimizer = engine.build_optimizer(model, config)
    x_np, y_np = data.x.numpy(), data.y.numpy()
    bounds = night_bounds(data.night)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        naive_deepsleepnet_epoch(model, x_np, y_np, bounds, optimizer, lambda a, b: loss_fn(a, b, None),
                                 args.batch_size, args.seq_length, config.grad_clip, device)
    _sync(device)
    naive_s = (time.perf_counter() - t0) / args.epochs
    return {"model": "deepsleepnet (fine-tuning)", "engine_s_per_epoch": engine_s, "naive_s_per_epoch": naive_s,
            "n_epochs_data": len(data)}


def bench_sleepeegnet(args, device) -> dict:
    from sleeplib.models.sleepeegnet import SleepEEGNet

    L = args.seq_length_seg
    data = make_cohort(args.nights, args.epochs_per_night, int(30 * args.sfreq))
    n_seq = len(data) // L
    data = ArraySet(data.x[: n_seq * L], data.y[: n_seq * L], torch.arange(n_seq).repeat_interleave(L))
    config = SLEEPEEGNET.replace(epochs=args.epochs, batch_size=args.batch_size_seg, seq_length=L)
    loss_fn = get_seq_loss("mfe", L)
    kw = dict(sfreq=args.sfreq, n_times=int(30 * args.sfreq), lstm_hidden=args.lstm_hidden_seg)

    resident = data.to(device)
    # one untimed epoch of each loop first (lazy imports, cuDNN's algorithm search)
    engine.fit(SleepEEGNet(**kw), resident, None, config=config.replace(epochs=1), batcher=Seq2SeqBatcher(L),
               loss_fn=loss_fn, device=device)
    warm = SleepEEGNet(**kw).to(device)
    naive_sleepeegnet_epoch(warm, data.x.numpy().reshape(n_seq, L, *data.x.shape[1:]), data.y.numpy().reshape(n_seq, L),
                            engine.build_optimizer(warm, config), lambda a, b: loss_fn(a, b, None),
                            args.batch_size_seg, device, np.random.default_rng(1))
    torch.manual_seed(0)
    model = SleepEEGNet(**kw)
    _sync(device)
    t0 = time.perf_counter()
    engine.fit(model, resident, None, config=config, batcher=Seq2SeqBatcher(L), loss_fn=loss_fn, device=device)
    _sync(device)
    engine_s = (time.perf_counter() - t0) / args.epochs

    torch.manual_seed(0)
    model = SleepEEGNet(**kw).to(device)
    optimizer = engine.build_optimizer(model, config)
    x_seq = data.x.numpy().reshape(n_seq, L, *data.x.shape[1:])
    y_seq = data.y.numpy().reshape(n_seq, L)
    rng = np.random.default_rng(0)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        naive_sleepeegnet_epoch(model, x_seq, y_seq, optimizer, lambda a, b: loss_fn(a, b, None),
                                args.batch_size_seg, device, rng)
    _sync(device)
    naive_s = (time.perf_counter() - t0) / args.epochs
    return {"model": "sleepeegnet", "engine_s_per_epoch": engine_s, "naive_s_per_epoch": naive_s,
            "n_epochs_data": len(data)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["deepsleepnet", "sleepeegnet"])
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--epochs-per-night", type=int, default=100)
    parser.add_argument("--sfreq", type=float, default=100.0)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs timed per variant")
    parser.add_argument("--batch-size", type=int, default=10, help="DeepSleepNet rows per batch (paper 10)")
    parser.add_argument("--seq-length", type=int, default=25, help="DeepSleepNet chunk length (paper 25)")
    parser.add_argument("--lstm-hidden", type=int, default=512)
    parser.add_argument("--lstm-layers", type=int, default=2)
    parser.add_argument("--batch-size-seg", type=int, default=20, help="SleepEEGNet sequences per batch (code 20)")
    parser.add_argument("--seq-length-seg", type=int, default=10)
    parser.add_argument("--lstm-hidden-seg", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what fit() sets on CUDA; the naive loop gets it too
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "data": "SYNTHETIC random epochs (timing only)", "args": {k: str(v) for k, v in vars(args).items()}}
    rows = []
    for name in args.models:
        row = (bench_deepsleepnet if name == "deepsleepnet" else bench_sleepeegnet)(args, device)
        row["speedup"] = row["naive_s_per_epoch"] / row["engine_s_per_epoch"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'model':30s} {'engine s/epoch':>15s} {'naive s/epoch':>15s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r['model']:30s} {r['engine_s_per_epoch']:15.3f} {r['naive_s_per_epoch']:15.3f} {r['speedup']:9.2f}")
    if args.out:
        args.out.write_text(json.dumps({"env": env, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
