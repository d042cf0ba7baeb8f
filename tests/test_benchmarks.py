"""The benchmark scripts run, and the alternative they measure computes what the engine computes."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from sleeplib.models import build_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if f"bench_{name}" in sys.modules:  # once per process: fold_conv_op registers torch.library ops
        return sys.modules[f"bench_{name}"]
    plain = sys.modules.get(name)  # already imported by another benchmark, by its plain name
    if plain is not None and Path(getattr(plain, "__file__", "")).resolve() == BENCHMARKS / f"{name}.py":
        sys.modules[f"bench_{name}"] = plain
        return plain
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks modules up by name
    sys.modules.setdefault(name, module)  # benchmarks import each other by plain name: one copy
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.parametrize("cl_convs, fused, align, windows, tce_contiguous, attention",
                         [(False, False, 8, True, False, False), (True, False, 8, True, False, False),
                          (True, False, 1, False, False, False), (True, True, 8, True, False, False),
                          (True, True, 8, False, False, False), (True, True, 8, True, True, False),
                          (True, True, 8, True, True, True)],
                         ids=["cudnn-grouped", "cl-convs", "cl-convs-unaligned", "cl-convs-fused",
                              "cl-convs-fused-strided-windows", "cl-convs-fused-tce-contiguous",
                              "cl-convs-fused-tce-contiguous-attention-op"])
def test_stacked_layout_matches_vmap_outputs_statistics_and_gradients(cl_convs, fused, align, windows, tce_contiguous,
                                                                       attention, monkeypatch):
    """With ``cl_convs`` the convolutions go through cl_conv_op (channels zero-padded to a multiple of
    ``align``; the first layers' windows from 16-byte chunks of the signal or, ``windows`` false, in
    place; the TCE's tensors copied to their own order with ``tce_contiguous``), with ``fused`` the
    MRCNN's batch norm and GELU through bn_act_op (their references on CPU; without dropout here, so
    max-pool and dropout are not fused: see the max-pool dropout test), with ``attention`` the TCE's
    attention through attention_op (its reference on CPU)."""
    stacked = _load("stacked_layout")
    monkeypatch.setattr(stacked, "FUSED", fused)
    monkeypatch.setattr(stacked, "ALIGN_CHANNELS", align)
    monkeypatch.setattr(stacked, "ALIGNED_WINDOWS", windows)
    monkeypatch.setattr(stacked, "TCE_CONTIGUOUS", tce_contiguous)
    monkeypatch.setattr(stacked, "ATTENTION_KERNEL", attention)
    attended = []
    monkeypatch.setattr(stacked, "attention_reference",
                        lambda *a: attended.append(a[3]) or _load("attention_op").attention_reference(*a))
    calls, eval_calls = [], []
    monkeypatch.setattr(stacked, "bn_act_cl", lambda *a: calls.append(a[-1]) or _load("bn_act_op").bn_act_cl(*a))
    monkeypatch.setattr(stacked, "bn_act_eval_cl",
                        lambda *a: eval_calls.append(a[-1]) or _load("bn_act_op").bn_act_eval_cl(*a))
    # float64: in float32 the two orders of summation can flip a max-pool's choice between two
    # nearly equal values (seen at batch 6), which reroutes a gradient and makes the check flaky
    torch.manual_seed(0)
    K = 3
    models = [build_model("attnsleep", dropout=0.0, mrcnn_dropout=0.0).double() for _ in range(K)]
    skeleton = models[0]
    assert stacked.supports(skeleton) and not stacked.supports(build_model("attnsleep_conformer"))
    params, buffers = stack_module_state(models)
    x = torch.randn(K, 6, 1, 3000, dtype=torch.float64) * 20

    def run_vmap(p, b):
        return vmap(lambda pp, bb, xx: functional_call(skeleton, (pp, bb), (xx,)))(p, b, x)

    for training in (True, False):
        skeleton.train(training)
        b_vmap = {n: t.clone() for n, t in buffers.items()}
        b_stacked = {n: t.clone() for n, t in buffers.items()}
        p_vmap = {n: t.detach().clone().requires_grad_() for n, t in params.items()}
        p_stacked = {n: t.detach().clone().requires_grad_() for n, t in params.items()}
        with torch.set_grad_enabled(training):  # the engine evaluates without gradients
            expected = run_vmap(p_vmap, b_vmap)
            got = stacked.stacked_forward(skeleton, p_stacked, b_stacked, x, cl_convs=cl_convs)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
        for name in buffers:  # running statistics move (training) or stay (eval) alike
            torch.testing.assert_close(b_stacked[name], b_vmap[name], rtol=1e-9, atol=1e-10)
        if training:
            expected.square().sum().backward()
            got.square().sum().backward()
            scale = max(p.grad.abs().max() for p in p_vmap.values() if p.grad is not None)
            for name, p in p_vmap.items():
                assert (p.grad is None) == (p_stacked[name].grad is None), name
                if p.grad is not None:  # biases right before a batch norm get only rounding noise
                    torch.testing.assert_close(p_stacked[name].grad, p.grad, rtol=1e-7, atol=1e-9 * float(scale))
    assert calls == ["gelu"] * 6 * fused  # the MRCNN's six BatchNorm -> GELU pairs, in training
    assert eval_calls == ["gelu"] * 6 * fused  # and in evaluation
    assert attended == [5] * 4 * attention  # two TCE layers, training and evaluation
    if fused:  # evaluation with gradients takes the plain path: the evaluation op has none
        skeleton.eval()
        stacked.stacked_forward(skeleton, p_stacked, b_stacked, x, cl_convs=cl_convs).sum().backward()
        assert eval_calls == ["gelu"] * 6


def test_stacked_layout_fuses_max_pool_and_dropout_in_training(monkeypatch):
    stacked = _load("stacked_layout")
    monkeypatch.setattr(stacked, "FUSED", True)
    calls = []
    monkeypatch.setattr(stacked, "max_pool_cl", lambda *a: calls.append(a[4:5]) or _load("cl_conv_op").max_pool_cl(*a))
    torch.manual_seed(0)
    models = [build_model("attnsleep", mrcnn_dropout=0.5) for _ in range(2)]
    params, buffers = stack_module_state(models)
    params = {n: t.detach().requires_grad_() for n, t in params.items()}
    out = stacked.stacked_forward(models[0], params, buffers, torch.randn(2, 3, 1, 3000), cl_convs=True)
    out.sum().backward()
    # every pooling with a dropout: the first of each branch with the branch's, the last with the
    # MRCNN's after the concatenation
    assert sorted(calls) == [(0.5,)] * 4 and torch.isfinite(out).all()
    assert [n for n, p in params.items() if "unused" not in n and (p.grad is None or not torch.isfinite(p.grad).all())] == []


def test_stacked_layout_draws_the_mrcnn_dropout_in_each_branch_last_max_pool(monkeypatch):
    """dropout(cat(small, large)) as each branch's last max-pool with that dropout: every output is 0 or
    the undropped one scaled by 1 / (1 - p), about p of them 0."""
    stacked = _load("stacked_layout")
    torch.manual_seed(0)
    models = [build_model("attnsleep", mrcnn_dropout=0.0).double() for _ in range(2)]  # no dropout inside the branches
    params, buffers = stack_module_state(models)
    mrcnn = models[0].feature_extractor
    x = (torch.randn(2, 4, 1, 3000, dtype=torch.float64) * 20).transpose(0, 1).permute(0, 3, 1, 2)  # (B, T, K, C)

    def output(fused, p):
        monkeypatch.setattr(stacked, "FUSED", fused)
        monkeypatch.setattr(mrcnn.dropout, "p", p)
        run = stacked._Run(params, {n: b.clone() for n, b in buffers.items()}, True, False, cl_convs=True)
        run.cl_mode = True
        return run(mrcnn, "feature_extractor.", x)

    plain, dropped = output(False, 0.0), output(True, 0.5)
    kept = dropped != 0
    assert dropped.shape == plain.shape and 0.4 < float(kept.double().mean()) < 0.6
    torch.testing.assert_close(dropped[kept], 2 * plain[kept])


@pytest.mark.slow
@pytest.mark.parametrize("flags, says", [(["--cl-convs"], "TCE convolutions by cl_conv_op, 1x1 convolutions by cl_conv_op"),
                                          (["--cl-convs", "--tce-cudnn", "--einsum-1x1"],
                                           "TCE convolutions by cuDNN, 1x1 convolutions by einsum"),
                                          (["--cl-convs", "--fused"], "MRCNN batch norm + GELU by bn_act_op, first "
                                           "max-pool + dropout by max_pool_cl, channels padded to a multiple of 8"),
                                          (["--cl-convs", "--attention-kernel"], "attention by attention_op")])
def test_stacked_layout_script_trains_on_cpu(tmp_path, flags, says):
    import subprocess

    out = tmp_path / "speed.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "stacked_layout.py"), "--device", "cpu", "--n-samples", "64",
                          "--batch", "16", "--folds", "2", "--epochs", "1", "--skip-naive", "--json", str(out), *flags],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert says in run.stdout and "s per fold-epoch" in run.stdout
    assert json.loads(out.read_text())["batched_s_per_fold_epoch"] > 0


def test_stacked_layout_warms_kernels_with_one_eager_step_and_evaluation(monkeypatch):
    """--warm-kernels' child: the engine's step and evaluation through stacked_forward, at the given shapes."""
    from sleeplib.train.fast import BatchedFolds

    stacked = _load("stacked_layout")
    monkeypatch.setattr(BatchedFolds, "_forward_all_eager", BatchedFolds._forward_all_eager)  # restored after
    monkeypatch.setattr(stacked, "FUSED", True)
    batches = []
    forward = stacked.stacked_forward
    monkeypatch.setattr(stacked, "stacked_forward", lambda m, p, b, x, **k: batches.append((m.training, x.shape[:2]))
                        or forward(m, p, b, x, **k))
    stacked.use_stacked_forward(cl_convs=True)
    assert stacked.warm_kernels(2, 8, 3000, 16, device="cpu") > 0
    assert batches == [(True, (2, 8)), (False, (2, 16)), (False, (2, 1))]  # training, evaluation chunks of 16


def test_stacked_layout_warm_kernels_child_gets_the_run_shapes_and_layout_flags(monkeypatch):
    import subprocess

    stacked = _load("stacked_layout")
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd: started.append(cmd))
    stacked._start_warming(["--device", "cuda", "--folds", "4", "--batch", "64", "--compile", "--cl-convs", "--fused",
                            "--tce-contiguous", "--lean-compile"])
    stacked._start_warming(["--full-only", "--schedule-folds", "10", "--folds", "3", "--cl-convs"])
    n = stacked.WARM_SHARDS
    assert len(started) == 2 * n
    assert [c[2:] for c in started[:n]] == [["--warm-kernels-child", "4", "64", "3000", f"{i}/{n}", "--cl-convs", "--fused",
                                             "--tce-contiguous"] for i in range(n)]
    assert started[n][2:] == ["--warm-kernels-child", "10", "128", "3000", f"0/{n}", "--cl-convs"]  # the schedule's folds


def test_stacked_layout_configure_sets_the_layout_from_the_flags(monkeypatch):
    """One reading of the layout flags, for the script, its warming children and conv_layouts.py."""
    stacked = _load("stacked_layout")
    names = ("CL_OUTSIDE", "EINSUM_1X1", "FUSED", "ALIGN_CHANNELS", "ALIGNED_WINDOWS", "TCE_CONTIGUOUS", "ATTENTION_KERNEL")
    for name in names:  # restored after the test
        monkeypatch.setattr(stacked, name, getattr(stacked, name))
    monkeypatch.setattr(stacked.cl_conv_op, "TMA", stacked.cl_conv_op.TMA)
    assert stacked.configure(["--device", "cuda", "--cl-convs", "--fused", "--attention-kernel", "--no-tma"])
    assert [getattr(stacked, n) for n in names] == [True, False, True, 8, True, False, True]
    assert stacked.cl_conv_op.TMA is False
    assert not stacked.configure(["--tce-cudnn", "--einsum-1x1", "--unaligned", "--strided-windows", "--tce-contiguous"])
    assert [getattr(stacked, n) for n in names] == [False, True, False, 1, False, True, False]
    assert stacked.cl_conv_op.TMA is True

    def layout(flags):
        cl = stacked.configure(flags)
        return cl, [getattr(stacked, n) for n in names], stacked.cl_conv_op.TMA

    # every flag of the table that scripts declare (add_layout_flags) changes what configure sets
    assert set(stacked._OWN_FLAGS) == set(stacked.LAYOUT_FLAGS)
    assert [flag for flag in stacked.LAYOUT_FLAGS if layout([flag]) == layout([])] == []
    parser = argparse.ArgumentParser()
    stacked.add_layout_flags(parser)
    assert vars(parser.parse_args(["--fused", "--no-tma"])) == {f[2:].replace("-", "_"): f in ("--fused", "--no-tma")
                                                               for f in stacked.LAYOUT_FLAGS}


def test_conv_layouts_declares_the_stacked_layout_flags():
    import subprocess

    run = subprocess.run([sys.executable, str(BENCHMARKS / "conv_layouts.py"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert all(flag in run.stdout for flag in _load("stacked_layout").LAYOUT_FLAGS)
    assert "--lean-compile" in run.stdout and "--compile-config" in run.stdout  # train_speed's, shared


def test_stacked_layout_shares_the_triton_cache_inductor_would_use(monkeypatch):
    """The warming children must write where the engine's process, once inductor has loaded a kernel, reads."""
    import os

    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

    stacked = _load("stacked_layout")
    monkeypatch.setenv("TRITON_CACHE_DIR", "recorded")  # so that teardown restores what was there
    monkeypatch.delenv("TRITON_CACHE_DIR")
    expected = triton_cache_dir(0)
    assert stacked.share_triton_cache() == expected == os.environ["TRITON_CACHE_DIR"]
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")  # a user's choice stays
    assert stacked.share_triton_cache() == "/somewhere/else"


