"""Training speed: several folds at once on the device vs a naive eager loop.

Measures, in one process, on synthetic arrays of Sleep-EDF-20's size (42,308 epochs of 3000
samples, 20 subjects, 39 nights; random data, never zeros):

* naive: one fold, fp32, ``torch.utils.data.DataLoader`` on CPU tensors (shuffle, batch 128),
  a host->device copy and a ``loss.item()`` sync every step, ``torch.optim.Adam(amsgrad=True)`` -
  the structure of the original AttnSleep trainer. Timed over ``--naive-steps`` steps and scaled to
  one training epoch (training only; its per-epoch test pass is left out, which favours it).
* batched: :class:`sleeplib.train.fast.BatchedFolds` (what ``run_cv(engine="batched")`` uses):
  ``--folds`` folds of the paper split at once, data on the device, vmap over stacked fold models,
  masked fused Adam, CUDA graph, bf16 autocast (``--amp``); includes each epoch's evaluation of
  every fold's test subject and the exact short last batch of each fold.

Prints seconds per fold-epoch, the speed-up, and the projected wall time of the full 20 folds x
100 epochs schedule; ``--full`` also runs that schedule and reports the measured time (``--full-only``
runs only that; with ``--checkpoint`` and ``--time-limit`` it spans several processes, each
shorter than a device command's limit).

Examples
--------
CPU smoke (CI-sized)::

    python benchmarks/train_speed.py --device cpu --n-samples 400 --n-times 3000 --batch 32 \
        --folds 2 --epochs 1 --naive-steps 3

H100::

    python benchmarks/train_speed.py --device cuda --folds 20 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_helpers  # noqa: E402
from sleeplib.io import save_json  # noqa: E402
from sleeplib.models import build_model  # noqa: E402
from sleeplib.train.config import get_recipe  # noqa: E402
from sleeplib.train.fast import BatchedFolds  # noqa: E402
from sleeplib.train.protocols import PAPER_PERMUTATIONS  # noqa: E402

# Sleep-EDF-20 Fpz-Cz class counts (W, N1, N2, N3, REM) as reported by AttnSleep (42,308 epochs).
EDF20_COUNTS = np.array([8285, 2804, 17799, 5703, 7717])


def synthetic_edf20(n_samples: int, n_times: int, n_subjects: int, device, seed: int = 0):
    """Random epochs and labels with EDF-20's class mix; subject ids 0..n_subjects-1, 2 nights each."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    probs = torch.as_tensor(EDF20_COUNTS / EDF20_COUNTS.sum(), dtype=torch.float32)
    y = torch.multinomial(probs, n_samples, replacement=True, generator=g)
    x = torch.randn(n_samples, 1, n_times, generator=g) * 20.0  # microvolt-scale noise
    subject = torch.arange(n_samples) * n_subjects // n_samples
    return x.to(device), y.to(device), subject.numpy()


