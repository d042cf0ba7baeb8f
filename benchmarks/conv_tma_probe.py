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
    """cl_conv_op's pointer kernel, with its block table or the blocks ``cfg``; ``pad`` and ``l_out``
    as in :func:`conv_tma_run`."""
    k = w.shape[1]
    if flip:  # the input gradient's form, as cl_conv_op._grad_input_kernel reads the weights
        s_g, s_j, s_c, s_o = w.stride()
        return cl_conv_op._run_conv(x, w, (s_g, s_j, s_o, s_c), True, k - 1 - pad, l_out, w.shape[2], k,
                                    tma=False, blocks=cfg)
    return cl_conv_op._run_conv(x, w, w.stride(), False, pad, l_out, w.shape[3], k, tma=False, blocks=cfg)


def _sweep(label, configs, run):
    """Microseconds of ``run(cfg)`` for each of ``configs`` (inf where it fails: out of shared memory
    and the like), printed; returns the fastest ``(cfg, us)``."""
    times = {}
    for cfg in configs:
        try:
            times[cfg] = _bench(lambda: run(cfg), reps=20)
        except Exception as e:  # noqa: BLE001 - a sweep: report the config and go on
            print(label, cfg, type(e).__name__, str(e)[:200], flush=True)
            times[cfg] = float("inf")
    print(label, "blocks:", {str(c): round(t, 1) for c, t in times.items()}, flush=True)
    best = min(times, key=times.get)
    return best, times[best]


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
            "fwd_pointer": _rel(_pointer(x, w, pad, l_out, False), ref_y),
            "dgrad_pointer": _rel(_pointer(gy, w, pad, L, True), ref_gx),
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
        row["fwd_pointer_best"] = _sweep("fwd pointer kernel,", wide, lambda cfg: _pointer(x, w, pad, l_out, False, cfg))
        row["dgrad_pointer_best"] = _sweep("dgrad pointer kernel,", [c for c in wide if c[2] <= C],
                                           lambda cfg: _pointer(gy, w, pad, L, True, cfg))
        tma = {}
        for kind in ("fwd", "dgrad"):
            c_in, bn = (C, 128) if kind == "fwd" else (O, C)
            configs = [(bm, bn, bk, wp, st) for bm in (128, 256) for bk in (64, 128) if bk <= c_in
                       for wp in (4, 8) for st in (3, 4) if not (bm == 256 and wp == 4)]
            if kind == "fwd":
                tma[kind] = _sweep("fwd descriptor kernel,", configs, lambda cfg: conv_tma_run(x, w, pad, l_out, False, *cfg))
            else:
                tma[kind] = _sweep("dgrad descriptor kernel,", configs,
                                   lambda cfg: conv_tma_run(gy, w, pad, L, True, *cfg))
        tma["wgrad"] = _sweep("wgrad descriptor kernel,", [(bk, wp, st) for bk in (64, 128) for wp in (4, 8) for st in (3, 4)],
                              lambda cfg: wgrad_tma_run(gy, x, pad, k, *cfg))
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