def test_stacked_layout_warming_shards_split_the_launches_between_them(monkeypatch):
    """Each warming child runs only its shard of the Triton launches; together they run each once."""
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    stacked = _load("stacked_layout")
    ran = []
    kernels = [SimpleNamespace(fn=SimpleNamespace(__qualname__=name)) for name in ("conv_cl", "pool_fwd", "normalise")]
    launches = [(kern, (torch.zeros(n), n), {"BM": bm}) for kern in kernels for n in (1, 16, 17) for bm in (64, 128)]
    per_shard = []
    for shard in range(3):
        ran.clear()
        monkeypatch.setattr(JITFunction, "run", lambda self, *a, grid, warmup, **k: ran.append(self.fn.__qualname__))
        stacked.compile_only_shard(shard, 3)
        for kern, args, kw in launches:
            JITFunction.run(kern, *args, grid=(1,), warmup=False, **kw)
        per_shard.append(len(ran))
    assert sum(per_shard) == len(launches) and max(per_shard) < len(launches)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_stacked_layout_split_params_are_the_engine_views_with_the_same_gradient(backend):
    from types import SimpleNamespace

    from sleeplib.train.fast import BatchedFolds

    stacked = _load("stacked_layout")
    shapes = [(3, 2), (4,), (2, 1, 5), (1,)]
    engine = SimpleNamespace(param_names=["a", "b", "c", "d"], param_shapes=shapes,
                             param_sizes=[int(torch.tensor(s).prod()) for s in shapes])
    flat = torch.randn(3, sum(engine.param_sizes), dtype=torch.float64, requires_grad=True)

    def loss(split):
        p = split(engine, flat)
        return (p["b"].sin().sum() + p["c"].exp().sum()) * 2 + 0 * p["d"].sum(), p  # "a" unused: no gradient

    fn = loss if backend is None else torch.compile(loss, backend=backend)
    got, pieces = fn(stacked.split_params)
    want, views = loss(lambda e, f: BatchedFolds._params(e, f))
    for name in views:
        torch.testing.assert_close(pieces[name], views[name])
    torch.testing.assert_close(torch.autograd.grad(got, flat), torch.autograd.grad(want, flat))


def test_stacked_layout_refuses_models_it_cannot_run():
    stacked = _load("stacked_layout")
    model = build_model("attnsleep_conformer")
    with pytest.raises(NotImplementedError, match="no handler for .*; use vmap"):
        stacked.stacked_forward(model, {}, {}, torch.zeros(2, 1, 1, 3000))