def paper_like_folds(subject: np.ndarray, n_folds: int):
    subjects = np.unique(subject)
    perm = PAPER_PERMUTATIONS["sleep-edf-20"] if len(subjects) == 20 else list(range(len(subjects)))
    order = subjects[np.asarray(perm)]
    tests = np.array_split(order, len(subjects))[:n_folds]
    train = [np.flatnonzero(~np.isin(subject, t)) for t in tests]
    test = [np.flatnonzero(np.isin(subject, t)) for t in tests]
    return train, test


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def naive(model_name, x, y, train_idx, args, config):
    """Seconds per training epoch of the original-style loop (extrapolated from timed steps)."""
    device = torch.device(args.device)
    torch.manual_seed(config.seed)
    model = build_model(model_name, n_times=x.shape[-1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, amsgrad=True)
    xs, ys = x[train_idx].cpu(), y[train_idx].cpu()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=args.batch, shuffle=True)
    weight = torch.ones(5, device=device)
    it = iter(loader)
    times = []
    for step in range(args.naive_steps + 3):
        t0 = time.perf_counter()
        xb, yb = next(it)
        xb, yb = xb.to(device), yb.to(device)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb, weight=weight)
        loss.backward()
        opt.step()
        loss.item()  # the per-step sync of the original trainer
        times.append(time.perf_counter() - t0)
    per_step = float(np.median(times[3:]))
    steps_per_epoch = -(-len(train_idx) // args.batch)
    return per_step * steps_per_epoch, per_step


def make_engine(model_name, x, y, train, test, args, config, time_phases=False, compile_backend="inductor",
                helpers=None):
    """The batched engine as the command line asks (timed runs and the --full schedule alike);
    ``helpers``: the :class:`compile_helpers.Helpers` it compiles with (``compile_backend`` then
    theirs, and with ``--train-while-compiling`` their readiness)."""
    if helpers is not None:
        compile_backend = helpers.backend_for
    def model_fn():
        return build_model(model_name, n_times=x.shape[-1])

    if args.fold_convs:
        from fold_conv_op import with_fold_convs

        model_fn = with_fold_convs(model_fn)
    return BatchedFolds(model_fn, x, y, train, test,
                        [[1.0] * 5] * len(train), config, device=args.device, cuda_graphs=args.graphs,
                        last_batch=args.last_batch, compile=args.compile, compile_backend=compile_backend,
                        compile_eval=not args.eager_eval,
                        compiled_ready=helpers.ready if helpers is not None and helpers.backward_worker else None,
                        bn_fp32=not args.bn_bf16,
                        time_phases=time_phases)


class ColdStartReport:
    """Where a process's first epoch goes: wall time of the engine's eager steps (the first calls
    compile), split in the first into the compiled forward, the backward and the optimiser update;
    the CUDA-graph capture, the short last batches and the evaluations; the Triton
    kernels compiled in this process (the benchmarks' own; inductor compiles its kernels in worker
    processes) and ``torch._dynamo``'s table of compile phases (inductor's autotuning included)."""

    # the compiled forward and update are called inside _step: the first step's backward (its
    # compilation) is what remains of _step's first call
    _TIMED = ("_step", "_compiled_forward", "_update", "_capture", "_last_batches", "evaluate")

    def __init__(self, engine):
        self.engine = engine
        self.calls: dict[str, list[float]] = {}
        self.triton: list[tuple[str, float, bool]] = []
        self._own = {name: engine.__dict__[name] for name in self._TIMED if name in engine.__dict__}
        for name in self._TIMED:
            if getattr(engine, name, None) is not None:  # no compiled forward without compile
                setattr(engine, name, self._timed(name, getattr(engine, name)))
        try:
            from triton import knobs

            knobs.compilation.listener = self._listen
        except (ImportError, AttributeError):  # no Triton, or one without compilation listeners
            pass

    def close(self) -> None:
        """Stop timing (each timed call synchronises the device): the engine's own methods again."""
        for name in self._TIMED:
            self.engine.__dict__.pop(name, None)
        self.engine.__dict__.update(self._own)  # attributes set by the engine itself, as they were
        try:
            from triton import knobs

            knobs.compilation.listener = None
        except (ImportError, AttributeError):
            pass

    def _timed(self, name, fn):
        device = self.engine.device.type

        def wrapper(*a, **k):
            capturing = device == "cuda" and torch.cuda.is_current_stream_capturing()
            if not capturing:
                sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if not capturing:
                sync(device)
            self.calls.setdefault(name, []).append(time.perf_counter() - t0)
            return out
        return wrapper

    def _listen(self, *, src, metadata, metadata_group, times, cache_hit):
        name = getattr(getattr(src, "fn", None), "__name__", None) or metadata.get("name", "?")
        us = times.ir_initialization + times.total_lowering + times.store_results
        self.triton.append((name, us / 1e6, cache_hit))

    def summary(self) -> dict:
        out = {name: {"calls": len(t), "first_s": t[0], "total_s": sum(t)} for name, t in self.calls.items()}
        if "_compiled_forward" in out and "_step" in out:
            inside = out["_compiled_forward"]["first_s"] + out.get("_update", {}).get("first_s", 0.0)
            out["first_backward_s"] = out["_step"]["first_s"] - inside
        misses = [(n, s) for n, s, hit in self.triton if not hit]
        by_kernel: dict[str, list[float]] = {}
        for n, s in misses:
            by_kernel.setdefault(n, []).append(s)
        out["triton_compiled_here"] = {n: {"count": len(v), "s": sum(v)} for n, v in sorted(by_kernel.items())}
        out["triton_compiled_here_s"] = sum(s for _, s in misses)
        # hits, misses and bypasses of inductor's (FX) and AOTAutograd's on-disk caches of compiled graphs
        counters = torch._dynamo.utils.counters
        out["compile_caches"] = {f"{group}.{k}": int(v) for group in ("inductor", "aot_autograd")
                                 for k, v in counters[group].items() if "cache" in k}
        try:
            names, rows = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
            out["compile_phases_s"] = {n: float(v) for n, v in zip(names, rows) if _is_number(v)}
        except Exception as e:  # noqa: BLE001 - a report, not a result: say why it is missing
            out["compile_phases_s"] = f"unavailable: {e}"
        return out

    def print(self) -> None:
        s = self.summary()
        print("first epoch, wall time by phase (s): " + ", ".join(
            f"{n} {v['first_s']:.2f} first, {v['total_s']:.2f} in {v['calls']} calls"
            for n, v in s.items() if isinstance(v, dict) and "first_s" in v))
        if "first_backward_s" in s:
            print(f"first step: compiled forward {s['_compiled_forward']['first_s']:.2f} s (tracing and compiling "
                  f"included), backward {s['first_backward_s']:.2f} s, update {s.get('_update', {}).get('first_s', 0):.2f} s")
        print(f"Triton kernels compiled in this process: {sum(v['count'] for v in s['triton_compiled_here'].values())}, "
              f"{s['triton_compiled_here_s']:.1f} s: " + ", ".join(
                  f"{n} {v['count']}x {v['s']:.1f} s" for n, v in s["triton_compiled_here"].items()))
        if s["compile_caches"]:
            print("compile caches: " + ", ".join(f"{k} {v}" for k, v in sorted(s["compile_caches"].items())))
        phases = s["compile_phases_s"]
        if isinstance(phases, dict):
            top = sorted(phases.items(), key=lambda kv: -kv[1])[:25]
            print("torch.compile phases (s, summed over calls): " + ", ".join(f"{n} {v:.1f}" for n, v in top))
        else:
            print("torch.compile phases: " + phases)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


LEAN_COMPILE = ("triton.autotune_pointwise=False", "inductor.loop_ordering_after_fusion=False",
                "inductor.size_asserts=False", "inductor.fx_graph_cache=False", "functorch.enable_autograd_cache=False",
                "inductor.comprehensive_padding=False")
"""``--lean-compile``'s options. On an H100 (``benchmarks/RESULTS.md``, step 11), without the reordering
of loops after fusion inductor's scheduler took 5.0-6.2 s of the cold start instead of 6.5-9.6 s,
and the steps ran as fast (2.60 s of full steps an epoch either way); the caches are off because a
cold start only writes them. Turning off the pattern matcher as well saved some 3 s more of
compilation but made steps slower (0.01-0.03 s an epoch), so it is not among them. Without
comprehensive padding (inductor pads the rows of the tensors it allocates, the saved activations
among them, to 128 bytes) the full steps of an epoch took 2.46 s instead of 2.55 s (step 14)."""

COMPILE_HELPERS = ("inductor.fx_graph_cache=True", "functorch.enable_autograd_cache=False")
"""``--compile-helpers``' options: the helpers hand their graphs over through inductor's FX graph
cache; AOTAutograd's cache stays off, as a hit there would skip the compiler that waits for them."""

_CONFIG_MODULES = {"inductor": "torch._inductor.config", "functorch": "torch._functorch.config",
                   "dynamo": "torch._dynamo.config", "triton": "torch._inductor.config.triton"}


def set_compile_config(setting: str) -> None:
    """``MODULE.NAME=VALUE`` (MODULE one of :data:`_CONFIG_MODULES`, VALUE a Python literal): set that
    torch compiler option. An unknown module is an error that lists the known ones, an unknown name
    one that names it."""
    import ast
    import importlib

    name, sep, value = setting.partition("=")
    module, _, key = name.partition(".")
    if not sep or module not in _CONFIG_MODULES or not key:
        raise SystemExit(f"--compile-config {setting!r}: expected MODULE.NAME=VALUE with MODULE one of "
                         f"{', '.join(_CONFIG_MODULES)}")
    path = _CONFIG_MODULES[module]
    target = importlib.import_module("torch._inductor.config").triton if module == "triton" else importlib.import_module(path)
    if not hasattr(target, key):
        raise SystemExit(f"--compile-config {setting!r}: {path} has no option {key!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare string
    setattr(target, key, parsed)


def add_compile_flags(parser) -> None:
    """Declare ``--lean-compile``, ``--coordinate-descent`` and ``--compile-config`` (read back by
    :func:`apply_compile_flags`)."""
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="with --compile: let inductor tune its kernels' block sizes "
                             "(--compile-config inductor.coordinate_descent_tuning=True)")
    parser.add_argument("--lean-compile", action="store_true",
                        help="with --compile: inductor benchmarks no alternative configs of its pointwise kernels, "
                             "and skips what measured no faster at run time: the reordering of loops after fusion, "
                             "the size asserts, the FX and AOTAutograd caches (LEAN_COMPILE)")
    parser.add_argument("--compile-config", action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help="with --compile: set a torch compiler option, e.g. "
                             "inductor.loop_ordering_after_fusion=False or "
                             "functorch.autograd_cache_allow_custom_autograd_functions=True (repeatable)")


def apply_compile_flags(args) -> None:
    """Set the compiler options that :func:`add_compile_flags`' flags ask for (``LEAN_COMPILE`` first,
    ``--compile-config``'s last)."""
    settings = (*(LEAN_COMPILE if args.lean_compile else ()),
                *(("inductor.coordinate_descent_tuning=True",) if args.coordinate_descent else ()),
                *(COMPILE_HELPERS if getattr(args, "compile_helpers", False) else ()),
                *args.compile_config)
    for setting in settings:
        set_compile_config(setting)


AT_START: list = []
"""Called (no arguments) when the first engine's timed build starts, e.g. ``stacked_layout.py``'s
warming children: work for the run started before it would be left out of the timings."""


def start_timed_work(args):
    """What starts with the first timed engine build: :data:`AT_START`'s callables, and, with
    ``--compile-helpers``, the processes that compile the update and the step's forward
    (:class:`compile_helpers.Helpers`, returned; None without the flag or at a later build: the
    helper builds the first engine's shapes, and ``--full``'s schedule may train other folds)."""
    global _HELPERS_STARTED
    while AT_START:
        AT_START.pop(0)()
    if not (args.compile_helpers and args.compile) or _HELPERS_STARTED:
        return None
    _HELPERS_STARTED = True
    return compile_helpers.Helpers(forward_worker=None if args.no_forward_worker else torch.device(args.device).type,
                                   backward_worker=getattr(args, "train_while_compiling", False))


_HELPERS_STARTED = False


def report_helpers(helpers, out: dict, engine) -> bool:
    """After an epoch, once the engine has run its compiled step: what it waited for, into ``out``
    and printed; ends the helpers. Returns whether it did (with ``--train-while-compiling`` the
    first epochs may run before the workers are done)."""
    if helpers is None:
        return True
    if helpers.backward_worker is not None and not engine._step_ran_compiled:
        return False
    helpers.close()
    out["compile_helpers"] = {g: {"waited_s": s, "marked": ok} for g, (s, ok) in helpers.waits.graphs.items()}
    for graph, worker in ((compile_helpers.FORWARD_GRAPH, helpers.worker),
                          (compile_helpers.BACKWARD_GRAPH, helpers.backward_worker)):
        if worker is not None:
            out["compile_helpers"][graph] = dict(worker.log)
    print(f"compile helpers (after epoch {engine.epoch}): " + helpers.summary())
    return True


def batched(model_name, x, y, train, test, args, config, epochs):
    t_build = time.perf_counter()
    helpers = start_timed_work(args)
    engine = make_engine(model_name, x, y, train, test, args, config, time_phases=True, helpers=helpers)
    sync(args.device)
    build = time.perf_counter() - t_build
    report = ColdStartReport(engine) if args.cold_start_report else None
    epoch_times, reported = [], False
    for _ in range(epochs):
        t0 = time.perf_counter()
        engine.run_epoch()
        sync(args.device)
        epoch_times.append(time.perf_counter() - t0)
        if len(epoch_times) == 1:
            engine.cold_start = {}
            if report is not None:
                report.print()
                engine.cold_start = report.summary()
                report.close()
        if not reported:
            reported = report_helpers(helpers, engine.cold_start, engine)
    return engine, build, epoch_times


def run_compile_helper(args, config) -> None:
    """In a ``--compile-helpers`` helper process: one step of the engine this command line builds
    first, on random epochs of its shapes (the graphs depend on shapes only), its update compiled
    through :func:`compile_helpers.helper_backend_for` (which ends the process once its graph is
    compiled; :func:`compile_helpers.step_for_the_update`)."""
    folds = args.schedule_folds if args.full_only else args.folds
    n = 2 * args.batch
    x = torch.randn(n, 1, args.n_times, device=args.device)
    y = torch.randint(0, 5, (n,), device=args.device)
    rows = [np.arange(n)] * folds
    compile_helpers.step_for_the_update(
        make_engine(args.model, x, y, rows, rows, args, config, compile_backend=compile_helpers.helper_backend_for()))


def weights_digest(engine) -> str:
    """A digest of every fold's weights, to tell whether two runs trained alike (two cold runs of
    the benchmarks' GPU path already differed, benchmarks/RESULTS.md step 13)."""
    import hashlib

    return hashlib.sha256(engine.flat.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def rng_offset(engine):
    """The device generator's Philox offset after the run: how far its random stream went, the
    same in runs that drew alike, whatever their weights' last bits."""
    if engine.device.type != "cuda":
        return None
    return int(torch.cuda.default_generators[engine.device.index or 0].get_offset())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="attnsleep")
    p.add_argument("--n-samples", type=int, default=42308)
    p.add_argument("--n-times", type=int, default=3000)
    p.add_argument("--n-subjects", type=int, default=20)
    p.add_argument("--folds", type=int, default=20, help="folds trained at once")
    p.add_argument("--epochs", type=int, default=3, help="batched epochs timed (the first includes capture)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--graphs", type=int, default=None, help="1/0: force CUDA graphs on/off (default: on CUDA)")
    p.add_argument("--last-batch", default="exact", choices=["exact", "drop"])
    p.add_argument("--naive-steps", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="torch.compile the vmapped forward (experimental)")
    p.add_argument("--bn-bf16", action="store_true", help="with --amp bf16: BatchNorm in bf16 too")
    p.add_argument("--fold-convs", action="store_true",
                   help="convolutions through benchmarks/fold_conv_op.py (Triton kernels on CUDA; measured slower)")
    p.add_argument("--cold-start-report", action="store_true",
                   help="print where the first epoch's time goes (eager steps, capture, compilation phases, Triton)")
    p.add_argument("--eager-eval", action="store_true",
                   help="with --compile: evaluate eagerly (no second compiled graph)")
    p.add_argument("--compile-helpers", action="store_true",
                   help="with --compile: the optimiser update compiled by a helper process, and the step's forward by "
                        "a worker process while this one compiles the backward (benchmarks/compile_helpers.py; the "
                        "first engine built only)")
    p.add_argument("--no-forward-worker", action="store_true",
                   help="with --compile-helpers: the forward compiled in this process (the update's helper only)")
    p.add_argument("--train-while-compiling", action="store_true",
                   help="with --compile-helpers: the backward compiled by a second worker process too, and this "
                        "one training meanwhile, eagerly (BatchedFolds' compiled_ready)")
    p.add_argument("--cudnn-heuristics", action="store_true",
                   help="cuDNN picks its algorithms by heuristics (no benchmarking of each new shape)")
    add_compile_flags(p)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--skip-batched", action="store_true",
                   help="naive loop only (models that cannot run under vmap, e.g. attnsleep_msmp)")
    p.add_argument("--full", action="store_true", help="also run the whole 20 x 100 schedule")
    p.add_argument("--full-only", action="store_true", help="run (or resume) the whole schedule only")
    p.add_argument("--checkpoint", default=None,
                   help="with --full/--full-only: resume from and save to this file (and PATH.json)")
    p.add_argument("--time-limit", type=float, default=float("inf"),
                   help="with --full/--full-only: start no epoch after this many seconds (but run one); save and stop")
    p.add_argument("--schedule-folds", type=int, default=20)
    p.add_argument("--schedule-epochs", type=int, default=100)
    p.add_argument("--json", default=None, help="write the figures here (default: $OUT/train_speed.json if set)")
    args = p.parse_args(argv)
    args.graphs = None if args.graphs is None else bool(args.graphs)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = not args.cudnn_heuristics
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    apply_compile_flags(args)
    config = get_recipe("attnsleep", batch_size=args.batch, amp=args.amp, progress=False)
    if compile_helpers.role() is not None:
        run_compile_helper(args, config)
        return {}
    x, y, subject = synthetic_edf20(args.n_samples, args.n_times, args.n_subjects, args.device)
    train, test = paper_like_folds(subject, args.folds)
    out = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "args": vars(args)}

    if not args.skip_naive:
        s_epoch, s_step = naive(args.model, x, y, train[0], args, config)
        out.update(naive_s_per_fold_epoch=s_epoch, naive_s_per_step=s_step)
        print(f"naive eager fp32 DataLoader: {s_step * 1e3:.1f} ms/step, {s_epoch:.2f} s per fold-epoch")

    if args.skip_batched:
        _write_json(args, out)
        return out
    if args.full_only:
        out.update(run_full_schedule(args, x, y, subject, config))
        _write_json(args, out)
        return out
    engine, build, times = batched(args.model, x, y, train, test, args, config, args.epochs)
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    per_fold_epoch = steady / args.folds
    n_fold_epochs = args.schedule_folds * args.schedule_epochs
    projected = build + (times[0] - steady) + per_fold_epoch * n_fold_epochs
    out.update(batched_build_s=build, batched_epoch_s=times, batched_s_per_fold_epoch=per_fold_epoch,
               steps_per_epoch=engine.steps_per_epoch, projected_schedule_s=projected,
               peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None)
    out["phase_times"] = engine.phase_times
    out["weights_sha256"], out["cuda_rng_offset"] = weights_digest(engine), rng_offset(engine)
    if getattr(engine, "cold_start", None):
        out["cold_start"] = engine.cold_start
    last = engine.phase_times[-1]
    print("last epoch: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items() if k != "epoch"))
    print(f"batched x{args.folds} ({args.amp}, compile={args.compile}, graphs={engine.use_graphs}, "
          f"last_batch={args.last_batch}, fold_convs={args.fold_convs}): "
          f"build {build:.1f} s, epochs {[round(t, 2) for t in times]} s, "
          f"{per_fold_epoch:.3f} s per fold-epoch")
    if "naive_s_per_fold_epoch" in out:
        out["speedup"] = out["naive_s_per_fold_epoch"] / per_fold_epoch
        out["naive_projected_schedule_s"] = out["naive_s_per_fold_epoch"] * n_fold_epochs
        print(f"speed-up vs naive: {out['speedup']:.1f}x; naive {args.schedule_folds}x{args.schedule_epochs} "
              f"schedule projected {out['naive_projected_schedule_s'] / 3600:.2f} h")
    print(f"projected {args.schedule_folds} folds x {args.schedule_epochs} epochs: {projected:.0f} s "
          f"({projected / 60:.1f} min)")
    if args.full:
        del engine
        out.update(run_full_schedule(args, x, y, subject, config))
    _write_json(args, out)
    return out


def _write_json(args, out):
    path = args.json or (os.path.join(os.environ["OUT"], "train_speed.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(out, indent=2, default=float))


def run_full_schedule(args, x, y, subject, config):
    """The whole ``--schedule-folds`` x ``--schedule-epochs`` schedule, timed from engine construction.

    With ``--checkpoint PATH`` it can span several processes (a device command is limited to 10
    minutes): each process runs at least one epoch and starts none after ``--time-limit`` seconds,
    saves the engine's state (atomically) and its own wall time to ``PATH.json``; the next
    process resumes from there. The reported total is the sum of the processes' wall times, each
    of which pays compilation again (also reported: the total without the repeated compilations).
    """
    config_full = config.replace(epochs=args.schedule_epochs)
    train_s, test_s = paper_like_folds(subject, args.schedule_folds)
    log_path = Path(f"{args.checkpoint}.json") if args.checkpoint else None
    log = json.loads(log_path.read_text()) if log_path and log_path.exists() else {"processes": []}
    t0 = time.perf_counter()
    helpers = start_timed_work(args)
    eng = make_engine(args.model, x, y, train_s, test_s, args, config_full, helpers=helpers)
    sync(args.device)
    t_built = time.perf_counter()
    if args.checkpoint and Path(args.checkpoint).exists():
        eng.load_state(args.checkpoint)
    first_epoch = eng.epoch + 1
    report = ColdStartReport(eng) if args.cold_start_report else None
    epoch_s, log_extra, reported = [], {}, False
    while eng.epoch < args.schedule_epochs and (not epoch_s or time.perf_counter() - t0 < args.time_limit):
        t_epoch = time.perf_counter()
        eng.run_epoch()
        sync(args.device)
        epoch_s.append(time.perf_counter() - t_epoch)
        if len(epoch_s) == 1 and report is not None:
            report.print()
            report.close()
        if not reported:
            reported = report_helpers(helpers, log_extra, eng)
    if args.checkpoint:
        eng.save_state(args.checkpoint)
    sync(args.device)
    # the first epoch of every process compiles (and captures); later ones are steady
    log["processes"].append({"epochs": [first_epoch, eng.epoch], "wall_s": time.perf_counter() - t0,
                             "build_s": t_built - t0,
                             "first_epoch_s": epoch_s[0] if epoch_s else None,
                             "steady_epoch_s": float(np.median(epoch_s[1:])) if len(epoch_s) > 1 else None,
                             **log_extra})
    if log_path:
        save_json(log_path, log)
    procs = log["processes"]
    res = {"schedule_processes": procs, "schedule_epochs_done": eng.epoch}
    print(f"schedule: epochs {first_epoch}-{eng.epoch} of {args.schedule_epochs} in this process, "
          f"{procs[-1]['wall_s']:.0f} s")
    if eng.epoch >= args.schedule_epochs:
        total = sum(p["wall_s"] for p in procs)
        recompiles = sum(p["first_epoch_s"] - p["steady_epoch_s"] for p in procs[1:]
                         if p["first_epoch_s"] and p["steady_epoch_s"])
        outcomes = eng.outcomes()
        res.update(measured_schedule_s=total, measured_schedule_one_process_s=total - recompiles,
                   weights_sha256=weights_digest(eng), cuda_rng_offset=rng_offset(eng),
                   best_epochs=[o.best_epoch for o in outcomes],
                   final_train_loss=[float(o.history["train_loss"].iloc[-1]) for o in outcomes])
        print(f"measured {args.schedule_folds} x {args.schedule_epochs} schedule: {total:.0f} s ({total / 60:.1f} min) "
              f"in {len(procs)} process(es); without the {len(procs) - 1} repeated compilation(s): "
              f"{total - recompiles:.0f} s ({(total - recompiles) / 60:.1f} min)")
    return res


if __name__ == "__main__":
    main()
