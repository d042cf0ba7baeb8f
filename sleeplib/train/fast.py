"""Several cross-validation folds trained at once, data resident on the device.

:class:`BatchedFolds` trains K fold models side by side with the *per-fold semantics of*
:func:`sleeplib.train.trainer.fit`: each fold has its own model, its own Adam state, its own
shuffled batches of ``batch_size`` epochs drawn from its own training set (``drop_last=False``),
its own learning-rate schedule, and its own per-epoch evaluation that selects its epoch.

How it is fast (measured in ``benchmarks/RESULTS.md``):

* all epochs live on the device once; a batch is a gather with a device-side permutation (no
  DataLoader, no host copies);
* the K models are one stacked parameter matrix ``(K, P)``; ``torch.func.vmap`` over
  ``functional_call`` runs them as one model (convolutions become grouped convolutions, linear
  layers batched matrix products), so one kernel launch serves K folds;
* Adam (optionally AMSGrad) is a handful of element-wise operations on the ``(K, P)`` matrix, with
  a per-fold mask so folds whose epoch has fewer full batches skip the update exactly;
* on CUDA the whole step (gather, forward, backward, Adam, metric sums) is captured once in a CUDA
  graph and replayed, so the host issues one launch per step. With ``config.amp="bf16"`` the
  forward runs under bf16 autocast, BatchNorm in fp32 (its vmapped bf16 backward fails in torch
  2.11); parameters, Adam state and the loss stay fp32;
* with ``compile=True`` (the CUDA default of :func:`~sleeplib.train.cv.run_cv`) the vmapped
  training forward with its backward, the optimiser update and the evaluation forward (last chunk
  padded to a static shape) are fused by ``torch.compile``.

Differences from the eager loop, all documented and per fold equivalent in distribution: dropout
masks come from a different random stream (``vmap(randomness="different")``), and batch order
comes from a device generator, so numbers are not bit-identical to :func:`fit`. The last, shorter
batch of each fold's epoch is run for that fold alone (not compiled; on CUDA all folds' replayed
from one CUDA graph, side by side on streams of their own), so BatchNorm sees exactly the epochs of
that batch. Works on CPU too (no graphs, no autocast), which the tests use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from sleeplib.io import atomic_path
from sleeplib.metrics import headline_from_confusion
from sleeplib.train.config import TrainConfig, lr_factor

__all__ = ["BatchedFolds", "FoldOutcome"]


@dataclass
class FoldOutcome:
    """Result of one fold trained by :class:`BatchedFolds` (mirrors :class:`~sleeplib.train.trainer.FitResult`)."""

    history: pd.DataFrame
    best_epoch: int
    best_score: float
    best_state: dict
    val_probs: np.ndarray
    stopped_early: bool = False


class BatchedFolds:
    """Train K folds of one model side by side.

    Parameters
    ----------
    model_fn : callable
        ``model_fn() -> nn.Module``; called once, under ``torch.manual_seed(config.seed)`` so every
        fold starts from the weights :func:`~sleeplib.train.trainer.fit` would start from.
    x, y : torch.Tensor
        All epochs ``(N, C, T)`` float and labels ``(N,)``; moved to ``device`` once.
    train_index, eval_index : sequence of 1-D integer arrays
        Per fold: rows of ``x`` to train on, and rows of the selection set evaluated after every
        epoch (the test fold in the paper protocol, validation subjects in the clean one).
    class_weights : sequence of sequence of float, or None
        Per fold cross-entropy weights (None: unweighted).
    config : TrainConfig
        Only ``optimizer`` "adam"/"adamw" is supported here (both papers use Adam).
    device : str or torch.device
    cuda_graphs : bool or None
        Capture the step in a CUDA graph (default: on CUDA).
    last_batch : {"exact", "drop"}
        "exact": each fold's short last batch is trained (``drop_last=False``, as AttnSleep).
        "drop": skip it (``drop_last=True``), slightly faster; a documented deviation.
    record_batches : bool
        Keep every epoch's per-fold batch order (``self.orders``), for tests.
    compile : bool
        ``torch.compile`` the training forward (with its backward), the optimiser update and the
        evaluation forward.
    compile_backend : str or callable
        The ``torch.compile`` backend of the compiled functions: a backend's name (default
        "inductor"), or ``backend_for(name) -> backend``, asked for ``"step"`` (the training forward,
        its backward) and ``"update"`` (the optimiser update), e.g. by
        ``benchmarks/compile_helpers.py``. A callable is always taken for ``backend_for``: wrap a
        backend function as ``lambda name: backend``.
    compile_eval : bool
        With ``compile``, compile the evaluation forward too. False: evaluation runs eagerly, which
        saves a second graph's compilation (18 s of a cold start on an H100 for AttnSleep with
        ``benchmarks/stacked_layout.py``'s forward) and costs some 0.06 s more an epoch of 20 folds
        (``benchmarks/RESULTS.md``, step 8).
    compiled_ready : callable, optional
        With ``compile``, when other processes compile the training step and the optimiser update
        (e.g. ``benchmarks/compile_helpers.py``): ``compiled_ready(name)``, whether the compiled
        code of ``"step"`` or ``"update"`` (the names ``backend_for`` is asked for) is ready. The
        first training step traces the step (which sends it off); while the step or the update is
        not ready, steps run it eagerly (on CUDA from a CUDA graph of the step), and once both are,
        the compiled ones, the step's CUDA graph captured anew. None (default): compiled from the
        first step on (their compilation blocks).
    bn_fp32 : bool
        Under bf16 autocast, run BatchNorm in fp32 (needed by vmap's eager BatchNorm backward in
        torch 2.11; False is for benchmarks of the compiled path).
    time_phases : bool
        Record each epoch's seconds in full steps, short last batches and evaluation
        (``self.phase_times``); synchronises the device at each boundary.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        train_index: Sequence,
        eval_index: Sequence,
        class_weights: Sequence | None,
        config: TrainConfig,
        device="cpu",
        cuda_graphs: bool | None = None,
        last_batch: str = "exact",
        record_batches: bool = False,
        compile: bool = False,
        compile_backend="inductor",
        compile_eval: bool = True,
        compiled_ready: Callable[[str], bool] | None = None,
        bn_fp32: bool = True,
        time_phases: bool = False,
    ):
        from torch.func import functional_call, stack_module_state  # noqa: F401  (fail early if missing)

        if config.optimizer not in ("adam", "adamw"):
            raise ValueError(f"the batched engine implements Adam/AdamW only, got optimizer={config.optimizer!r}; "
                             "use engine='eager'")
        if config.batcher != "epoch":
            raise ValueError(f"the batched engine batches single epochs only, got batcher={config.batcher!r}; "
                             "use engine='eager' for sequence models")
        if last_batch not in ("exact", "drop"):
            raise ValueError(f"last_batch must be 'exact' or 'drop', got {last_batch!r}")
        if len(train_index) != len(eval_index) or not len(train_index):
            raise ValueError("train_index and eval_index need one entry per fold (at least one fold)")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' requested but torch sees no CUDA GPU")
        self.config = config
        self.K = K = len(train_index)
        self.B = B = config.batch_size
        self.last_batch = last_batch
        self.use_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        self.amp = config.amp == "bf16" and self.device.type == "cuda"
        self.record_batches = record_batches
        self.time_phases = time_phases
        self.phase_times: list[dict] = []
        self.orders: list[list[np.ndarray]] = []

        self.x = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        if self.x.ndim == 2:
            self.x = self.x.unsqueeze(1)
        self.y = torch.as_tensor(y).long().to(self.device)
        n_classes = 5

        # --- per-fold index tables, padded to rectangles ------------------------------------
        train_index = [torch.as_tensor(np.asarray(t), dtype=torch.long) for t in train_index]
        eval_index = [torch.as_tensor(np.asarray(e), dtype=torch.long) for e in eval_index]
        for k, t in enumerate(train_index):
            if len(t) == 0:
                raise ValueError(f"fold {k} has no training epochs")
        self.n_train = np.array([len(t) for t in train_index])
        self.n_full = self.n_train // B
        self.n_eval = np.array([len(e) for e in eval_index])
        n_pad = int(max(self.n_train.max(), (self.n_full.max() + 1) * B))
        # pad with each fold's first index: padded slots are only read by masked (inactive) folds
        self.train_table = torch.stack([torch.cat([t, t[:1].repeat(n_pad - len(t))]) for t in train_index]).to(self.device)
        self.train_valid = (torch.arange(n_pad)[None, :] < torch.as_tensor(self.n_train)[:, None]).to(self.device)
        m_pad = int(max(1, self.n_eval.max()))
        self.eval_table = torch.stack(
            [torch.cat([e, torch.zeros(m_pad - len(e), dtype=torch.long)]) for e in eval_index]).to(self.device)
        self.eval_valid = (torch.arange(m_pad)[None, :] < torch.as_tensor(self.n_eval)[:, None]).to(self.device)
        self.n_full_t = torch.as_tensor(self.n_full, device=self.device)
        self.steps_per_epoch = int(self.n_full.max())

        cw = torch.ones(K, n_classes) if class_weights is None else torch.as_tensor(np.asarray(class_weights, dtype=np.float32))
        if cw.shape != (K, n_classes):
            raise ValueError(f"class_weights must be (n_folds, 5) = ({K}, 5), got {tuple(cw.shape)}")
        self.class_weights = cw.to(self.device)

        # --- K identical initial models -> one (K, P) parameter matrix ------------------------
        torch.manual_seed(config.seed)
        base = model_fn()
        if config.weight_init == "attnsleep_normal":
            from sleeplib.models.blocks import init_weights_normal

            base.apply(init_weights_normal)
        base = base.to(self.device)
        self.skeleton = base
        if self.amp and bn_fp32:
            # BatchNorm under vmap + bf16 autocast fails in torch 2.11 ("Expected running_mean to
            # have type BFloat16 but got Float"): normalise in fp32, as autocast does elsewhere.
            for module in base.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.register_forward_pre_hook(lambda _m, args: (args[0].float(), *args[1:]))
        self.param_names = [n for n, p in base.named_parameters() if p.requires_grad]
        self.param_shapes = [base.get_parameter(n).shape for n in self.param_names]
        self.param_sizes = [int(math.prod(s)) for s in self.param_shapes]
        flat0 = torch.cat([base.get_parameter(n).detach().reshape(-1) for n in self.param_names])
        self.P = P = flat0.numel()
        self.flat = flat0.unsqueeze(0).repeat(K, 1).contiguous().requires_grad_(True)
        self.buffers = {n: b.detach().unsqueeze(0).repeat(K, *([1] * b.ndim)).contiguous() for n, b in base.named_buffers()}
        # per-element base learning rate and weight decay (config.param_groups)
        base_lr, wd = torch.empty(P), torch.empty(P)
        offset = 0
        for name, size in zip(self.param_names, self.param_sizes):
            group = next((g for g in config.param_groups if g["match"] in name), {})
            base_lr[offset:offset + size] = float(group.get("lr", config.lr))
            wd[offset:offset + size] = float(group.get("weight_decay", config.weight_decay))
            offset += size
        self.base_lr, self.wd = base_lr.to(self.device), wd.to(self.device)
        zeros = lambda: torch.zeros(K, P, device=self.device)  # noqa: E731
        self.exp_avg, self.exp_avg_sq = zeros(), zeros()
        self.max_exp_avg_sq = zeros() if config.amsgrad else None
        self.adam_step = torch.zeros(K, 1, device=self.device)
        self.lr_factor = torch.ones(K, 1, device=self.device)
        self.alive = torch.ones(K, dtype=torch.bool, device=self.device)

        # each step's copy of the buffers (a fold past its last full batch gets its own back), in
        # place and one multi-tensor copy per dtype: cloned one by one they were 28 copies a step,
        # 34 us of an 8.2 ms AttnSleep step of 20 folds on an H100 (benchmarks/RESULTS.md, step 12)
        self._saved_buffers = {n: torch.empty_like(b) for n, b in self.buffers.items()}
        self._buffer_groups = [
            ([self._saved_buffers[n] for n, b in self.buffers.items() if b.dtype == dtype],
             [b for b in self.buffers.values() if b.dtype == dtype])
            for dtype in dict.fromkeys(b.dtype for b in self.buffers.values())]
        self.best_flat = self.flat.detach().clone()
        self.best_buffers = {n: b.clone() for n, b in self.buffers.items()}
        self.best_probs = torch.zeros(K, m_pad, n_classes, device=self.device)
        self.best_score = np.full(K, np.nan)
        self.best_epoch = np.zeros(K, dtype=int)
        self.since_best = np.zeros(K, dtype=int)
        self.histories: list[list[dict]] = [[] for _ in range(K)]
        self.epoch = 0

        # step state (static tensors: a CUDA graph reads and writes these in place)
        self.perm = self.train_table.clone()
        self.step_idx = torch.zeros((), dtype=torch.long, device=self.device)
        self.loss_sum = torch.zeros(K, device=self.device)
        self.correct = torch.zeros(K, device=self.device)
        self.seen = torch.zeros(K, device=self.device)
        self.arange_B = torch.arange(B, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.graph = None
        self._graph_is_eager = False  # captured before the compiled step and update were ready (compiled_ready)
        self._step_traced = False  # the compiled step's first call (its tracing) has come
        self._step_ran_compiled = False  # whether the last training forward was the compiled one
        self._update_ran_compiled = False  # and the last update
        self.compiled_ready = compiled_ready
        self._eager_steps_before_capture = 3
        self._uncaptured_steps = 0  # steps this process ran eagerly: the step graph is captured after a warm-up
        self._last_batch_graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # by the folds it trains
        self._last_batch_warm: set[tuple] = set()
        self._one = torch.ones(1, device=self.device)
        # fuse the forward (and its backward) and, separately, the optimiser update, which eagerly
        # is some 30 element-wise kernels over the (K, P) matrices every step
        backend_for = compile_backend if callable(compile_backend) else (lambda name: compile_backend)
        self._compiled_forward = (torch.compile(self._forward_all_eager, dynamic=False, backend=backend_for("step"))
                                  if compile else None)
        self.compile_eval = compile_eval
        self._update = (torch.compile(self._update_eager, dynamic=False, backend=backend_for("update"))
                        if compile else self._update_eager)

    # ------------------------------------------------------------------ functional model
    def _params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        lead = flat.shape[:-1]
        for name, shape, size in zip(self.param_names, self.param_shapes, self.param_sizes):
            out[name] = flat[..., offset:offset + size].view(*lead, *shape)
            offset += size
        return out

    def _forward_all(self, flat, buffers, xb):
        # compiled for the two static shapes it meets: full training batches and (unless
        # compile_eval is False) evaluation chunks
        if self._compiled_forward is not None and (
                xb.shape[1] == self.B if self.skeleton.training
                else self.compile_eval and xb.shape[1] == self.config.eval_batch_size):
            if self.skeleton.training:
                # the first call traces (and, with compiled_ready, sends the step to be compiled)
                self._step_ran_compiled = (not self._step_traced or self.compiled_ready is None
                                           or self.compiled_ready("step"))
                self._step_traced = True
                if not self._step_ran_compiled:
                    return self._forward_all_eager(flat, buffers, xb)
            return self._compiled_forward(flat, buffers, xb)
        return self._forward_all_eager(flat, buffers, xb)

    def _forward_all_eager(self, flat, buffers, xb):
        from torch.func import functional_call, vmap

        def one(params, bufs, x):
            return functional_call(self.skeleton, (params, bufs), (x,))

        return vmap(one, randomness="different")(self._params(flat), buffers, xb)

    def _fold_losses(self, logits, yb, cw):
        # weighted CE per fold: sum_i w_{y_i} nll_i / sum_i w_{y_i} (torch's 'mean' with weights)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, yb.unsqueeze(-1)).squeeze(-1)
        w = cw.gather(1, yb)
        return (w * nll).sum(-1) / w.sum(-1)

    def _adam(self, grad: torch.Tensor, mask: torch.Tensor, rows: int | slice = slice(None)) -> None:
        """Masked Adam/AdamW (AMSGrad optional), torch.optim.Adam's formulas: on the (K, P) matrix
        (``grad`` (K, P), ``mask`` (K, 1)) or on fold ``rows`` alone (``grad`` (P,), ``mask`` (1,)),
        whose state is then read and written through views of its rows only."""
        c = self.config
        b1, b2 = c.betas
        p = self.flat.detach()[rows]
        exp_avg, exp_avg_sq, adam_step = self.exp_avg[rows], self.exp_avg_sq[rows], self.adam_step[rows]
        if c.grad_clip is not None:
            norm = grad.norm(dim=-1, keepdim=True)
            grad = grad * (c.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        step = adam_step + mask
        lr = self.base_lr * self.lr_factor[rows]
        if c.optimizer == "adam":
            grad = grad + self.wd * p
            new_p = p
        else:  # adamw: decoupled decay
            new_p = p * (1 - lr * self.wd)
        m = torch.lerp(exp_avg, grad, 1 - b1)
        v = exp_avg_sq * b2 + (1 - b2) * grad * grad
        if self.max_exp_avg_sq is not None:
            max_exp_avg_sq = self.max_exp_avg_sq[rows]
            vmax = torch.maximum(max_exp_avg_sq, v)
            max_exp_avg_sq.copy_(torch.where(mask.bool(), vmax, max_exp_avg_sq))
            v_used = vmax
        else:
            v_used = v
        safe_step = step.clamp(min=1)
        bc1 = 1 - b1 ** safe_step
        bc2_sqrt = torch.sqrt(1 - b2 ** safe_step)
        denom = torch.sqrt(v_used) / bc2_sqrt + c.eps
        new_p = new_p - (lr / bc1) * m / denom
        keep = mask.bool()
        p.copy_(torch.where(keep, new_p, p))
        exp_avg.copy_(torch.where(keep, m, exp_avg))
        exp_avg_sq.copy_(torch.where(keep, v, exp_avg_sq))
        adam_step.copy_(step)

    def _autocast(self):
        import contextlib

        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    # ------------------------------------------------------------------ one full step, all folds
    def _step(self) -> None:
        active = (self.step_idx < self.n_full_t) & self.alive  # (K,)
        pos = self.step_idx * self.B + self.arange_B
        idx = self.perm[:, pos]  # (K, B) rows of x
        xb, yb = self.x[idx], self.y[idx]
        for saved_group, group in self._buffer_groups:
            torch._foreach_copy_(saved_group, group)
        saved = self._saved_buffers
        self.skeleton.train()
        with self._autocast():
            logits = self._forward_all(self.flat, self.buffers, xb)
        losses = self._fold_losses(logits, yb, self.class_weights)
        (grad,) = torch.autograd.grad(losses.sum(), self.flat)
        with torch.no_grad():
            self._update_ran_compiled = self.compiled_ready is None or self.compiled_ready("update")
            update = self._update if self._update_ran_compiled else self._update_eager
            update(grad, active, saved, losses.detach(), logits.detach(), yb)

    def _update_eager(self, grad, active, saved, losses, logits, yb) -> None:
        """Adam on every active fold, BatchNorm statistics of inactive folds restored, metric sums."""
        self._adam(grad, active.to(grad.dtype).unsqueeze(1))
        # a fold past its last full batch must not move its BatchNorm statistics either
        for n, b in self.buffers.items():
            keep = active.view(-1, *([1] * (b.ndim - 1)))
            b.copy_(torch.where(keep, b, saved[n]))
        act = active.float()
        self.loss_sum += losses * self.B * act
        self.correct += (logits.argmax(-1) == yb).sum(-1).float() * act
        self.seen += self.B * act
        self.step_idx += 1

    def _step_one_fold(self, k: int, idx: torch.Tensor) -> None:
        """The short last batch of fold k, alone (exact BatchNorm statistics). It reads and writes
        fold k's rows of the state only, so the folds' last batches can run side by side."""
        from torch.func import functional_call

        xb, yb = self.x[idx], self.y[idx]
        row = self.flat.detach()[k].clone().requires_grad_(True)  # the gradient of fold k's parameters only
        params = self._params(row)
        bufs = {n: b[k] for n, b in self.buffers.items()}  # views: BatchNorm updates land in place
        self.skeleton.train()
        with self._autocast():
            logits = functional_call(self.skeleton, (params, bufs), (xb,))
        loss = self._fold_losses(logits.unsqueeze(0), yb.unsqueeze(0), self.class_weights[k:k + 1])[0]
        (grad,) = torch.autograd.grad(loss, row)
        with torch.no_grad():
            self._adam(grad, self._one, rows=k)
            self.loss_sum[k] += loss.detach() * len(yb)
            self.correct[k] += (logits.argmax(-1) == yb).sum().float()
            self.seen[k] += len(yb)

    def _last_batches(self) -> None:
        """Every live fold's short last batch; on CUDA graphs, all replayed from one graph, each fold
        on a stream of its own.

        Their sizes are the same every epoch, so after one eager run in this process (the warm-up
        CUDA graphs need) the steps are captured once and replayed: eagerly, a batch of one fold is
        launch-bound (some 15 ms on an H100 for about 1 ms of GPU work), and one after another
        even graphed (some 4 ms each, 0.08 s an epoch of AttnSleep's 20 folds, benchmarks/RESULTS.md
        step 12); side by side they share the device.
        """
        alive = self.alive.cpu().numpy()
        folds = tuple(k for k in range(self.K) if alive[k] and self.n_full[k] * self.B < self.n_train[k])
        if not folds:
            return
        # views of perm: replays read each epoch's new order
        idx = {k: self.perm[k, int(self.n_full[k]) * self.B:int(self.n_train[k])] for k in folds}
        if not self.use_graphs or folds not in self._last_batch_warm:
            self._last_batch_warm.add(folds)
            for k in folds:
                self._step_one_fold(k, idx[k])
            return
        graph = self._last_batch_graphs.get(folds)
        if graph is None:  # first epoch of these folds (early stopping changes them): capture
            torch.cuda.synchronize(self.device)
            self._last_batch_graphs = {folds: torch.cuda.CUDAGraph()}
            graph = self._last_batch_graphs[folds]
            streams = [torch.cuda.Stream(self.device) for _ in folds]
            with torch.cuda.graph(graph):
                joined = torch.cuda.current_stream(self.device)
                for k, stream in zip(folds, streams):
                    stream.wait_stream(joined)
                    with torch.cuda.stream(stream):
                        self._step_one_fold(k, idx[k])
                for stream in streams:
                    joined.wait_stream(stream)
        graph.replay()

    def _new_order(self) -> None:
        keys = torch.rand(self.perm.shape, generator=self.generator, device=self.device)
        keys = torch.where(self.train_valid, keys, torch.full_like(keys, 2.0))
        order = keys.argsort(dim=1)
        self.perm.copy_(self.train_table.gather(1, order))

    def train_epoch(self) -> None:
        """One training epoch of every live fold."""
        t_start = self._phase_clock()
        self.epoch += 1
        factor = lr_factor(self.config, self.epoch)
        self.lr_factor.fill_(factor)
        self._new_order()
        if self.record_batches:
            perm = self.perm.cpu().numpy().copy()
            self.orders.append([perm[k, : self.n_train[k]] for k in range(self.K)])
        self.step_idx.zero_()
        self.loss_sum.zero_(); self.correct.zero_(); self.seen.zero_()  # noqa: E702
        for s in range(self.steps_per_epoch):
            if self._graph_is_eager and self.compiled_ready("step") and self.compiled_ready("update"):
                # the compiled step is back: warm it up and capture it instead (the eager graph's
                # replays done before its memory goes back)
                torch.cuda.synchronize(self.device)
                self.graph, self._graph_is_eager, self._uncaptured_steps = None, False, 0
            if self.use_graphs and self.graph is not None:
                self.graph.replay()
            elif self.use_graphs and self._uncaptured_steps == self._eager_steps_before_capture:
                # counted, not tied to epoch 1: a run resumed from a checkpoint captures it too
                self._capture()
                self.graph.replay()
            else:
                self._step()
                self._uncaptured_steps += 1
        t_steps = self._phase_clock()
        if self.last_batch == "exact":
            self._last_batches()
        if self.time_phases:
            self.phase_times.append({"epoch": self.epoch, "full_steps_s": t_steps - t_start,
                                     "last_batches_s": self._phase_clock() - t_steps})

    def _phase_clock(self) -> float:
        """Wall clock, after the device has finished (only when ``time_phases``: a sync costs)."""
        if self.time_phases and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _capture(self) -> None:
        # warm-up already ran eagerly (the first steps of epoch 1, on a side stream as torch asks)
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self._graph_is_eager = self._compiled_forward is not None and not (self._step_ran_compiled
                                                                            and self._update_ran_compiled)

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities ``(K, m, 5)`` on every fold's selection set and per-fold loss ``(K,)``."""
        self.skeleton.eval()
        m = self.eval_table.shape[1]
        chunk = self.config.eval_batch_size
        probs = torch.empty(self.K, m, 5, device=self.device)
        for start in range(0, m, chunk):
            idx = self.eval_table[:, start:start + chunk]
            n = idx.shape[1]
            if n < chunk and self._compiled_forward is not None and self.compile_eval:
                # pad the last chunk (with rows of its own) to keep the compiled graph's shape
                idx = torch.cat([idx, idx[:, :1].expand(-1, chunk - n)], dim=1)
            with self._autocast():
                logits = self._forward_all(self.flat.detach(), self.buffers, self.x[idx])
            probs[:, start:start + chunk] = torch.softmax(logits[:, :n].float(), dim=-1)
        yb = self.y[self.eval_table]
        nll = -torch.log(probs.gather(-1, yb.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12))
        w = self.class_weights.gather(1, yb) * self.eval_valid
        loss = (w * nll).sum(1) / w.sum(1).clamp_min(1e-12)
        self.skeleton.train()
        return probs, loss

    def run_epoch(self) -> None:
        """Train one epoch, evaluate, update each fold's best epoch and history."""
        t0 = time.perf_counter()
        was_alive = self.alive.cpu().numpy().copy()
        self.train_epoch()
        t_eval = self._phase_clock()
        probs, val_loss = self.evaluate()
        if self.time_phases:
            self.phase_times[-1]["evaluate_s"] = self._phase_clock() - t_eval
        pred = probs.argmax(-1)
        yb = self.y[self.eval_table]
        flat_cm = (yb * 5 + pred)[self.eval_valid.nonzero(as_tuple=True)]
        fold_of = self.eval_valid.nonzero(as_tuple=True)[0]
        cm = torch.zeros(self.K * 25, device=self.device).index_add_(
            0, fold_of * 25 + flat_cm, torch.ones_like(flat_cm, dtype=torch.float32)).view(self.K, 5, 5)
        # one host sync per epoch: confusion matrices and sums
        cm, val_loss = cm.cpu().numpy().astype(np.int64), val_loss.cpu().numpy()
        loss_sum, correct, seen = self.loss_sum.cpu().numpy(), self.correct.cpu().numpy(), self.seen.cpu().numpy()
        seconds = time.perf_counter() - t0
        improved = np.zeros(self.K, dtype=bool)
        monitor = self.config.monitor
        for k in range(self.K):
            if not was_alive[k]:
                continue
            scores = headline_from_confusion(cm[k])
            row = {"epoch": self.epoch, "lr": self.config.lr * lr_factor(self.config, self.epoch),
                   "train_loss": loss_sum[k] / seen[k], "train_acc": correct[k] / seen[k],
                   "val_loss": float(val_loss[k]), "val_accuracy": scores["accuracy"],
                   "val_macro_f1": scores["macro_f1"], "val_kappa": scores["kappa"],
                   "seconds": seconds}
            self.histories[k].append(row)
            score = row["val_loss" if monitor == "loss" else f"val_{monitor}"]
            best = self.best_score[k]
            if np.isnan(best) or (score < best if monitor == "loss" else score > best):
                improved[k] = True
                self.best_score[k], self.best_epoch[k], self.since_best[k] = score, self.epoch, 0
            else:
                self.since_best[k] += 1
        if improved.any():
            sel = torch.as_tensor(improved, device=self.device)
            with torch.no_grad():
                self.best_flat.copy_(torch.where(sel[:, None], self.flat.detach(), self.best_flat))
                for n, b in self.buffers.items():
                    self.best_buffers[n].copy_(torch.where(sel.view(-1, *([1] * (b.ndim - 1))), b, self.best_buffers[n]))
                self.best_probs.copy_(torch.where(sel[:, None, None], probs, self.best_probs))
        if self.config.early_stopping is not None:
            stop = self.since_best >= self.config.early_stopping
            self.alive &= ~torch.as_tensor(stop, device=self.device)

    def fit(self, epochs: int | None = None, progress: bool | None = None, checkpoint: str | Path | None = None) -> list[FoldOutcome]:
        """Run until ``config.epochs`` (or ``epochs``) and return one :class:`FoldOutcome` per fold.

        ``checkpoint``: file saved (atomically) every ``config.checkpoint_every`` epochs and at the
        end; when it exists, training continues from it.
        """
        from tqdm import tqdm  # text bars render in the HTML reports; widget bars do not

        epochs = self.config.epochs if epochs is None else epochs
        progress = self.config.progress if progress is None else progress
        if checkpoint is not None and Path(checkpoint).exists():
            self.load_state(checkpoint)
        bar = tqdm(total=epochs, initial=self.epoch, desc=f"{self.K} folds", disable=not progress, leave=False)
        while self.epoch < epochs and bool(self.alive.any()):
            self.run_epoch()
            bar.update(1)
            if checkpoint is not None and (self.epoch % self.config.checkpoint_every == 0 or self.epoch == epochs):
                self.save_state(checkpoint)
        bar.close()
        return self.outcomes()

    def outcomes(self) -> list[FoldOutcome]:
        best_probs = self.best_probs.cpu().numpy().copy()
        best_params = self._params(self.best_flat.detach().cpu())
        out = []
        for k in range(self.K):
            state = {n: p[k].clone() for n, p in best_params.items()}
            state.update({n: b[k].detach().cpu().clone() for n, b in self.best_buffers.items()})
            out.append(FoldOutcome(pd.DataFrame(self.histories[k]), int(self.best_epoch[k]), float(self.best_score[k]),
                                   state, best_probs[k, : self.n_eval[k]],
                                   bool(self.config.early_stopping is not None and self.since_best[k] >= self.config.early_stopping)))
        return out

    def save_state(self, path: str | Path) -> None:
        state = {
            "config": self.config.to_dict(), "epoch": self.epoch, "flat": self.flat.detach().cpu(),
            "buffers": {n: b.cpu() for n, b in self.buffers.items()}, "exp_avg": self.exp_avg.cpu(),
            "exp_avg_sq": self.exp_avg_sq.cpu(),
            "max_exp_avg_sq": None if self.max_exp_avg_sq is None else self.max_exp_avg_sq.cpu(),
            "adam_step": self.adam_step.cpu(), "alive": self.alive.cpu(), "best_flat": self.best_flat.cpu(),
            "best_buffers": {n: b.cpu() for n, b in self.best_buffers.items()}, "best_probs": self.best_probs.cpu(),
            "best_score": self.best_score, "best_epoch": self.best_epoch, "since_best": self.since_best,
            "histories": self.histories, "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(state, tmp)

    def load_state(self, path: str | Path) -> None:
        s = torch.load(path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            self.flat.copy_(s["flat"])
            for n, b in self.buffers.items():
                b.copy_(s["buffers"][n]); self.best_buffers[n].copy_(s["best_buffers"][n])  # noqa: E702
            self.exp_avg.copy_(s["exp_avg"]); self.exp_avg_sq.copy_(s["exp_avg_sq"])  # noqa: E702
            if self.max_exp_avg_sq is not None:
                self.max_exp_avg_sq.copy_(s["max_exp_avg_sq"])
            self.adam_step.copy_(s["adam_step"]); self.alive.copy_(s["alive"])  # noqa: E702
            self.best_flat.copy_(s["best_flat"]); self.best_probs.copy_(s["best_probs"])  # noqa: E702
        self.best_score, self.best_epoch, self.since_best = s["best_score"], s["best_epoch"], s["since_best"]
        self.histories, self.epoch = s["histories"], s["epoch"]
        self.generator.set_state(s["generator"])
        torch.set_rng_state(s["torch_rng"])
        if s["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"], self.device)