@pytest.mark.slow
def test_train_speed_runs_on_cpu_and_reports_its_figures(tmp_path, capsys):
    train_speed = _load("train_speed")
    out = tmp_path / "speed.json"
    train_speed.main(["--device", "cpu", "--n-samples", "120", "--batch", "16", "--folds", "2", "--epochs", "2",
                      "--naive-steps", "1", "--cold-start-report", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["naive_s_per_fold_epoch"] > 0 and figures["batched_s_per_fold_epoch"] > 0
    assert figures["speedup"] == pytest.approx(figures["naive_s_per_fold_epoch"] / figures["batched_s_per_fold_epoch"])
    assert [set(t) for t in figures["phase_times"]] == [{"epoch", "full_steps_s", "last_batches_s", "evaluate_s"}] * 2
    # the first epoch's phases: every full step eager (no CUDA graph on CPU), one evaluation
    cold = figures["cold_start"]
    assert cold["_step"]["calls"] == figures["steps_per_epoch"] and cold["evaluate"]["calls"] == 1
    assert 0 < cold["_step"]["total_s"] < figures["batched_epoch_s"][0]
    assert isinstance(cold["compile_caches"], dict)  # the compiled graphs' cache hits and misses (none: no compile)
    assert "first epoch, wall time by phase" in capsys.readouterr().out


def test_cold_start_report_times_calls_then_gives_the_engine_its_methods_back():
    from types import SimpleNamespace

    train_speed = _load("train_speed")

    class Engine:
        device = torch.device("cpu")

        def _step(self): return "stepped"  # noqa: E704
        def _capture(self): pass  # noqa: E704
        def _last_batches(self): return "last"  # noqa: E704
        def evaluate(self): return SimpleNamespace()  # noqa: E704

    engine = Engine()
    report = train_speed.ColdStartReport(engine)
    assert engine._step() == "stepped" and engine._last_batches() == "last"
    engine._step()
    summary = report.summary()
    assert summary["_step"]["calls"] == 2 and summary["_last_batches"]["calls"] == 1 and "evaluate" not in summary
    assert "first_backward_s" not in summary  # no compiled forward: nothing to split the step by
    report.close()
    assert "_step" not in vars(engine) and engine._step.__func__ is Engine._step
    engine._step()
    assert report.summary()["_step"]["calls"] == 2  # no longer timed


def test_cold_start_report_splits_the_first_step_and_restores_the_engines_own_attributes(capsys):
    import time as time_module

    train_speed = _load("train_speed")

    def forward():
        time_module.sleep(0.05)

    def update():
        time_module.sleep(0.02)

    class Engine:
        device = torch.device("cpu")

        def __init__(self):
            self._compiled_forward, self._update = forward, update  # set per instance, as BatchedFolds does

        def _step(self):
            self._compiled_forward()
            time_module.sleep(0.03)  # the backward
            self._update()

    engine = Engine()
    report = train_speed.ColdStartReport(engine)
    engine._step()
    summary = report.summary()
    assert summary["_compiled_forward"]["first_s"] >= 0.05 and summary["_update"]["first_s"] >= 0.02
    assert 0.03 <= summary["first_backward_s"] < summary["_step"]["first_s"] - 0.07
    report.print()
    assert "first step: compiled forward" in capsys.readouterr().out
    report.close()
    assert engine._compiled_forward is forward and engine._update is update


def test_compile_config_sets_torch_compiler_options_and_names_what_is_wrong():
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    train_speed = _load("train_speed")
    # the config modules' own patch restores them (pytest's monkeypatch would delete the options)
    touched = ("size_asserts", "loop_ordering_after_fusion", "fx_graph_cache", "triton.autotune_pointwise")
    before = (inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache)
    with inductor_config.patch({name: inductor_config.get_config_copy()[name] for name in touched}), \
            functorch_config.patch(enable_autograd_cache=functorch_config.enable_autograd_cache):
        train_speed.set_compile_config("inductor.size_asserts=False")
        train_speed.set_compile_config("triton.autotune_pointwise=False")
        train_speed.set_compile_config("functorch.enable_autograd_cache=0")
        assert (inductor_config.size_asserts, inductor_config.triton.autotune_pointwise,
                functorch_config.enable_autograd_cache) == (False, False, 0)
        with pytest.raises(SystemExit, match="has no option 'no_such_option'"):
            train_speed.set_compile_config("inductor.no_such_option=1")
        with pytest.raises(SystemExit, match="MODULE one of inductor, functorch, dynamo, triton"):
            train_speed.set_compile_config("size_asserts=False")
        for setting in train_speed.LEAN_COMPILE:  # every option of --lean-compile exists in this torch
            train_speed.set_compile_config(setting)
    assert (inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache) == before  # restored


def test_compile_flags_apply_lean_compile_then_each_setting():
    import argparse

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    train_speed = _load("train_speed")
    parser = argparse.ArgumentParser()
    train_speed.add_compile_flags(parser)
    args = parser.parse_args(["--lean-compile", "--coordinate-descent", "--compile-config", "inductor.size_asserts=True"])
    touched = ("size_asserts", "loop_ordering_after_fusion", "fx_graph_cache", "triton.autotune_pointwise",
               "coordinate_descent_tuning", "comprehensive_padding")
    with inductor_config.patch({name: inductor_config.get_config_copy()[name] for name in touched}), \
            functorch_config.patch(enable_autograd_cache=functorch_config.enable_autograd_cache):
        train_speed.apply_compile_flags(args)
        # --lean-compile's options, then the explicit setting over them
        assert (inductor_config.loop_ordering_after_fusion, inductor_config.size_asserts) == (False, True)
        assert inductor_config.coordinate_descent_tuning is True
        inductor_config.size_asserts = not inductor_config.size_asserts
        train_speed.apply_compile_flags(parser.parse_args([]))  # no flags: nothing set
        assert inductor_config.size_asserts is False


def test_step_timeline_counts_the_short_kernels_by_name():
    conv_layouts = _load("conv_layouts")

    class Span:
        def __init__(self, start, us):
            self.start, self.us = start, us

        def elapsed_us(self):
            return self.us

    class Event:
        device_type = "DeviceType.CUDA"

        def __init__(self, name, start, us):
            self.name, self.time_range = name, Span(start, us)

    class Prof:
        def events(self):
            kernels = [("conv", 100.0), ("copy", 2.0), ("cast", 1.5), ("copy", 3.0)]
            return [Event(n, 10 * i + step * 1000, us) for step in range(2) for i, (n, us) in enumerate(kernels)]

    text = conv_layouts.step_timeline(Prof(), 2)
    assert "4 kernels, 106 us" in text and "100.0 us  conv" in text
    assert "kernels of < 8 us: 3, 6 us" in text
    assert text.index("   2      5.0 us  copy") < text.index("   1      1.5 us  cast")  # most calls first


@pytest.mark.slow
def test_train_speed_full_schedule_resumes_across_processes(tmp_path):
    train_speed = _load("train_speed")
    ckpt = tmp_path / "state.pt"
    args = ["--device", "cpu", "--n-samples", "120", "--batch", "16", "--folds", "2", "--skip-naive", "--full-only",
            "--schedule-folds", "2", "--schedule-epochs", "2", "--checkpoint", str(ckpt), "--time-limit", "0"]
    first = train_speed.main(args + ["--json", str(tmp_path / "a.json")])  # one epoch, then stop
    assert first["schedule_epochs_done"] == 1 and "measured_schedule_s" not in first
    second = train_speed.main(args + ["--json", str(tmp_path / "b.json")])
    procs = second["schedule_processes"]
    assert [p["epochs"] for p in procs] == [[1, 1], [2, 2]]
    assert second["measured_schedule_s"] == pytest.approx(sum(p["wall_s"] for p in procs))
    assert len(second["best_epochs"]) == 2 and json.loads(ckpt.with_name("state.pt.json").read_text())["processes"] == procs


def _run_interpreted(script):
    """Run ``script`` in a fresh Python with Triton's CPU interpreter on; it must print "ok" last."""
    import os
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


# ---------------------------------------------------------------- fold_conv_op (Triton conv kernels)
FOLD_CONV_CASES = [  # (G, B, C, O, L, k, stride, padding, l_out or None for conv1d's)
    (2, 3, 4, 5, 37, 8, 1, 4, None),      # MRCNN's padded convolutions
    (2, 2, 1, 6, 300, 50, 6, 24, None),   # a first layer: one channel, long strided kernel
    (3, 2, 3, 4, 20, 7, 1, 6, 20),        # causal: left padding only, output as long as the input
    (2, 2, 5, 3, 9, 1, 1, 0, None),       # 1x1
    (1, 2, 1, 4, 340, 40, 5, 20, None),
]


def _fold_conv_expected(x, w, stride, padding, l_out):
    G = x.shape[0]
    right = max((l_out - 1) * stride + w.shape[-1] - x.shape[-1] - padding, 0)
    xp = torch.nn.functional.pad(x, (padding, right))
    return torch.stack([torch.nn.functional.conv1d(xp[g], w[g], stride=stride)[..., :l_out] for g in range(G)])


@pytest.mark.parametrize("case", FOLD_CONV_CASES)
def test_fold_conv_op_matches_conv1d_with_gradients(case):
    op = _load("fold_conv_op")
    G, B, C, O, L, k, s, p, l_out = case
    l_out = l_out or (L + 2 * p - k) // s + 1
    torch.manual_seed(0)
    x = torch.randn(G, B, C, L, dtype=torch.float64, requires_grad=True)
    w = torch.randn(G, O, C, k, dtype=torch.float64, requires_grad=True)
    got = op.conv1d_folds(x, w, s, p, l_out)
    want = _fold_conv_expected(x, w, s, p, l_out)
    torch.testing.assert_close(got, want)
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), (x, w)),
                               torch.autograd.grad((want * gy).sum(), (x, w)))


def test_fold_conv_kernels_in_the_triton_interpreter(tmp_path):
    """The Triton kernels themselves (forward, input and weight gradients), run by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    script = f"""
