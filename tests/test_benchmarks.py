"""The benchmark scripts run, and the alternative they measure computes what the engine computes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from sleeplib.models import build_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_stacked_layout_matches_vmap_outputs_statistics_and_gradients():
    stacked = _load("stacked_layout")
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
        expected = run_vmap(p_vmap, b_vmap)
        got = stacked.stacked_forward(skeleton, p_stacked, b_stacked, x)
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


def test_stacked_layout_refuses_models_it_cannot_run():
    stacked = _load("stacked_layout")
    model = build_model("attnsleep_conformer")
    with pytest.raises(NotImplementedError, match="no handler for .*; use vmap"):
        stacked.stacked_forward(model, {}, {}, torch.zeros(2, 1, 1, 3000))


@pytest.mark.slow
def test_train_speed_runs_on_cpu_and_reports_its_figures(tmp_path):
    train_speed = _load("train_speed")
    out = tmp_path / "speed.json"
    train_speed.main(["--device", "cpu", "--n-samples", "120", "--batch", "16", "--folds", "2", "--epochs", "2",
                      "--naive-steps", "1", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["naive_s_per_fold_epoch"] > 0 and figures["batched_s_per_fold_epoch"] > 0
    assert figures["speedup"] == pytest.approx(figures["naive_s_per_fold_epoch"] / figures["batched_s_per_fold_epoch"])
    assert [set(t) for t in figures["phase_times"]] == [{"epoch", "full_steps_s", "last_batches_s", "evaluate_s"}] * 2
