"""Training engine: resume to the same weights, batched folds = per-fold Adam, run_cv round trip."""

import contextlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from sleeplib.train import ArraySet, TrainConfig, fit, load_cv, run_cv
from sleeplib.train.config import lr_factor
from sleeplib.train.fast import BatchedFolds


class TinyNet(nn.Module):
    """Stand-in for AttnSleep: conv + BatchNorm + dropout + linear, fast on CPU."""

    def __init__(self, n_outputs=5, n_chans=1, sfreq=100.0, n_times=64, dropout=0.2):
        super().__init__()
        self.conv = nn.Conv1d(n_chans, 4, 7, stride=3, bias=False)  # no bias before BN: its grad is noise
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4, n_outputs)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean(-1)))


def _data(n=160, t=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 1, t, generator=g) + y[:, None, None] * 0.5  # learnable signal
    return x, y


CFG = TrainConfig(epochs=4, batch_size=32, lr_milestones={2: 1e-4}, progress=False)


def test_lr_schedule_matches_attnsleep():
    cfg = TrainConfig()
    assert cfg.lr * lr_factor(cfg, 10) == pytest.approx(1e-3)
    assert cfg.lr * lr_factor(cfg, 11) == pytest.approx(1e-4)


@pytest.mark.slow
def test_resume_after_interruption_gives_identical_weights(tmp_path):
    x, y = _data()
    train, val = ArraySet.from_arrays(x[:120], y[:120]), ArraySet.from_arrays(x[120:], y[120:])
    torch.manual_seed(0)
    straight = fit(TinyNet(), train, val, config=CFG, class_weights=[1, 2, 1, 1, 1], out_dir=tmp_path / "a")
    torch.manual_seed(0)
    first = fit(TinyNet(), train, val, config=CFG, class_weights=[1, 2, 1, 1, 1], out_dir=tmp_path / "b", stop_after=2)
    assert len(first.history) == 2
    # "crash": a fresh process would rebuild the model from scratch and resume from the checkpoint
    torch.manual_seed(999)
    resumed = fit(TinyNet(), train, val, config=CFG, class_weights=[1, 2, 1, 1, 1], out_dir=tmp_path / "b")
    assert len(resumed.history) == 4
    for key in straight.best_state:
        assert torch.equal(straight.best_state[key], resumed.best_state[key]), key
    np.testing.assert_array_equal(straight.history["train_loss"], resumed.history["train_loss"])
    assert (tmp_path / "b" / "history.csv").exists()
    with pytest.raises(ValueError, match="different settings"):
        fit(TinyNet(), train, val, config=CFG.replace(lr=5e-3), out_dir=tmp_path / "b")