import sys, torch
sys.path.insert(0, {str(BENCHMARKS)!r}); sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import fold_conv_op as op
from test_benchmarks import FOLD_CONV_CASES, _fold_conv_expected
op.conv1d_folds_reference = None  # the kernels must do the work
assert op.kernels_usable(torch.zeros(1))
for G, B, C, O, L, k, s, p, l_out in FOLD_CONV_CASES:
    l_out = l_out or (L + 2 * p - k) // s + 1
    torch.manual_seed(0)
    x = torch.randn(G, B, C, L, requires_grad=True)
    w = torch.randn(G, O, C, k, requires_grad=True)
    got, want = op.conv1d_folds(x, w, s, p, l_out), _fold_conv_expected(x, w, s, p, l_out)
    gy = torch.randn_like(want)
    pairs = zip((got, *torch.autograd.grad((got * gy).sum(), (x, w))), (want, *torch.autograd.grad((want * gy).sum(), (x, w))))
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
print("ok")
"""
    _run_interpreted(script)


# ---------------------------------------------------------------- cl_conv_op (channels-last Triton convolutions)
CL_CONV_CASES = [  # (G, B, C, O, L, k, left padding, l_out)
    (2, 3, 16, 32, 13, 8, 4, 14),   # MRCNN's: kernel 8, padding 4 on both sides
    (3, 2, 30, 30, 10, 7, 6, 10),   # causal, 30 channels (not a multiple of the tile)
    (2, 2, 20, 24, 9, 4, 2, 8),     # padding on the left only partly used on the right
    (2, 3, 32, 16, 12, 1, 0, 12),   # 1x1
    (1, 70, 16, 16, 5, 3, 1, 5),    # many samples: several weight-gradient splits
]


def _cl_case(case, dtype):
    G, B, C, O, L, k, pad, l_out = case
    torch.manual_seed(0)
    # x (G, B, L, C) as a view of (B, L, G, C) memory, w (G, k, C, O) as a view of (G, O, C, k), as the engine passes them
    x = torch.randn(B, L, G, C, dtype=dtype).permute(2, 0, 1, 3).requires_grad_()
    w = torch.randn(G, O, C, k, dtype=dtype, requires_grad=True)
    return x, w, pad, l_out


def _cl_conv_expected(x, w, pad, l_out):
    """Per fold ``conv1d`` of channels-first copies, zero-padded (``w`` in ``(G, O, C, k)``)."""
    k, L = w.shape[-1], x.shape[2]
    xf = torch.nn.functional.pad(x.permute(0, 1, 3, 2), (pad, max(l_out + k - 1 - L - pad, 0)))
    return torch.stack([torch.nn.functional.conv1d(xf[g], w[g])[..., :l_out] for g in range(x.shape[0])]).transpose(2, 3)


@pytest.mark.parametrize("case", CL_CONV_CASES)
def test_cl_conv_op_matches_conv1d_with_gradients(case):
    op = _load("cl_conv_op")
    x, w, pad, l_out = _cl_case(case, torch.float64)
    got = op.conv1d_cl(x, w.permute(0, 3, 2, 1), pad, l_out)
    want = _cl_conv_expected(x, w, pad, l_out)
    torch.testing.assert_close(got, want)
    assert got.permute(1, 2, 0, 3).is_contiguous()  # (B, L, G, O) memory, the engine's layout
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), (x, w)),
                               torch.autograd.grad((want * gy).sum(), (x, w)))
    # the weight gradient op: its fake (what torch.compile traces with) has the real shape and dtype
    torch.library.opcheck(op._conv1d_cl_grad_weight, (gy.detach(), x.detach(), pad, w.shape[-1]),
                          test_utils=("test_schema", "test_faketensor"))


WINDOW_CASES = [(2, 3, 60, 8, 3, 5), (3, 2, 130, 20, 5, 4), (2, 2, 50, 9, 9, 3)]  # G, B, L, kernel, stride, O


def _windows_case(case, dtype):
    G, B, L, kernel, stride, O = case
    torch.manual_seed(0)
    signal = torch.randn(G, B, L, dtype=dtype, requires_grad=True)
    w = torch.randn(G, kernel, O, dtype=dtype, requires_grad=True)
    return signal, w, stride, (L - kernel) // stride + 1


def _windows_expected(signal, w, stride, l_out):
    return torch.stack([torch.nn.functional.conv1d(signal[g].unsqueeze(1), w[g].t().unsqueeze(1), stride=stride)
                        for g in range(signal.shape[0])]).transpose(2, 3)[:, :, :l_out]


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_cl_conv_windows_matches_strided_conv1d_with_gradients(case):
    op = _load("cl_conv_op")
    signal, w, stride, l_out = _windows_case(case, torch.float64)
    got, want = op.conv1d_windows(signal, w, stride, l_out), _windows_expected(signal, w, stride, l_out)
    torch.testing.assert_close(got, want)
    assert got.permute(1, 2, 0, 3).is_contiguous()
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), (signal, w)),
                               torch.autograd.grad((want * gy).sum(), (signal, w)))
    with pytest.raises(ValueError, match="need .* samples, the signal has .* \\(pad it first\\)"):
        op.conv1d_windows(signal, w, stride, l_out + 1)


def test_cl_conv_row_alignment_is_what_every_row_start_is_a_multiple_of():
    """The kernels' X_ALIGN hint (vector loads): wrong, they would read misaligned rows on a GPU."""
    op = _load("cl_conv_op")
    flat = torch.zeros(2, 3, 8 * 40)
    windows = lambda t, step: t.as_strided((2, 3, 30, 16), (t.shape[1] * t.shape[2], t.shape[2], step, 1),  # noqa: E731
                                           t.storage_offset())
    assert op._row_alignment(windows(flat, 8)) == 8  # the aligned chunks of the first layers
    assert op._row_alignment(windows(flat, 6)) == 2  # windows 6 samples apart (the small branch's stride)
    assert op._row_alignment(windows(flat[..., 4:], 8)) == 4  # a view that starts mid-row
    assert op._row_alignment(torch.zeros(4, 2, 10, 20, 32).select(2, 3).permute(1, 0, 2, 3)) == 8


POOL_CASES = [(3, 37, 20, 8, 2, 4), (2, 31, 24, 4, 4, 2), (2, 16, 5, 2, 2, 1), (2, 30, 7, 3, 1, 1)]  # B, L, G, k, s, p


@pytest.mark.parametrize("case", POOL_CASES)
def test_cl_max_pool_matches_max_pool1d_with_gradients(case):
    op = _load("cl_conv_op")
    B, L, G, k, s, p = case
    torch.manual_seed(0)
    x = torch.randn(B, L, G, dtype=torch.float64, requires_grad=True)
    got, offsets = op.max_pool_cl(x, k, s, p)
    want = torch.nn.functional.max_pool1d(x.transpose(1, 2), k, s, p).transpose(1, 2)
    torch.testing.assert_close(got, want)
    assert offsets.dtype == torch.int8 and int(offsets.min()) >= 0 and int(offsets.max()) < k
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), x), torch.autograd.grad((want * gy).sum(), x))


def _check_pool_dropout(op, x, k, s, p, drop=0.5):
    """max_pool_cl with dropout: kept outputs are the maxima over (1 - drop), dropped ones 0 with offset
    -1, about ``drop`` of them dropped, the gradient that of that product; a seed repeats its mask."""
    seed = torch.tensor([1234])
    got, offsets = op.max_pool_cl(x, k, s, p, drop, seed)
    kept = offsets >= 0
    pooled = torch.nn.functional.max_pool1d(x.transpose(1, 2), k, s, p).transpose(1, 2)
    want = torch.where(kept, pooled / (1 - drop), 0)
    torch.testing.assert_close(got, want)
    assert abs(float(kept.double().mean()) - (1 - drop)) < 0.1
    assert torch.equal(op.max_pool_cl(x, k, s, p, drop, seed)[1], offsets)
    assert not torch.equal(op.max_pool_cl(x, k, s, p, drop, torch.tensor([99]))[1], offsets)
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), x), torch.autograd.grad((want * gy).sum(), x))


def test_cl_max_pool_with_dropout():
    op = _load("cl_conv_op")
    torch.manual_seed(0)
    _check_pool_dropout(op, torch.randn(4, 37, 20, dtype=torch.float64, requires_grad=True), 8, 2, 4)
    with pytest.raises(ValueError, match="one-element seed"):
        op.max_pool_cl(torch.zeros(1, 8, 2), 2, 2, 0, 0.5)
    with pytest.raises(ValueError, match="0 <= drop < 1"):
        op.max_pool_cl(torch.zeros(1, 8, 2), 2, 2, 0, 1.0, torch.tensor([1]))


