"""Which layout runs AttnSleep's convolutions fastest when K folds train at once?

Times forward + backward (input and weight gradients) of each MRCNN convolution for K fold models
side by side, batch 128 per fold, in several implementations:

* ``grouped1d``: ``conv1d`` on ``(B, K*C, L)`` with ``groups=K`` (what ``vmap`` produces);
* ``grouped2d_cl``: the same as a ``conv2d`` with height 1 in channels-last memory format;
* ``im2col_bmm``: unfold the input, one batched matrix product per layer (``(K, Cout, C*k)`` by
  ``(K, C*k, B*L)``);
* ``loop``: K ordinary convolutions one after another (the per-fold baseline).

Also profiles one step of the current vmap engine and prints its top CUDA kernels.
Run on a GPU: ``python benchmarks/conv_layouts.py``. Prints milliseconds per step.
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

# (name, C_in, C_out, kernel, stride, padding, L_in) for Sleep-EDF at 100 Hz, 3000 samples
LAYERS = [
    ("small.conv1", 1, 64, 50, 6, 24, 3000),
    ("small.conv2", 64, 128, 8, 1, 4, 251),
    ("small.conv3", 128, 128, 8, 1, 4, 252),
    ("large.conv1", 1, 64, 400, 50, 200, 3000),
    ("large.conv2", 64, 128, 7, 1, 3, 31),
    ("large.conv3", 128, 128, 7, 1, 3, 31),
]


def timeit(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def bench_layer(spec, K, B, dtype, dev):
    name, cin, cout, k, s, p, L = spec
    out = {}
    x = torch.randn(B, K * cin, L, device=dev, dtype=dtype, requires_grad=cin > 1)
    w = (torch.randn(K * cout, cin, k, device=dev, dtype=dtype) * 0.02).requires_grad_()

    def grouped1d():
        y = F.conv1d(x, w, stride=s, padding=p, groups=K)
        y.sum().backward()

    out["grouped1d"] = timeit(grouped1d)

    x4 = x.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last).requires_grad_(cin > 1)
    w4 = w.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last).requires_grad_()

    def grouped2d_cl():
        y = F.conv2d(x4, w4, stride=(1, s), padding=(0, p), groups=K)
        y.sum().backward()

    out["grouped2d_cl"] = timeit(grouped2d_cl)

    xf = torch.randn(K, B, cin, L, device=dev, dtype=dtype, requires_grad=cin > 1)
    wf = (torch.randn(K, cout, cin * k, device=dev, dtype=dtype) * 0.02).requires_grad_()

    def im2col_bmm():
        cols = F.pad(xf, (p, p)).unfold(-1, k, s)  # (K, B, C, L', k)
        Lo = cols.shape[3]
        cols = cols.permute(0, 2, 4, 1, 3).reshape(K, cin * k, B * Lo)
        y = torch.bmm(wf, cols).view(K, cout, B, Lo)
        y.sum().backward()

    out["im2col_bmm"] = timeit(im2col_bmm)

    xs = [torch.randn(B, cin, L, device=dev, dtype=dtype, requires_grad=cin > 1) for _ in range(K)]
    ws = [(torch.randn(cout, cin, k, device=dev, dtype=dtype) * 0.02).requires_grad_() for _ in range(K)]

    def loop():
        for xi, wi in zip(xs, ws):
            F.conv1d(xi, wi, stride=s, padding=p).sum().backward()

    out["loop"] = timeit(loop, reps=5)
    return out


KERNEL_KINDS = [  # (kind, substrings of CUDA kernel names), first match wins
    ("fold_conv_op (Triton)", ("conv_gemm", "conv_wgrad")),
    ("cl_conv_op (Triton)", ("conv_cl",)),
    ("inductor fused kernels", ("triton_",)),
    ("cuDNN layout transforms", ("ToNhwc", "ToNchw", "tensorTransform", "SliceC")),
    ("cuDNN convolutions", ("fprop", "dgrad", "wgrad", "implicit_gemm", "cudnn")),
    ("GEMMs (cuBLAS/CUTLASS)", ("gemm", "cutlass", "nvjet")),
    ("ATen element-wise/reductions", ("at::native",)),
]


def kernel_summary(prof, steps):
    """GPU time per step by kind of kernel (names matched by KERNEL_KINDS)."""
    totals = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if not us or evt.key.startswith(("ProfilerStep", "aten::", "autograd", "Torch-Compiled", "CompiledFunction",
                                         "## ", "cudaLaunch", "cudaGraph")):
            continue
        kind = next((k for k, subs in KERNEL_KINDS if any(s in evt.key for s in subs)), "other kernels")
        totals[kind] = totals.get(kind, 0.0) + us / 1e3 / steps
    lines = [f"  {k:28s} {v:7.2f} ms/step" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines + [f"  {'all kernels':28s} {sum(totals.values()):7.2f} ms/step"])


def step_timeline(prof, steps, min_us=8.0):
    """One step's kernels in the order they ran, with their durations (those of at least ``min_us``),
    so that a kernel's calls can be told apart by layer."""
    try:
        kernels = sorted((e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")),
                         key=lambda e: e.time_range.start)
    except Exception as err:  # the profiler's event API moves between torch versions
        return f"(no timeline: {err!r})"
    per_step = len(kernels) // max(steps, 1)
    one = kernels[-per_step:] if per_step else []
    lines = [f"one step's kernels in order ({per_step} kernels, {sum(e.time_range.elapsed_us() for e in one):.0f} us; "
             f"those of >= {min_us:.0f} us):"]
    short = {}
    for e in one:
        us = e.time_range.elapsed_us()
        if us >= min_us:
            lines.append(f"  {us:8.1f} us  {e.name[:100]}")
        else:
            n, total = short.get(e.name[:100], (0, 0.0))
            short[e.name[:100]] = (n + 1, total + us)
    # many short kernels cost their launch floor each: which they are, by name
    lines.append(f"kernels of < {min_us:.0f} us: {sum(n for n, _ in short.values())}, "
                 f"{sum(t for _, t in short.values()):.0f} us, by name (calls, us):")
    for name, (n, total) in sorted(short.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {n:4d} {total:8.1f} us  {name}")
    return "\n".join(lines)


def dump_slow_inductor_kernels(prof, steps, min_us=150.0):
    """Copy the generated source of inductor's kernels that take ``min_us`` or more a call into
    ``$OUT/inductor_kernels/`` (to read what a slow fused kernel does)."""
    out = os.environ.get("OUT")
    if not out:
        return
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    slow = {e.key for e in prof.key_averages() if e.key.startswith("triton_")
            and (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) / max(e.count, 1) >= min_us}
    folder = Path(out, "inductor_kernels")
    folder.mkdir(exist_ok=True)
    for path in Path(cache_dir()).rglob("*.py"):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for name in [n for n in slow if f"def {n}(" in text]:
            Path(folder, f"{name[:120]}.py").write_text(text)
            slow.discard(name)
    print(f"sources of slow inductor kernels in {folder}; not found: {sorted(slow) or 'none'}")


def profile_engine(dev, folds, amp=False, compile=False, rows=25, fold_convs=False, dump_min_us=150.0):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_speed import synthetic_edf20
    from sleeplib.models import build_model
    from sleeplib.train.config import get_recipe
    from sleeplib.train.fast import BatchedFolds

    x, y, subject = synthetic_edf20(8000, 3000, 20, dev)
    import numpy as np

    idx = np.arange(len(y))
    tr = [idx[subject != f] for f in range(folds)]
    te = [idx[subject == f] for f in range(folds)]
    cfg = get_recipe("attnsleep", epochs=1, amp="bf16" if amp else "none")
    model_fn = lambda: build_model("attnsleep")  # noqa: E731
    if fold_convs:
        from fold_conv_op import with_fold_convs

        model_fn = with_fold_convs(model_fn)
    eng = BatchedFolds(model_fn, x, y, tr, te, [[1.0] * 5] * folds, cfg,
                       device=dev, cuda_graphs=False, compile=compile)
    from torch.profiler import ProfilerActivity, profile

    eng.train_epoch()
    eng.train_epoch()
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.train_epoch()
    torch.cuda.synchronize()
    steps = eng.steps_per_epoch
    print(f"{steps} steps of {folds} folds: {(time.perf_counter() - t) / steps * 1e3:.2f} ms per step (no graph)")
    # full 20-fold steps only (train_epoch would add each fold's short last batch, run alone)
    steps = min(20, eng.steps_per_epoch)
    eng.step_idx.zero_()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng._step()
        torch.cuda.synchronize()
    print(f"GPU time by kind of kernel (fold_convs={fold_convs}):\n" + kernel_summary(prof, steps))
    print(step_timeline(prof, steps))
    dump_slow_inductor_kernels(prof, steps, dump_min_us)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)


def profile_single(dev, batch, amp):
    """Top kernels of a plain single-model AttnSleep training step (eager)."""
    from torch.profiler import ProfilerActivity, profile

    from sleeplib.models import build_model

    model = build_model("attnsleep").to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3, amsgrad=True, fused=True)
    x = torch.randn(batch, 1, 3000, device=dev) * 20
    y = torch.randint(0, 5, (batch,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms = timeit(step, reps=30)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return ms, prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--engine-profile-only", action="store_true",
                    help="only profile the batched engine's step (fp32 and bf16)")
    ap.add_argument("--compile", action="store_true", help="with --engine-profile-only: bf16 + torch.compile only")
    ap.add_argument("--bf16-only", action="store_true", help="with --engine-profile-only: the eager bf16 step only")
    ap.add_argument("--fold-convs", action="store_true",
                    help="with --engine-profile-only --compile: convolutions through benchmarks/fold_conv_op.py")
    ap.add_argument("--stacked", action="store_true",
                    help="profile the engine with benchmarks/stacked_layout.py's forward instead of vmap")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stacked_layout

    stacked_layout.add_layout_flags(ap)  # with --stacked: its layout (--cl-convs, --fused, ...)
    from train_speed import add_compile_flags, apply_compile_flags

    add_compile_flags(ap)
    ap.add_argument("--dump-min-us", type=float, default=150.0,
                    help="copy the source of inductor kernels of at least this many microseconds a call to $OUT")
    args = ap.parse_args()
    apply_compile_flags(args)
    if args.stacked:
        stacked_layout.use_stacked_forward(cl_convs=stacked_layout.configure(sys.argv[1:]))
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = {}
    if args.engine_profile_only and args.compile:
        print(f"batched engine, {args.folds} folds, bf16, torch.compile")
        print(profile_engine(dev, args.folds, True, compile=True, rows=60, fold_convs=args.fold_convs,
                             dump_min_us=args.dump_min_us))
        return
    if args.engine_profile_only:
        for amp in (True,) if args.bf16_only else (False, True):
            print(f"batched engine, {args.folds} folds, bf16={amp}")
            print(profile_engine(dev, args.folds, amp))
        return
    for dtype in (torch.float32, torch.bfloat16):
        for spec in LAYERS:
            r = bench_layer(spec, args.folds, args.batch, dtype, dev)
            results[f"{spec[0]}/{str(dtype)[6:]}"] = r
            print(f"{spec[0]:12s} {str(dtype)[6:]:9s} " + "  ".join(f"{k} {v:7.2f} ms" for k, v in r.items()), flush=True)
    if args.profile:
        for amp in (False, True):
            ms, table = profile_single(dev, args.batch, amp)
            results[f"single_step_ms/amp={amp}"] = ms
            print(f"single AttnSleep step, batch {args.batch}, bf16={amp}: {ms:.2f} ms")
            print(table)
        print(profile_engine(dev, min(args.folds, 20)))
    out = os.environ.get("OUT")
    if out:
        Path(out, "conv_layouts.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
