"""Probe: K ordinary fold models, each step on its own CUDA stream, all captured in one CUDA graph.

An alternative to stacking folds into one network (grouped convolutions, which cuDNN serves by
slicing the channels group by group): each fold keeps plain convolutions, and concurrency comes
from running the K folds' kernels side by side. Prints milliseconds per step of all K folds for
eager and ``torch.compile``-d fold models, to compare with ``train_speed.py``'s batched engine
(its seconds per fold-epoch / steps per epoch * K). Training steps only, synthetic batches.

    python3 benchmarks/multistream_probe.py --folds 20 --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sleeplib.models import build_model  # noqa: E402


def probe(K: int, B: int, compile: bool, streams: bool, reps: int = 30) -> float:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    models = [build_model("attnsleep").to(dev) for _ in range(K)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-3, amsgrad=True, fused=True, capturable=True)
            for m in models]
    fwd = [torch.compile(m, dynamic=False) if compile else m for m in models]
    xs = [torch.randn(B, 1, 3000, device=dev) * 20 for _ in range(K)]
    ys = [torch.randint(0, 5, (B,), device=dev) for _ in range(K)]

    def fold_step(k):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(fwd[k](xs[k]).float(), ys[k])
        loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for k in range(K):
                fold_step(k)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    fold_streams = [torch.cuda.Stream() for _ in range(K)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        main = torch.cuda.current_stream()
        for k in range(K):
            if streams:
                fold_streams[k].wait_stream(main)
                with torch.cuda.stream(fold_streams[k]):
                    fold_step(k)
            else:
                fold_step(k)
        if streams:
            for s in fold_streams:
                main.wait_stream(s)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    results = {}
    for compile in (False, True):
        for streams in (False, True):
            key = f"compile={compile},streams={streams}"
            try:
                results[key] = probe(args.folds, args.batch, compile, streams)
                print(f"{key}: {results[key]:.2f} ms per step of {args.folds} folds", flush=True)
            except Exception as err:  # a probe: report and go on
                results[key] = repr(err)
                print(f"{key}: failed: {err!r}"[:500], flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "multistream.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