def test_cl_conv_kernels_in_the_triton_interpreter():
    """The Triton kernels themselves (convolution: forward, input and weight gradients; max-pool:
    forward and backward), run by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    script = f"""
import sys, torch
sys.path.insert(0, {str(BENCHMARKS)!r}); sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import cl_conv_op as op
from test_benchmarks import CL_CONV_CASES, POOL_CASES, WINDOW_CASES, _check_pool_dropout, _cl_case, _cl_conv_expected, _windows_case, _windows_expected
op.conv1d_cl_reference = op._windows_reference = None  # the kernels must do the work
assert op.kernels_usable(torch.zeros(1))
tma_calls = []
for name in ("_run_conv_tma", "_grad_weight_tma"):
    def counted(*args, _f=getattr(op, name), _name=name, **kw):
        tma_calls.append((_name, args[2] if _name == "_run_conv_tma" else None))
        return _f(*args, **kw)
    setattr(op, name, counted)
op.TMA_MIN_ROWS = 1  # the descriptor kernels for these short rows too
for op.TMA in (False, True):  # pointer loads; tensor descriptors where the strides allow
    for case in CL_CONV_CASES:
        x, w, pad, l_out = _cl_case(case, torch.float32)
        # weights contiguous, as the engine packs them (a tensor map needs 16-byte strides)
        got, want = op.conv1d_cl(x, w.permute(0, 3, 2, 1).contiguous(), pad, l_out), _cl_conv_expected(x, w, pad, l_out)
        gy = torch.randn_like(want)
        pairs = zip((got, *torch.autograd.grad((got * gy).sum(), (x, w))), (want, *torch.autograd.grad((want * gy).sum(), (x, w))))
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        wgrad_args = (gy.detach().contiguous(), x.detach().contiguous(), pad, w.shape[-1])
        torch.library.opcheck(op._conv1d_cl_grad_weight, wgrad_args, test_utils=("test_faketensor",))
    if not op.TMA:
        assert not tma_calls
# forward, input gradient (flip) and weight gradient each by the descriptor kernels, in several cases
assert set(c for c in tma_calls if c[0] == "_run_conv_tma") == set([("_run_conv_tma", False), ("_run_conv_tma", True)])
assert sum(c[0] == "_grad_weight_tma" for c in tma_calls) >= 3, tma_calls
for case in WINDOW_CASES:  # the first layers: forward and weight gradient
    signal, w, stride, l_out = _windows_case(case, torch.float32)
    signal.requires_grad_(False)
    got, want = op.conv1d_windows(signal, w, stride, l_out), _windows_expected(signal, w, stride, l_out)
    gy = torch.randn_like(want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), w), torch.autograd.grad((want * gy).sum(), w), rtol=1e-4, atol=1e-4)
for B, L, G, k, s, p in POOL_CASES:  # the max-pool kernels: forward and backward
    x = torch.randn(B, L, G, requires_grad=True)
    got, _ = op.max_pool_cl(x, k, s, p)
    want = torch.nn.functional.max_pool1d(x.transpose(1, 2), k, s, p).transpose(1, 2)
    gy = torch.randn_like(want)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), x), torch.autograd.grad((want * gy).sum(), x))
_check_pool_dropout(op, torch.randn(4, 37, 20, requires_grad=True), 8, 2, 4)  # with dropout, the kernels' own mask
# the gradient of a slice of a concatenation (samples further apart than the pooled rows), read in place
x = torch.randn(3, 37, 20, requires_grad=True)
got = torch.cat([op.max_pool_cl(x, 4, 4, 2)[0], torch.zeros(3, 5, 20)], dim=1)
want = torch.cat([torch.nn.functional.max_pool1d(x.transpose(1, 2), 4, 4, 2).transpose(1, 2), torch.zeros(3, 5, 20)], dim=1)
gy = torch.randn_like(want)
torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), x), torch.autograd.grad((want * gy).sum(), x))
print("ok")
"""
    _run_interpreted(script)


# ---------------------------------------------------------------- bn_act_op (batch norm fused with its activation)
BN_ACT_CASES = [(37, 20, "gelu"), (200, 130, "gelu"), (64, 30, "relu"), (9, 3, "none")]  # rows, channels, activation


def _bn_act_case(R, N, dtype):
    torch.manual_seed(0)
    x = (torch.randn(R, N, dtype=dtype) * 3 + 5).requires_grad_()  # a mean far from 0: the shifted sums matter
    w = (torch.rand(N, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(N, dtype=dtype, requires_grad=True)
    return x, w, b, torch.randn(N, dtype=dtype) * 0.1 + 5


def _bn_act_expected(x, w, b, act):
    y = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    return {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "none": lambda t: t}[act](y)


def _bn_act_eval_expected(x, w, b, running_mean, running_var, act):
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, w, b, False, 0.1, 1e-5)
    return {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "none": lambda t: t}[act](y)


@pytest.mark.parametrize("case", BN_ACT_CASES)
def test_bn_act_op_matches_batch_norm_and_activation_with_gradients(case):
    op = _load("bn_act_op")
    R, N, act = case
    x, w, b, shift = _bn_act_case(R, N, torch.float64)
    got, mean, rstd = op.bn_act_cl(x, w, b, shift, 1e-5, act)
    want = _bn_act_expected(x, w, b, act)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(0, unbiased=False) + 1e-5))
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * gy).sum(), (x, w, b)),
                               torch.autograd.grad((want * gy).sum(), (x, w, b)))


@pytest.mark.parametrize("case", BN_ACT_CASES)
def test_bn_act_eval_op_is_the_evaluation_mode_batch_norm_and_activation(case):
    op = _load("bn_act_op")
    R, N, act = case
    x, w, b, shift = _bn_act_case(R, N, torch.float64)
    running_var = torch.rand(N, dtype=torch.float64) * 4 + 0.5
    got = op.bn_act_eval_cl(x.detach(), w.detach(), b.detach(), shift, running_var, 1e-5, act)
    want = _bn_act_eval_expected(x.detach(), w.detach(), b.detach(), shift, running_var, act)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="act must be one of"):
        op.bn_act_eval_cl(x.detach(), w.detach(), b.detach(), shift, running_var, 1e-5, "tanh")


def test_bn_act_op_says_what_it_needs():
    op = _load("bn_act_op")
    x, w, b, shift = _bn_act_case(8, 4, torch.float64)
    with pytest.raises(ValueError, match="contiguous \\(rows, channels\\) matrix"):
        op.bn_act_cl(x.t(), w, b, shift, 1e-5, "gelu")
    with pytest.raises(ValueError, match="per-channel vectors of shape \\(4,\\)"):
        op.bn_act_cl(x, w[:3], b, shift, 1e-5, "gelu")
    with pytest.raises(ValueError, match="act must be one of"):
        op.bn_act_cl(x, w, b, shift, 1e-5, "tanh")


def test_bn_act_kernels_in_the_triton_interpreter():
    """The Triton kernels (statistics, normalisation, the two backward passes) in the CPU interpreter,
    with several row splits."""
    pytest.importorskip("triton")
    script = f"""
import sys, torch
sys.path.insert(0, {str(BENCHMARKS)!r}); sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import bn_act_op as op
from test_benchmarks import BN_ACT_CASES, _bn_act_case, _bn_act_expected, _bn_act_eval_expected
op.bn_act_reference = op._backward_reference = op.bn_act_eval_reference = None  # the kernels must do the work
assert op.kernels_usable(torch.zeros(1))
for R, N, act in BN_ACT_CASES:
    x, w, b, shift = _bn_act_case(R, N, torch.float32)
    assert op._blocks(x)[2] > 1 or R <= 8  # several row splits
    got, mean, _ = op.bn_act_cl(x, w, b, shift, 1e-5, act)
    want = _bn_act_expected(x, w, b, act)
    gy = torch.randn_like(want)
    torch.testing.assert_close(mean, x.mean(0))
    pairs = zip((got, *torch.autograd.grad((got * gy).sum(), (x, w, b))), (want, *torch.autograd.grad((want * gy).sum(), (x, w, b))))
    for a, e in pairs:
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    running_var = torch.rand(N) * 4 + 0.5  # evaluation mode: the running statistics
    got = op.bn_act_eval_cl(x.detach(), w.detach(), b.detach(), shift, running_var, 1e-5, act)
    want = _bn_act_eval_expected(x.detach(), w.detach(), b.detach(), shift, running_var, act)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

# the kernels' exact GELU (erf by Abramowitz & Stegun) and its derivative, across the range, in float64
import math, triton, triton.language as tl
from bn_act_op import _activate, _activate_grad

