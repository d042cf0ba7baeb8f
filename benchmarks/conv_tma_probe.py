"""Probe: the small MRCNN branch's 128-channel convolutions, pointer loads against tensor descriptors.

``cl_conv_op``'s first kernels load each tap's rows through pointers (``cp.async`` on Hopper); its
descriptor kernels (``_tma_kernels``, step 10) read the same implicit GEMM's tiles through host-built
tensor descriptors (Hopper's bulk tensor copy engine: one instruction a tile, rows out of range, the
convolution's zero padding, filled by the hardware), one program a (fold, sample, row tile). Prints
microseconds per call of the pointer kernel (its block table, and the best of a wider list of
blocks), of the descriptor kernels over their blocks, and of cuDNN's dense (ungrouped) convolution
of the same size as a bound; what chose ``cl_conv_op._tma_conv_blocks``::

    python3 benchmarks/conv_tma_probe.py            # CUDA
    TRITON_INTERPRET=1 python3 benchmarks/conv_tma_probe.py --check   # correctness, small shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cl_conv_op  # noqa: E402


def conv_tma_run(x, w, pad, l_out, flip=False, BM=128, BN=128, BK=64, warps=8, stages=3):
    """cl_conv_op's descriptor kernel with the given blocks; ``pad`` is the forward's (FLIP: the
    input gradient of the forward convolution ``w``, ``l_out`` its input's length)."""
    return cl_conv_op._run_conv_tma(x, w, flip, w.shape[1] - 1 - pad if flip else pad, l_out,
                                    blocks=(BM, BN, BK, warps, stages))


def wgrad_tma_run(gy, x, pad, k, BK=64, warps=8, stages=3):
    """cl_conv_op's descriptor weight-gradient kernel with the given blocks (its channel blocks: the table's)."""
    return cl_conv_op._grad_weight_tma(gy, x, pad, k, blocks=(BK, warps, stages))


def _pointer(x, w, pad, l_out, flip, cfg=None):
    """cl_conv_op's pointer kernel, with its block table or the blocks ``cfg``."""
    import triton

    conv_cl, _ = cl_conv_op._kernels()
    G, B, L, C = x.shape
    k = w.shape[1]
    if flip:
        s_g, s_j, s_c, s_o = w.stride()
        w_strides, O, p = (s_g, s_j, s_o, s_c), w.shape[2], k - 1 - pad
    else:
        w_strides, O, p = w.stride(), w.shape[3], pad
    y = cl_conv_op.empty_cl(G, B, l_out, O, like=x)
    M = B * l_out
    BM, BN, BK, warps, stages = cfg or cl_conv_op._conv_blocks(M, C, O, k)
    fn = conv_cl.fn if hasattr(conv_cl, "fn") else conv_cl
    fn[(triton.cdiv(M, BM), triton.cdiv(O, BN), G)](
        x, w, y, M, L, l_out, C, O, p, x.stride(0), x.stride(1), x.stride(2), *w_strides,
        y.stride(0), y.stride(1), y.stride(2), TAPS=k, FLIP=flip, X_ALIGN=8, BM=BM, BN=BN, BK=BK,
        num_warps=warps, num_stages=stages)
    return y


def _bench(fn, reps=50):
    from triton.testing import do_bench

    return 1000 * do_bench(fn, warmup=10, rep=reps)


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="small shapes, correctness only (interpreter)")
    ap.add_argument("--folds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    # the small branch's two 128-output convolutions: (C, L, k, pad)
    shapes = {"conv2 (64->128)": (64, 251, 8, 4), "conv3 (128->128)": (128, 252, 8, 4)}
    G, B = (2, 3) if args.check else (args.folds, args.batch)
    results = {}
    for name, (C, L, k, pad) in shapes.items():
        if args.check:
            C, L = C // 4, 37
        O = 128 if not args.check else 32
        l_out = L + 2 * pad - k + 1
        x = torch.randn(B, L, G, C, device=dev, dtype=dtype).permute(2, 0, 1, 3)
        w = (0.05 * torch.randn(G, k, C, O, device=dev, dtype=dtype)).contiguous()
        gy = torch.randn(B, l_out, G, O, device=dev, dtype=dtype).permute(2, 0, 1, 3)
        ref_y = cl_conv_op.conv1d_cl_reference(x.float(), w.float(), pad, l_out)
        ref_gx = cl_conv_op.conv1d_cl_reference(gy.float(), w.float().flip(1).transpose(2, 3), k - 1 - pad, L)
        ref_gw = torch.nn.grad.conv1d_weight(cl_conv_op._grouped_padded(x.float(), pad, l_out, k), (G * O, C, k),
                                             cl_conv_op._grouped(gy.float()), groups=G)
        ref_gw = ref_gw.view(G, O, C, k).permute(0, 3, 2, 1)
        blocks = dict(BM=32, BN=O, BK=min(C, 64), warps=4, stages=2) if args.check else {}
        wblocks = dict(BK=16 if args.check else 64)
        checks = {
            "fwd": _rel(conv_tma_run(x, w, pad, l_out, **blocks), ref_y),
            "dgrad": _rel(conv_tma_run(gy, w, pad, L, flip=True, **{**blocks, "BN": min(C, 128) if not args.check else C, "BK": min(O, 64)}), ref_gx),
            "wgrad": _rel(wgrad_tma_run(gy, x, pad, k, **wblocks), ref_gw),
        }
        print(f"{name}: relative max error vs reference {checks}")
        if args.check:
            continue
        row = {"check": checks}
        flops = 2 * G * B * l_out * C * O * k
        row["fwd_pointer_us"] = _bench(lambda: _pointer(x, w, pad, l_out, False))
        row["dgrad_pointer_us"] = _bench(lambda: _pointer(gy, w, pad, L, True))
        row["wgrad_pointer_us"] = _bench(lambda: cl_conv_op._grad_weight_kernel(gy, x, pad, k, tma=False))
        wide = [(bm, 128, bk, 8, st) for bm in (128, 256) for bk in (64, 128) for st in (2, 3, 4)
                if not (bk == 128 and st == 4)]
        best = {}
        for kind, fn in (("fwd", lambda cfg: _pointer(x, w, pad, l_out, False, cfg)),
                         ("dgrad", lambda cfg: _pointer(gy, w, pad, L, True, cfg))):
            times = {}
            for cfg in wide:
                if kind == "dgrad" and C < cfg[2]:
                    continue
                try:
                    times[cfg] = _bench(lambda: fn(cfg), reps=20)
                except Exception as e:  # out of shared memory and the like
                    print(kind, cfg, type(e).__name__, str(e)[:200], flush=True)
                    times[cfg] = float("inf")
            b = min(times, key=times.get)
            best[kind] = (b, times[b])
            print(kind, "pointer kernel, blocks:", {str(c): round(t, 1) for c, t in times.items()}, flush=True)
        row["fwd_pointer_best"] = best["fwd"]
        row["dgrad_pointer_best"] = best["dgrad"]
        tma = {}
        for kind in ("fwd", "dgrad"):
            times = {}
            c_in = C if kind == "fwd" else O
            for bm in (128, 256):
                for bk in (64, 128):
                    if bk > c_in:
                        continue
                    for wp in (4, 8):
                        for st in (3, 4):
                            if bm == 256 and wp == 4:
                                continue
                            bn = 128 if kind == "fwd" else C
                            cfg = dict(BM=bm, BN=bn, BK=bk, warps=wp, stages=st)
                            try:
                                if kind == "fwd":
                                    f = lambda: conv_tma_run(x, w, pad, l_out, **cfg)  # noqa: E731
                                else:
                                    f = lambda: conv_tma_run(gy, w, pad, L, flip=True, **cfg)  # noqa: E731
                                times[tuple(cfg.values())] = _bench(f, reps=20)
                            except Exception as e:
                                print(kind, cfg, type(e).__name__, str(e)[:200], flush=True)
                                times[tuple(cfg.values())] = float("inf")
            b = min(times, key=times.get)
            tma[kind] = (b, times[b])
            print(kind, "descriptor kernel, blocks:", {str(c): round(t, 1) for c, t in times.items()}, flush=True)
        wtimes = {}
        for bk in (64, 128):
            for wp in (4, 8):
                for st in (3, 4):
                    cfg = dict(BK=bk, warps=wp, stages=st)
                    try:
                        wtimes[(bk, wp, st)] = _bench(lambda: wgrad_tma_run(gy, x, pad, k, **cfg), reps=20)
                    except Exception as e:
                        print("wgrad", cfg, type(e).__name__, str(e)[:200], flush=True)
                        wtimes[(bk, wp, st)] = float("inf")
        b = min(wtimes, key=wtimes.get)
        print("wgrad descriptor kernel, blocks:", {str(c): round(t, 1) for c, t in wtimes.items()}, flush=True)
        tma["wgrad"] = (b, wtimes[b])
        row["tma_best"] = tma
        # cuDNN's dense convolution of the same size (one weight for all G*B samples): a bound
        torch.backends.cudnn.benchmark = True
        xd = x.permute(1, 0, 3, 2).reshape(G * B, C, 1, L).contiguous(memory_format=torch.channels_last)
        wd = w[0].permute(2, 1, 0).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        row["cudnn_dense_fwd_us"] = _bench(lambda: F.conv2d(xd, wd, padding=(0, pad)))
        row["tflops_fwd_pointer"] = flops / row["fwd_pointer_us"] / 1e6
        row["tflops_fwd_tma"] = flops / tma["fwd"][1] / 1e6
        results[name] = row
        print(json.dumps({name: row}, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
