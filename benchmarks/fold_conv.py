"""AttnSleep's convolutions for K folds at once: cuDNN grouped (what vmap makes) vs fold_conv_op's kernels.

For every ``Conv1d`` shape of AttnSleep (100 Hz, 3000 samples) with ``--folds`` folds of batch
``--batch``, in ``--dtype``, times forward + backward (input and weight gradients) of

* ``grouped``: ``F.conv1d`` with ``groups=K`` on ``(B, K*C, L)``, as vmap runs an ``nn.Conv1d``
  (the model computes the two first layers, 1 input channel, as unfold + matmul instead:
  ``sleeplib.models.blocks.UnfoldConv1d``; their ``grouped`` times are not the engine's);
* ``fold``: :func:`fold_conv_op.conv1d_folds` on ``(K, B, C, L)``;
* ``cl`` (stride-1 layers): :func:`cl_conv_op.conv1d_cl` on a channels-last ``(K, B, L, C)`` view
  of ``(B, L, K, C)`` memory, the layout of ``stacked_layout.py --cl-convs``;

checks that both give the same numbers (relative error of output and gradients) and prints the
ratio. CUDA only (on CPU ``fold`` is the grouped reference itself)::

    python3 benchmarks/fold_conv.py --folds 20 --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conv_layouts import LAYERS  # noqa: E402  (the MRCNN's convolutions)
from cl_conv_op import conv1d_cl  # noqa: E402
from fold_conv_op import conv1d_folds  # noqa: E402

# (name, C_in, C_out, input length, kernel, stride, padding): AttnSleep's MRCNN, AFR and TCE at 100 Hz
SHAPES = [(name, c_in, c_out, length, k, s, p) for name, c_in, c_out, k, s, p, length in LAYERS] + [
    ("afr.1x1", 128, 30, 80, 1, 1, 0),
    ("afr.1x1_b", 30, 30, 80, 1, 1, 0),
    ("tce.causal", 30, 30, 86, 7, 1, 0),
]


def timed(fn, reps):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folds", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("fold_conv.py times CUDA kernels; no CUDA GPU here")
    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    K, B = args.folds, args.batch
    rows, total = [], {"grouped": 0.0, "fold": 0.0, "grouped_stride1": 0.0, "cl": 0.0}
    for name, C, O, L, k, s, pad in SHAPES:
        l_out = (L + 2 * pad - k) // s + 1
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(K, B, C, L, device="cuda", generator=g).to(dtype).requires_grad_(C > 1)
        w = (0.05 * torch.randn(K, O, C, k, device="cuda", generator=g)).to(dtype).requires_grad_(True)
        gy = torch.randn(K, B, O, l_out, device="cuda", generator=g).to(dtype)
        xg = x.detach().transpose(0, 1).reshape(B, K * C, L).requires_grad_(C > 1)
        wg = w.detach().reshape(K * O, C, k).requires_grad_(True)
        gyg = gy.transpose(0, 1).reshape(B, K * O, l_out)

        def grouped():
            out = F.conv1d(xg, wg, stride=s, padding=pad, groups=K)
            return out, torch.autograd.grad(out, [t for t in (xg, wg) if t.requires_grad], gyg)

        def fold():
            out = conv1d_folds(x, w, s, pad, l_out)
            return out, torch.autograd.grad(out, [t for t in (x, w) if t.requires_grad], gy)

        x_cl = x.detach().permute(1, 3, 0, 2).contiguous().permute(2, 0, 1, 3).requires_grad_(C > 1)
        gy_cl = gy.permute(1, 3, 0, 2).contiguous().permute(2, 0, 1, 3)

        def cl():
            out = conv1d_cl(x_cl, w.permute(0, 3, 2, 1).contiguous(), pad, l_out)  # packed, as the engine does
            return out, torch.autograd.grad(out, [t for t in (x_cl, w) if t.requires_grad], gy_cl)

        (yg, grads_g), (yf, grads_f) = grouped(), fold()
        errors = {"out": rel(yf, yg.view(B, K, O, l_out).transpose(0, 1)),
                  "grad_w": rel(grads_f[-1], grads_g[-1].view(K, O, C, k))}
        if C > 1:
            errors["grad_x"] = rel(grads_f[0], grads_g[0].view(B, K, C, L).transpose(0, 1))
        t_g, t_f = timed(grouped, args.reps), timed(fold, args.reps)
        total["grouped"] += t_g
        total["fold"] += t_f
        row = {"layer": name, "grouped_ms": t_g, "fold_ms": t_f, "ratio": t_g / t_f, **errors}
        cl_text = ""
        if s == 1:
            yc, grads_c = cl()
            row["cl_error_out"] = rel(yc.transpose(2, 3), yg.view(B, K, O, l_out).transpose(0, 1))
            row["cl_error_grad_w"] = rel(grads_c[-1], grads_g[-1].view(K, O, C, k))
            if C > 1:
                row["cl_error_grad_x"] = rel(grads_c[0].transpose(2, 3), grads_g[0].view(B, K, C, L).transpose(0, 1))
            t_c = timed(cl, args.reps)
            total["grouped_stride1"] += t_g
            total["cl"] += t_c
            row.update(cl_ms=t_c, cl_ratio=t_g / t_c)
            cl_text = (f", cl {t_c:7.3f} ms ({t_g / t_c:5.2f}x, rel. error "
                       + ", ".join(f"{k_[9:]} {v:.1e}" for k_, v in row.items() if k_.startswith("cl_error")) + ")")
        rows.append(row)
        print(f"{name:11s} C{C:>4} O{O:>4} L{L:>5} k{k:>4} s{s:>3}: grouped {t_g:7.3f} ms, fold {t_f:7.3f} ms "
              f"({t_g / t_f:5.2f}x){cl_text}  rel. error " + ", ".join(f"{k_} {v:.1e}" for k_, v in errors.items()))
    print(f"all layers, forward + backward: grouped {total['grouped']:.2f} ms, fold {total['fold']:.2f} ms "
          f"({total['grouped'] / total['fold']:.2f}x)  [{args.folds} folds x batch {args.batch}, {args.dtype}, "
          f"{torch.cuda.get_device_name()}]")
    print(f"stride-1 layers: grouped {total['grouped_stride1']:.2f} ms, cl {total['cl']:.2f} ms "
          f"({total['grouped_stride1'] / max(total['cl'], 1e-9):.2f}x)")
    path = args.json or (os.path.join(os.environ["OUT"], "fold_conv.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps({"rows": rows, "total": total, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