@triton.jit
def gelu_probe(z_ptr, y_ptr, d_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    z = tl.load(z_ptr + i)
    tl.store(y_ptr + i, _activate(z, 1))
    tl.store(d_ptr + i, _activate_grad(z, 1))

z = torch.linspace(-12, 12, 4096, dtype=torch.float64)
y, d = torch.empty_like(z), torch.empty_like(z)
gelu_probe[(1,)](z, y, d, N=4096)
zg = z.clone().requires_grad_()
exact = torch.nn.functional.gelu(zg)
(exact_grad,) = torch.autograd.grad(exact.sum(), zg)
assert (y - exact).abs().max() < 2e-6 and (d - exact_grad).abs().max() < 2e-6, ((y - exact).abs().max(), (d - exact_grad).abs().max())
print("ok")
"""
    _run_interpreted(script)


def _check_attention_kernels(op, N, T, heads, d, drop):
    """attention_cl against attention_reference with the kernels' own dropout mask, values and
    gradients. The mask is read off a first call whose values are the identity (needs T <= d):
    its output is then the dropped-out probabilities themselves."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(N, T, heads * d) for _ in range(3))
    seed = torch.tensor([77])
    eye = torch.eye(T, d).repeat(1, heads).expand(N, T, heads * d)
    probs, _ = op.attention_cl(q, k, eye, heads, drop, seed)
    keep = (probs.reshape(N, T, heads, d)[..., :T] != 0).transpose(1, 2)  # (N, heads, T, T)
    if drop:
        assert abs(float(keep.double().mean()) - (1 - drop)) < 0.1
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    got, _ = op.attention_cl(q, k, v, heads, drop, seed)
    want = op.attention_reference(q, k, v, heads, drop, keep=keep)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((got * gy).sum(), (q, k, v)), torch.autograd.grad((want * gy).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(op.attention_cl(q, k, v, heads, drop, seed)[0], got)  # the seed repeats the mask


def test_attention_op_reference_is_the_modules_attention():
    """attention_reference (the CPU path and the kernels' yardstick) is the TCE module's own attention
    when given the same projections; and the op says what it needs."""
    from sleeplib.models.blocks import CausalConvMultiHeadAttention

    op = _load("attention_op")
    torch.manual_seed(0)
    module = CausalConvMultiHeadAttention(5, 80, 30, dropout=0.0).eval()
    x = torch.randn(4, 30, 80)
    with torch.no_grad():
        q, k, v = x, module.key_conv(x), module.value_conv(x)
        heads = op.attention_reference(q, k, v, 5, 0.0)
        torch.testing.assert_close(module.out_proj(heads), module(x, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        op.attention_cl(q, k[:, :3], v, 5, 0.0)
    with pytest.raises(ValueError, match="one-element seed"):
        op.attention_cl(q, k, v, 5, 0.1)


def test_attention_kernels_in_the_triton_interpreter():
    pytest.importorskip("triton")
    script = f"""
import sys, torch
sys.path.insert(0, {str(BENCHMARKS)!r}); sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import attention_op as op
from test_benchmarks import _check_attention_kernels
assert op.kernels_usable(torch.zeros(1))
_check_attention_kernels(op, 3, 12, 2, 16, 0.0)
_check_attention_kernels(op, 3, 12, 2, 16, 0.3)
_check_attention_kernels(op, 2, 5, 3, 8, 0.2)  # rows and head widths below a tile's 16
print("ok")
"""
    _run_interpreted(script)


class _ConvNet(torch.nn.Module):
    """Strided, padded and causal Conv1d layers, BatchNorm, no dropout (so two runs can agree)."""

    def __init__(self, n_outputs=5, n_chans=1, sfreq=100.0, n_times=64):
        from sleeplib.models.blocks import CausalConv1d

        super().__init__()
        self.conv1 = torch.nn.Conv1d(n_chans, 4, 7, stride=3, bias=False)
        self.bn = torch.nn.BatchNorm1d(4)
        self.conv2 = torch.nn.Conv1d(4, 6, 5, padding=2)
        self.causal = CausalConv1d(6, 6, 3)
        self.fc = torch.nn.Linear(6, n_outputs)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.causal(torch.relu(self.conv2(h)))).mean(-1))


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fold_convs_train_in_the_engine_as_plain_convolutions(compiled):
    import numpy as np

    from sleeplib.train.config import TrainConfig
    from sleeplib.train.fast import BatchedFolds

    op = _load("fold_conv_op")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (120,), generator=g)
    x = torch.randn(120, 1, 64, generator=g) + y[:, None, None] * 0.5
    train, evals = [np.arange(0, 90), np.arange(30, 120)], [np.arange(90, 120), np.arange(0, 30)]
    cfg = TrainConfig(epochs=2, batch_size=32, progress=False, eval_batch_size=32)

    def swapped():
        model = _ConvNet()
        assert op.use_fold_convs(model) == 3
        return model

    flats = {}
    for name, model_fn in (("plain", _ConvNet), ("fold", swapped)):
        engine = BatchedFolds(model_fn, x, y, train, evals, None, cfg, compile=compiled)
        engine.fit()
        flats[name] = engine.flat.detach().clone()
        if name == "fold":
            assert type(engine.skeleton.causal).__name__ == "FoldCausalConv1d"
            assert list(engine.skeleton.state_dict()) == list(_ConvNet().state_dict())
    torch.testing.assert_close(flats["fold"], flats["plain"], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_fold_conv_benchmark_says_it_needs_cuda():
    with pytest.raises(SystemExit, match="CUDA"):
        _load("fold_conv").main(["--folds", "2", "--batch", "2"])


@pytest.mark.slow
def test_train_speed_runs_with_fold_convs_on_cpu(tmp_path):
    train_speed = _load("train_speed")
    out = train_speed.main(["--device", "cpu", "--n-samples", "120", "--batch", "16", "--folds", "2", "--epochs", "1",
                            "--skip-naive", "--fold-convs", "--json", str(tmp_path / "speed.json")])
    assert out["args"]["fold_convs"] and out["batched_s_per_fold_epoch"] > 0


def test_tma_only_for_two_byte_elements_on_the_gpu(monkeypatch):
    """On a GPU the descriptor kernels' blocks are sized for bf16: fp32 tensors (an fp32 run of the
    layout, e.g. the engine profile's) go to the pointer kernels instead of overflowing shared memory."""
    pytest.importorskip("triton")
    op = _load("cl_conv_op")

    class OnGpu:  # what _tma_usable reads of a CUDA tensor
        def __init__(self, t):
            self.t, self.is_cuda, self.device = t, True, "cuda:0"

        def element_size(self):
            return self.t.element_size()

        def stride(self, *dim):
            return self.t.stride(*dim)

        def data_ptr(self):
            return 0

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    bf16, fp32 = torch.zeros(2, 4, 16, dtype=torch.bfloat16), torch.zeros(2, 4, 16)
    assert op._tma_usable(OnGpu(bf16), OnGpu(bf16))
    assert not op._tma_usable(OnGpu(fp32), OnGpu(fp32))
    assert not op._tma_usable(OnGpu(bf16), OnGpu(fp32))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not op._tma_usable(OnGpu(bf16), OnGpu(bf16))


def test_conv_tma_probe_checks_both_kernels_in_the_interpreter():
    """``conv_tma_probe.py --check``: descriptor and pointer kernels (the latter through cl_conv_op's
    own launcher, with the probe's blocks) against the reference."""
    pytest.importorskip("triton")
    _run_interpreted(f"""
import re, runpy, sys, io, contextlib
sys.argv = ["conv_tma_probe.py", "--check"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    runpy.run_path({str(BENCHMARKS / "conv_tma_probe.py")!r}, run_name="__main__")
errors = [float(v) for v in re.findall(r"'\\w+': ([0-9.e-]+)", out.getvalue())]
assert len(errors) == 10 and max(errors) < 1e-4, out.getvalue()
print("ok")
""")


def test_conv_tma_probe_sweep_reports_failures_and_keeps_the_fastest(monkeypatch, capsys):
    probe = _load("conv_tma_probe")
    monkeypatch.setattr(probe, "_bench", lambda fn, reps=50: fn())

    def run(cfg):
        if cfg == "too big":
            raise RuntimeError("out of resource: shared memory")
        return {"a": 3.0, "b": 1.5}[cfg]

    assert probe._sweep("fwd", ["a", "too big", "b"], run) == ("b", 1.5)
    out = capsys.readouterr().out
    assert "fwd too big RuntimeError out of resource" in out and "'too big': inf" in out


def _tiny_two_fold_engines(dropout: float = 0.2):
    """A builder of BatchedFolds engines of test_train's TinyNet on two overlapping folds of 96 random
    epochs, each built afresh (dynamo reset, its counters cleared)."""
    import numpy as np
    from test_train import TinyNet
    from torch._dynamo.utils import counters

    from sleeplib.train.config import TrainConfig
    from sleeplib.train.fast import BatchedFolds

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 64, generator=g), torch.randint(0, 5, (96,), generator=g)
    rows = [np.arange(0, 64), np.arange(32, 96)]
    cfg = TrainConfig(epochs=1, batch_size=32, progress=False)

    def build(**kwargs):
        torch._dynamo.reset()
        counters.clear()
        return BatchedFolds(lambda: TinyNet(dropout=dropout), x, y, rows, rows, None, cfg, compile_eval=False, **kwargs)

    return build


@pytest.mark.slow
def test_compile_helper_hands_the_update_graph_over_through_inductors_cache(tmp_path, monkeypatch):
    """A helper compiles the update graph (the step's forward and backward run eagerly); the engine,
    waiting for its mark, finds the update in inductor's FX graph cache (a hit, not compiled again:
    the compiled forward's outputs feed it what the eager one's do) and trains to the weights a plain
    compiled engine trains to."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    helpers = _load("compile_helpers")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    build = _tiny_two_fold_engines()

    class Alive:
        def poll(self):
            return None

    marks = tmp_path / "marks"
    marks.mkdir()
    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=False):
        helper = build(compile=True, compile_backend=lambda name: helpers.helper_backend(name, marks)
                       if name == "update" else "eager")
        helpers.step_for_the_update(helper)  # the forward and backward eagerly, as the helper runs them
        assert (marks / "update.inference").exists() and counters["inductor"]["fxgraph_cache_miss"] == 1
        eager = build()
        eager._step()  # the helper's step is the eager step, its update compiled
        torch.testing.assert_close(helper.flat, eager.flat, rtol=1e-5, atol=1e-6)

        waits = helpers.Waits()
        waited = build(compile=True, compile_backend=lambda name: helpers.waiting_backend(
            name, marks, {"update.inference": Alive()}, waits, timeout=5))
        waited._step()
        assert counters["inductor"]["fxgraph_cache_hit"] == 1  # the update; forward and backward compiled here
        assert counters["inductor"]["fxgraph_cache_miss"] == 2
        assert waits.graphs["update.inference"][1] is True and "update.inference waited" in waits.summary()
        plain = build(compile=True)
        plain._step()
    torch.testing.assert_close(waited.flat, plain.flat, rtol=0, atol=0)


def test_compile_helper_wait_ends_at_the_mark_the_helpers_end_or_the_timeout(tmp_path):
    helpers = _load("compile_helpers")

    class Proc:
        def __init__(self, code):
            self.code = code

        def poll(self):
            return self.code

    assert helpers.wait_for_mark(tmp_path, "g", Proc(None), timeout=0.05)[1] is False  # timed out
    assert helpers.wait_for_mark(tmp_path, "g", Proc(1), timeout=30)[0] < 1  # ended without it: at once
    helpers._mark(tmp_path, "g")
    seconds, marked = helpers.wait_for_mark(tmp_path, "g", Proc(None), timeout=30)
    assert marked and seconds < 1
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # written atomically, no part file left


def test_compile_helpers_start_with_the_timed_build_as_processes_of_this_command_line(tmp_path, monkeypatch):
    """--compile-helpers starts one helper per role, this command line with its role and mark folder
    in the environment; the work registered in AT_START (the warming children) starts then, once."""
    helpers = _load("compile_helpers")
    train_speed = _load("train_speed")
    script = ("import os, pathlib; m = pathlib.Path(os.environ['SLEEPLIB_COMPILE_HELPER_MARKS']); "
              "(m / 'update.inference').write_text(os.environ['SLEEPLIB_COMPILE_HELPER'])")
    started = []
    monkeypatch.setattr(train_speed, "AT_START", [lambda: started.append(1)])
    monkeypatch.setattr(train_speed, "_HELPERS_STARTED", False)
    none = train_speed.start_timed_work(SimpleNamespace(compile_helpers=True, compile=False))
    assert none is None and started == [1] and train_speed.AT_START == []
    assert train_speed.start_timed_work(SimpleNamespace(compile_helpers=False, compile=True)) is None
    real, asked = helpers.Helpers, []
    monkeypatch.setattr(helpers, "Helpers", lambda forward_worker, backward_worker=False: asked.append(
        (forward_worker, backward_worker)) or real(["-c", script]))
    started_helpers = train_speed.start_timed_work(SimpleNamespace(compile_helpers=True, compile=True,
                                                                   no_forward_worker=False, device="cpu"))
    assert asked == [("cpu", False)]  # a forward worker for the run's device
    try:
        seconds, marked = helpers.wait_for_mark(started_helpers.marks, "update.inference",
                                                started_helpers.procs["update.inference"], timeout=60)
        assert marked and (started_helpers.marks / "update.inference").read_text() == "update"
        out = {}
        started_helpers.waits.graphs["update.inference"] = (seconds, marked)
        assert train_speed.report_helpers(started_helpers, out, SimpleNamespace(epoch=1, _step_ran_compiled=False))
        assert out["compile_helpers"]["update.inference"]["marked"] is True
        assert not started_helpers.marks.exists()  # closed: the marks removed
        # a later engine (--full's schedule after the timed epochs) gets no helper: it builds the first's shapes
        assert train_speed.start_timed_work(SimpleNamespace(compile_helpers=True, compile=True)) is None
    finally:
        started_helpers.close()
    monkeypatch.setattr(train_speed, "_HELPERS_STARTED", False)
    train_speed.start_timed_work(SimpleNamespace(compile_helpers=True, compile=True, no_forward_worker=True,
                                                 device="cuda:0")).close()
    assert asked == [("cpu", False), (None, False)]  # --no-forward-worker: none
    monkeypatch.setattr(train_speed, "_HELPERS_STARTED", False)
    train_speed.start_timed_work(SimpleNamespace(compile_helpers=True, compile=True, no_forward_worker=False,
                                                 train_while_compiling=True, device="cpu")).close()
    assert asked[-1] == ("cpu", True)  # --train-while-compiling: a backward worker too


def test_report_helpers_waits_for_the_compiled_step_when_training_while_compiling():
    """With a backward worker, the helpers are reported (and closed) after the first epoch whose
    steps ran the compiled step, not before: they may still be compiling."""
    from types import SimpleNamespace

    train_speed = _load("train_speed")
    closed = []
    worker = SimpleNamespace(log={"sent": True}, summary=lambda: "w")
    fake = SimpleNamespace(backward_worker=worker, worker=worker, waits=SimpleNamespace(graphs={}),
                           close=lambda: closed.append(1), summary=lambda: "s")
    out = {}
    assert not train_speed.report_helpers(fake, out, SimpleNamespace(epoch=1, _step_ran_compiled=False))
    assert closed == [] and out == {}
    assert train_speed.report_helpers(fake, out, SimpleNamespace(epoch=3, _step_ran_compiled=True))
    assert closed == [1] and set(out["compile_helpers"]) == {"step.forward", "step.backward"}
    assert train_speed.report_helpers(None, out, None)  # no helpers: nothing to wait for


@pytest.mark.slow
def test_forward_worker_compiles_the_step_forward_while_the_engine_compiles_the_backward(tmp_path, monkeypatch):
    """--compile-helpers' forward worker: the step's forward graph is sent to a process of its own and
    the backward lowered at once in the engine's process, before the forward's compiled code is
    waited for and loaded at its first call; the engine trains to the plain compiled engine's weights."""
    import torch._inductor.compile_fx as compile_fx

    helpers = _load("compile_helpers")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the worker's too: started after
    build = _tiny_two_fold_engines()

    events = []
    real_inner, real_load = compile_fx.compile_fx_inner, helpers.Pending._load
    monkeypatch.setattr(compile_fx, "compile_fx_inner", lambda gm, ex, **kw: events.append(
        helpers.graph_kind(kw)) or real_inner(gm, ex, **kw))
    monkeypatch.setattr(helpers.Pending, "_load", lambda self: events.append("load") or real_load(self))
    worker = helpers.GraphWorker("cpu")
    try:
        sent = build(compile=True, compile_backend=lambda name: helpers.waiting_backend(
            name, tmp_path, {}, helpers.Waits(), worker=worker))
        sent._step()
        sent._step()
    finally:
        worker.close()
    assert events == ["forward", "backward", "load", "inference"]  # sent, the backward at once, loaded, the update
    assert worker.log["sent"] is True and worker.log["compile_s"] > 0
    assert "compiled there in" in worker.summary()
    monkeypatch.setattr(compile_fx, "compile_fx_inner", real_inner)
    plain = build(compile=True)
    plain._step()
    plain._step()
    torch.testing.assert_close(sent.flat, plain.flat, rtol=0, atol=0)


@pytest.mark.slow
def test_engine_trains_eagerly_while_workers_compile_the_step(tmp_path, monkeypatch):
    """--train-while-compiling: the step's forward and backward are each sent to a worker process;
    the first step runs the traced graphs eagerly (the workers' Pending fallbacks), the next ones the
    engine's eager step while compiled_ready() is False, then the compiled step, loaded at its first
    call. Without dropout (the eager and compiled steps draw their masks differently) the engine
    trains to the plain compiled engine's weights, up to rounding; with dropout it trains too."""
    import time

    helpers = _load("compile_helpers")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def train(dropout: float):
        build = _tiny_two_fold_engines(dropout)
        hs = helpers.Helpers(["-c", "pass"], forward_worker="cpu", backward_worker=True)
        ran = []
        try:
            engine = build(compile=True, compile_backend=hs.backend_for, compiled_ready=hs.ready)
            engine._step()  # traced: both graphs sent, then run eagerly here
            ran.append(engine._step_ran_compiled)
            assert not hs.ready() and hs.worker.log["fallback_calls"] == 1 == hs.backward_worker.log["fallback_calls"]
            engine._step()  # the engine's eager step
            ran.append(engine._step_ran_compiled)
            t0 = time.perf_counter()
            while not hs.ready() and time.perf_counter() - t0 < 300:
                time.sleep(0.1)
            engine._step()  # compiled, loaded now
            ran.append(engine._step_ran_compiled)
            assert "loaded in" in hs.summary() and "1 call(s) run eagerly meanwhile" in hs.backward_worker.summary()
        finally:
            hs.close()
        assert ran == [True, False, True]  # the first call is the compiled function's (its tracing)
        return engine

    sent = train(0.0)
    plain = _tiny_two_fold_engines(0.0)(compile=True)
    for _ in range(3):
        plain._step()
    torch.testing.assert_close(sent.flat, plain.flat, rtol=1e-5, atol=1e-6)
    dropped = train(0.2)
    assert torch.isfinite(dropped.flat).all() and not torch.equal(dropped.flat, sent.flat)


@pytest.mark.slow
def test_forward_worker_keeps_the_traced_strides_of_attnsleeps_saved_convolutions(tmp_path, monkeypatch):
    """AttnSleep's forward compiled for the CPU in the worker: inductor would lay out some 4-d outputs
    of its choosing channels-last, convolutions' saved for the backward among them, which the
    backward lowered beside it reads with their traced strides (the stride check stopped the run);
    every output now keeps its traced strides. Without dropout (inductor draws each element's mask
    by its place in the kernel's layout, so masks differ with layouts) the engine trains as the
    plain compiled one does, up to rounding (the plain one's convolutions read some tensors
    channels-last)."""
    import numpy as np

    from sleeplib.models import build_model
    from sleeplib.train.config import get_recipe
    from sleeplib.train.fast import BatchedFolds

    helpers = _load("compile_helpers")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 3000, generator=g), torch.randint(0, 5, (48,), generator=g)
    rows = [np.arange(0, 32), np.arange(16, 48)]
    config = get_recipe("attnsleep", batch_size=16, progress=False)

    def build(**kwargs):
        torch._dynamo.reset()
        return BatchedFolds(lambda: build_model("attnsleep", n_times=3000, dropout=0.0, mrcnn_dropout=0.0), x, y,
                            rows, rows, None, config, compile=True, compile_eval=False, **kwargs)

    worker = helpers.GraphWorker("cpu")
    try:
        sent = build(compile_backend=lambda name: helpers.waiting_backend(name, tmp_path, {}, helpers.Waits(),
                                                                          worker=worker))
        sent._step()
    finally:
        worker.close()
    assert worker.log["sent"] is True
    plain = build()
    plain._step()
    torch.testing.assert_close(sent.loss_sum, plain.loss_sum, rtol=1e-5, atol=0)
    # Adam's first step moves a weight by lr * g / (|g| + eps): rounding shows only where g is about eps
    off = ((sent.flat - plain.flat).abs() > 1e-6).float().mean()
    assert off < 1e-4, f"{off:.2%} of the weights differ by more than 1e-6"