def test_finished_run_keeps_only_its_result_and_reloads_it(tmp_path):
    x, y = _data()
    train, val = ArraySet.from_arrays(x[:120], y[:120]), ArraySet.from_arrays(x[120:], y[120:])
    cfg = CFG.replace(epochs=2)
    done = fit(TinyNet(), train, val, config=cfg, out_dir=tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["optimizer"] is None and ckpt["model"] is None and ckpt["best_state"]
    again = fit(TinyNet(), train, val, config=cfg, out_dir=tmp_path)  # returns at once, same result
    assert again.best_epoch == done.best_epoch
    for key in done.best_state:
        assert torch.equal(done.best_state[key], again.best_state[key]), key
    with pytest.raises(ValueError, match="cannot continue to 3 epochs"):
        fit(TinyNet(), train, val, config=cfg.replace(epochs=3), out_dir=tmp_path)


@pytest.mark.slow
def test_training_learns_and_selects_best_epoch():
    x, y = _data(400)
    cfg = CFG.replace(epochs=6, lr_schedule="none", lr=1e-2)
    out = fit(TinyNet(dropout=0.0), ArraySet.from_arrays(x[:300], y[:300]), ArraySet.from_arrays(x[300:], y[300:]),
              config=cfg)
    assert out.history["train_loss"].iloc[-1] < out.history["train_loss"].iloc[0]
    assert out.best_score == out.history["val_accuracy"].max() > 0.3
    assert out.history["val_accuracy"].iloc[out.best_epoch - 1] == out.best_score


def test_early_stopping_and_grad_clip_run():
    x, y = _data()
    cfg = CFG.replace(epochs=20, early_stopping=1, grad_clip=0.5, lr=1e-6, lr_schedule="none")
    out = fit(TinyNet(), ArraySet.from_arrays(x[:100], y[:100]), ArraySet.from_arrays(x[100:], y[100:]), config=cfg)
    assert out.stopped_early and len(out.history) < 20


def test_batched_folds_equal_per_fold_adam():
    x, y = _data(300)
    train = [np.arange(0, 200), np.arange(50, 300)]  # different sizes: masked steps + short last batches
    evals = [np.arange(200, 300), np.arange(0, 50)]
    weights = [[1, 2, 1, 1, 1.5], [1, 1, 1, 1, 1]]
    cfg = CFG.replace(epochs=2, lr_milestones={1: 1e-4})
    engine = BatchedFolds(lambda: TinyNet(dropout=0.0), x, y, train, evals, weights, cfg, record_batches=True)
    outcomes = engine.fit()
    for k in range(2):
        torch.manual_seed(cfg.seed)
        model = TinyNet(dropout=0.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=cfg.weight_decay, amsgrad=True)
        w = torch.tensor(weights[k], dtype=torch.float32)
        for epoch in (1, 2):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(cfg, epoch)
            order = torch.as_tensor(engine.orders[epoch - 1][k])
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx], weight=w).backward()
                opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(engine.flat[k].detach(), flat, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(engine.buffers["bn.running_var"][k], model.bn.running_var, rtol=1e-4, atol=1e-5)
        assert len(outcomes[k].history) == 2 and outcomes[k].val_probs.shape == (len(evals[k]), 5)


@dataclass
class _Night:
    x: np.ndarray
    y: np.ndarray
    subject: int
    night: int
    record: str
    fs: float = 100.0


def _nights(n_subjects=4, n=40, t=64):
    rng = np.random.default_rng(0)
    out = []
    for s in range(n_subjects):
        y = rng.integers(0, 5, n)
        out.append(_Night((rng.normal(size=(n, t)) + y[:, None] * 0.5).astype(np.float32), y, s, 1, f"SC4{s:02d}1E0"))
    return out


@pytest.mark.parametrize("engine", ["eager", "batched"])
@pytest.mark.parametrize("protocol", ["paper", "clean"])
def test_run_cv_saves_predictions_and_skips_finished_folds(tmp_path, monkeypatch, engine, protocol):
    import sleeplib.models as models

    monkeypatch.setitem(models.MODELS, "tinynet", TinyNet)
    nights = _nights()
    cfg = CFG.replace(epochs=2, class_weights="balanced")
    res = run_cv("tinynet", nights, protocol=protocol, folds=[0, 1], config=cfg, out_dir=tmp_path, engine=engine)
    assert sorted(res.predictions["fold"].unique()) == [0, 1]
    assert len(res.predictions) == 2 * 40  # one subject of 40 epochs per fold
    assert set(res.histories) == {0, 1} and len(res.histories[0]) == 2
    assert ("optimistic" in res.protocol_label) == (protocol == "paper")
    summary = res.summary()
    assert 0 <= summary["pooled"]["accuracy"] <= 1 and len(summary["per_fold"]) == 2
    # re-run: finished folds are loaded, not retrained (model.pt untouched)
    stamp = (tmp_path / "fold_00" / "model.pt").stat().st_mtime_ns
    again = run_cv("tinynet", nights, protocol=protocol, folds=[0, 1], config=cfg, out_dir=tmp_path, engine=engine)
    assert (tmp_path / "fold_00" / "model.pt").stat().st_mtime_ns == stamp
    assert again.predictions.equals(load_cv(tmp_path).predictions)


def test_time_block_needs_one_night(tmp_path):
    with pytest.raises(ValueError, match="one night"):
        run_cv("tinynet", _nights(2), protocol="time-block", out_dir=tmp_path)


@pytest.mark.slow
def test_batched_folds_compiled_forward_matches_eager():
    """compile=True (the CUDA default of run_cv) trains and evaluates as the eager vmap path.

    Covers the compiled optimiser update and the compiled evaluation, whose last chunk (18 of
    eval_batch_size 32) is padded to the compiled shape, and ``compile_eval=False`` (evaluation
    eager, the last chunk not padded).
    """
    x, y = _data(200)
    train = [np.arange(0, 150), np.arange(50, 200)]
    evals = [np.arange(150, 200), np.arange(0, 50)]
    cfg = CFG.replace(epochs=2, eval_batch_size=32)
    runs, probs, val_loss = {}, {}, {}
    for variant, compiled, compile_eval in (("eager", False, True), ("compiled", True, True),
                                            ("eager evaluation", True, False)):
        engine = BatchedFolds(lambda: TinyNet(dropout=0.0), x, y, train, evals, None, cfg, compile=compiled,
                              compile_eval=compile_eval, time_phases=True)
        shapes = []
        if compiled:
            compiled_forward = engine._compiled_forward
            engine._compiled_forward = lambda f, b, xb: shapes.append(tuple(xb.shape)) or compiled_forward(f, b, xb)
        outcomes = engine.fit()
        runs[variant] = engine.flat.detach().clone()
        probs[variant] = np.stack([o.val_probs for o in outcomes])
        val_loss[variant] = [o.history["val_loss"].to_numpy() for o in outcomes]
        assert [set(t) for t in engine.phase_times] == [{"epoch", "full_steps_s", "last_batches_s", "evaluate_s"}] * 2
        if compiled:  # training batches (K, B, 1, T) and, unless eager, evaluation chunks (K, 32, 1, T)
            assert {s[1] for s in shapes} == ({cfg.batch_size, 32} if compile_eval else {cfg.batch_size})
    for variant in ("compiled", "eager evaluation"):
        torch.testing.assert_close(runs[variant], runs["eager"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(probs[variant], probs["eager"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.stack(val_loss[variant]), np.stack(val_loss["eager"]), rtol=1e-4)


def test_batched_folds_capture_the_step_graph_in_a_resumed_run_too(tmp_path):
    """The step is captured after a few eager steps of each process, not only in epoch 1: a run
    resumed from a checkpoint used to train every step eagerly. CUDA graphs stood in for by a
    capture that records and a replay that runs the step (CPU)."""
    x, y = _data(200)
    train, evals = [np.arange(0, 150), np.arange(50, 200)], [np.arange(150, 200), np.arange(0, 50)]
    cfg = CFG.replace(epochs=3)

    def engine():
        eng = BatchedFolds(lambda: TinyNet(dropout=0.0), x, y, train, evals, None, cfg, last_batch="drop")
        eng.use_graphs, eng.captures = True, []

        def capture():
            eng.captures.append((eng.epoch, int(eng.step_idx)))
            eng.graph = type("Replay", (), {"replay": staticmethod(eng._step)})()

        eng._capture = capture
        return eng

    straight = engine()
    straight.fit()
    first = engine()
    first.fit(epochs=2, checkpoint=tmp_path / "state.pt")
    resumed = engine()
    resumed.fit(checkpoint=tmp_path / "state.pt")
    assert straight.captures == first.captures == [(1, 3)] and resumed.captures == [(3, 3)]
    torch.testing.assert_close(resumed.flat, straight.flat)


def test_batched_folds_capture_the_compiled_step_once_it_is_ready(monkeypatch):
    """compiled_ready: the first step calls the compiled function (its tracing), the next ones the
    eager step while compiled_ready("step") is False, captured as usual after three uncaptured
    steps; once the step and the update are both ready the eager graph is dropped and the compiled
    step captured after three uncaptured steps of its own. CUDA graphs stood in for by a capture
    that records and a replay that runs the step (CPU); a stand-in compiled function."""
    x, y = _data(200)
    train, evals = [np.arange(0, 150), np.arange(50, 200)], [np.arange(150, 200), np.arange(0, 50)]
    ready = {"step": False, "update": False}
    eng = BatchedFolds(lambda: TinyNet(dropout=0.0), x, y, train, evals, None, CFG.replace(epochs=2),
                       last_batch="drop", compiled_ready=lambda name: ready[name])
    calls, captures = [], []
    eng._compiled_forward = lambda *a: calls.append(int(eng.step_idx)) or eng._forward_all_eager(*a)

    class Graph:
        def replay(self):
            eng._step()

    @contextlib.contextmanager
    def graph(g):
        yield
        captures.append((int(eng.step_idx), eng._step_ran_compiled))

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    eng.use_graphs = True
    assert eng.steps_per_epoch == 4
    eng.train_epoch()  # the fourth step is captured
    assert calls == [0] and captures == [(4, False)] and eng._graph_is_eager  # the eager step
    eng.train_epoch()
    assert calls == [0] and len(captures) == 1  # replayed
    ready["step"] = True
    eng.train_epoch()
    assert len(captures) == 1 and eng._graph_is_eager  # the update not ready yet: the eager graph stays
    ready["update"] = True
    n_calls = len(calls)
    eng.train_epoch()
    eng.train_epoch()
    # three uncaptured compiled steps (the calls), then the compiled step captured and replayed
    assert calls[n_calls:n_calls + 3] == [0, 1, 2] and captures[1:] == [(4, True)] and not eng._graph_is_eager


def test_batched_folds_short_last_batch_writes_its_own_folds_rows_only():
    """A fold's short last batch writes only that fold's rows of the parameters, Adam state,
    batch-norm buffers and sums (not other rows, not even with their old values): what lets CUDA
    graphs run all folds' side by side. Every in-place write is recorded as it is dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, y = _data(200)
    train, evals = [np.arange(0, 150), np.arange(50, 190), np.arange(20, 180)], [np.arange(150, 200)] * 3
    engine = BatchedFolds(lambda: TinyNet(dropout=0.0), x, y, train, evals, None, CFG.replace(amsgrad=True))
    shared = {"flat": engine.flat, "exp_avg": engine.exp_avg, "exp_avg_sq": engine.exp_avg_sq,
              "max_exp_avg_sq": engine.max_exp_avg_sq, "adam_step": engine.adam_step, "loss_sum": engine.loss_sum,
              "correct": engine.correct, "seen": engine.seen, **engine.buffers}
    writes = []

    class RecordWrites(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for i, arg in enumerate(func._schema.arguments):
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                    writes.append((value.untyped_storage().data_ptr(), value.storage_offset(), value.shape,
                                   value.stride()))
            return func(*args, **kwargs)

    before = {n: t.detach().clone() for n, t in shared.items()}
    with RecordWrites():
        engine._step_one_fold(1, torch.arange(140 - 12, 140))
    by_storage = {t.untyped_storage().data_ptr(): (n, t) for n, t in shared.items()}
    touched = set()
    for ptr, offset, shape, stride in writes:
        if ptr not in by_storage:
            continue  # the step's own temporaries
        name, t = by_storage[ptr]
        row = t.stride(0)
        last = offset + sum((n - 1) * st for n, st in zip(shape, stride))
        assert row <= offset and last < 2 * row, f"{name}: a write outside fold 1's row"
        touched.add(name)
    # batch norm's running statistics are written by native_batch_norm, whose schema does not mark
    # them written: they are views of fold 1's rows (bufs in _step_one_fold); checked by value below
    assert set(shared) - set(engine.buffers) <= touched
    for name, t in shared.items():  # the other folds' rows unchanged (the buffers too), and it did train fold 1
        assert torch.equal(t.detach()[[0, 2]], before[name][[0, 2]]), name
        assert not torch.equal(t.detach()[1], before[name][1]), name


def test_batched_engine_falls_back_to_eager_for_models_vmap_cannot_run(tmp_path, monkeypatch):
    import sleeplib.models as models

    monkeypatch.setitem(models.MODELS, "tinynet", TinyNet)
    monkeypatch.setattr(models, "NOT_VMAPPABLE", models.NOT_VMAPPABLE | {"tinynet"})
    with pytest.warns(UserWarning, match="using engine='eager'"):
        res = run_cv("tinynet", _nights(2), protocol="paper", folds=[0], config=CFG.replace(epochs=1),
                     out_dir=tmp_path, engine="batched")
    assert len(res.predictions) == 40


def test_auto_engine_is_eager_on_cpu(tmp_path, monkeypatch):
    import sleeplib.models as models

    monkeypatch.setitem(models.MODELS, "tinynet", TinyNet)
    res = run_cv("tinynet", _nights(2), protocol="paper", folds=[0], config=CFG.replace(epochs=1),
                 out_dir=tmp_path, engine="auto")
    assert (tmp_path / "fold_00" / "fold.json").read_text().count('"eager"') == 1
    assert len(res.predictions) == 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_batched_folds_graphed_short_last_batches_train_as_eager():
    """On CUDA the main step and the folds' short last batches (side by side, on streams of their
    own) replay CUDA graphs (the last batches from epoch 2 on: epoch 1 warms them up); the weights
    must follow the eager run's."""
    x, y = _data(200)
    train = [np.arange(0, 150), np.arange(50, 190)]  # 150 and 140 epochs: short last batches of 22 and 12
    evals = [np.arange(150, 200), np.arange(0, 50)]
    flats = {}
    for graphs in (False, True):
        engine = BatchedFolds(lambda: TinyNet(dropout=0.0), x, y, train, evals, None, CFG.replace(epochs=4),
                              device="cuda", cuda_graphs=graphs)
        engine.fit()
        flats[graphs] = engine.flat.detach().cpu()
        assert list(engine._last_batch_graphs) == ([(0, 1)] if graphs else [])  # both folds, one graph
    torch.testing.assert_close(flats[True], flats[False], rtol=1e-4, atol=1e-5)