def test_forward_worker_checks_the_strides_the_backward_was_compiled_for():
    helpers = _load("compile_helpers")
    t = torch.zeros(4, 6)
    helpers.check_strides([t, 3, t.t()], [(6, 1), None, (1, 6)])  # as traced: nothing to say
    helpers.check_strides([torch.zeros(4, 1)], [(1, 7)])  # a size-1 dimension's stride is never used
    with pytest.raises(RuntimeError, match=r"output 1 with strides \(1, 6\).*compiled for \(6, 1\).*--lean-compile"):
        helpers.check_strides([t, t.t()], [(6, 1), (6, 1)])


def test_forward_worker_failure_says_how_to_compile_here():
    from concurrent.futures import Future

    helpers = _load("compile_helpers")
    failed = Future()
    failed.set_exception(RuntimeError("worker died"))
    pending = helpers.Pending(failed, None, None, {}, [])
    with pytest.raises(RuntimeError, match="forward failed to compile in the worker process.*worker died.*--no-forward-worker"):
        pending([])
    pending = helpers.Pending(failed, None, None, {}, [], label="backward")
    with pytest.raises(RuntimeError, match="backward failed to compile.*without --train-while-compiling"):
        pending([])


def test_pending_runs_the_traced_graph_as_compiled_code_is_called_until_it_is_back():
    """A Pending with a fallback, before its compiled code is back: the traced graph runs, called as
    compiled graphs are (the input list handed over and emptied), plain and boxed graphs alike."""
    from concurrent.futures import Future

    helpers = _load("compile_helpers")
    gm = torch.fx.symbolic_trace(lambda a, b: (a * b + 1,))
    boxed = torch.fx.symbolic_trace(lambda a, b: (a * b + 1,))
    boxed.graph.set_codegen(torch.fx.graph._BoxedCodeGen())
    boxed.recompile()
    for graph in (gm, boxed):
        log = {}
        pending = helpers.Pending(Future(), None, None, log, [None], fallback=graph)
        inputs = [torch.full((2,), 3.0), torch.full((2,), 2.0)]
        (out,) = pending(inputs)
        assert torch.equal(out, torch.full((2,), 7.0)) and inputs == [] and log["fallback_calls"] == 1


def test_graph_pickling_sends_any_operator_and_weak_caches_empty():
    """Inductor's graph pickler refuses operators outside torch.ops.aten and weak containers (the
    fake-tensor converter's memo, in a traced graph's example values); within graph_pickling both go."""
    import weakref

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler

    helpers = _load("compile_helpers")

    class Box:
        pass

    box = Box()
    obj = {"memo": weakref.WeakValueDictionary({"b": box}), "op": torch.ops.prims.convert_element_type.default}
    for part in ("memo", "op"):
        with pytest.raises(Exception):  # noqa: B017 - a PicklingError, AttributeError or BypassFxGraphCache
            GraphPickler.dumps({part: obj[part]})
    with helpers.graph_pickling():
        data = GraphPickler.dumps(obj)
    back = GraphPickler.loads(data, FakeTensorMode())
    assert back["op"] is torch.ops.prims.convert_element_type.default
    assert isinstance(back["memo"], weakref.WeakValueDictionary) and len(back["memo"]) == 0
    with pytest.raises(Exception):  # noqa: B017 - patched only within
        GraphPickler.dumps({"memo": obj["memo"]})


def test_compile_helper_builds_the_engine_of_the_command_lines_shapes(monkeypatch):
    """A helper process makes no dataset: it builds the command line's engine (its folds, batch and
    epoch length) on random epochs with the helper's backend, and runs one step, in which only the
    update is traced and compiled."""
    helpers = _load("compile_helpers")
    train_speed = _load("train_speed")
    built, asked, make_engine = [], [], train_speed.make_engine
    monkeypatch.setenv(helpers.ROLE_ENV, "update")
    compiled = []
    monkeypatch.setattr(helpers, "helper_backend_for", lambda: lambda name: asked.append(name) or (
        lambda gm, example_inputs: compiled.append(name) or gm.forward))
    monkeypatch.setattr(train_speed, "make_engine", lambda *a, **k: built.append(make_engine(*a, **k)) or built[-1])
    monkeypatch.setattr(train_speed, "synthetic_edf20", lambda *a: pytest.fail("a helper makes no dataset"))
    assert train_speed.main(["--device", "cpu", "--folds", "3", "--batch", "16", "--n-times", "3000",
                             "--compile", "--compile-helpers", "--skip-naive"]) == {}
    (engine,) = built
    assert (engine.K, engine.B, engine.x.shape[-1]) == (3, 16, 3000)
    assert asked == ["step", "update"] and int(engine.step_idx) == 1  # built with it, one step run
    assert compiled == ["update"]  # the forward and backward not traced: run eagerly
    monkeypatch.undo()
    monkeypatch.setenv(helpers.ROLE_ENV, "update")
    monkeypatch.setenv(helpers.MARKS_ENV, "unused")
    backend_for = helpers.helper_backend_for()
    assert backend_for("step") == "eager" and callable(backend_for("update"))  # the update alone compiled
    monkeypatch.setenv(helpers.ROLE_ENV, "nonsense")
    with pytest.raises(SystemExit, match="expected one of update"):
        helpers.helper_backend_for()
