"""The training step's graphs compiled side by side by helper processes while the engine's own
process compiles (``train_speed.py --compile-helpers``; ``benchmarks/RESULTS.md`` steps 14 and 15).

``torch.compile`` compiles a step's graphs one after another in one process: the forward at the
step's first call, its backward at the first backward, the optimiser update after that (on an H100
23.4 + 11.3 + 2.9 s of AttnSleep's cold start, step 13). Inductor's work is Python in one thread,
so threads do not overlap them; processes do. Two kinds of helper:

* **The update's helper** (:class:`Helpers`, one per role of :data:`ROLES`): this command line run
  again with :data:`ROLE_ENV` set. It builds the engine on a few random epochs of the run's shapes,
  runs one step with the forward and backward eagerly (:func:`step_for_the_update`) and compiles the
  update, which inductor stores in its on-disk FX graph cache. When the engine's process reaches
  the update it waits for the helper's mark (:func:`waiting_backend`) and inductor finds the graph
  in its cache: the same graph, inputs and options give the same key. A helper that dies or is late costs a
  wait of at most ``timeout`` seconds, then the engine compiles the graph itself. A helper for the
  backward marked it 35-42 s after the start, 10-12 s after the engine needed it, as such a helper
  must also import, build and trace before it compiles (step 14).
* **The forward's worker** (:class:`GraphWorker`): a process started at the build, to which the
  engine's process sends the step's forward graph as soon as it has traced it; the engine's process
  then lowers the backward at once, itself, instead of at the first backward, so the two compile
  side by side. The graph travels as inductor's out-of-process compilation sends it
  (:func:`graph_pickling`), the compiled code comes back and is loaded at the forward's first call
  (:class:`Pending`).
* **The backward's worker** (``--train-while-compiling``): a second such process, to which the
  engine's process sends the backward as well; the engine's process, free once both graphs are
  traced and sent, trains meanwhile: the traced graphs run eagerly at the first step
  (:class:`Pending`'s fallback), the engine's eager step after it (``BatchedFolds``'
  ``compiled_ready``), until both compiled graphs are back (:meth:`Helpers.ready`).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

ROLE_ENV = "SLEEPLIB_COMPILE_HELPER"
"""Set in a helper process: which graph it compiles (:data:`ROLES`)."""
MARKS_ENV = "SLEEPLIB_COMPILE_HELPER_MARKS"
"""Set in a helper process: the folder where it marks each graph it has compiled."""
ROLES = {"update": "update.inference"}
"""Helper role -> the graph it compiles: ``<compiled function>.<graph kind>``."""


def role() -> str | None:
    """This process's helper role, or None in the engine's own process."""
    return os.environ.get(ROLE_ENV)


def graph_kind(kwargs: dict) -> str:
    """Which of a compiled function's graphs inductor's ``inner_compile`` was called for."""
    if kwargs.get("is_backward"):
        return "backward"
    return "inference" if kwargs.get("is_inference") else "forward"


try:  # the type AOTAutograd expects from a compiler (torch >= 2.5)
    from torch._inductor.output_code import OutputCode as _OutputCodeBase
except ImportError:  # pragma: no cover - older torch
    _OutputCodeBase = object


def _inductor_with(inner_compile):
    """Inductor as a ``torch.compile`` backend, each graph compiled by ``inner_compile`` (which
    wraps inductor's own ``compile_fx_inner``)."""
    from torch._inductor.compile_fx import compile_fx

    return lambda gm, example_inputs: compile_fx(gm, example_inputs, inner_compile=inner_compile)


def _mark(marks: Path, graph: str) -> None:
    tmp = marks / f".{graph}.part"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marks / graph)  # atomic: the engine never sees a half-written mark


def helper_backend(name: str, marks: Path | None, exit_after: str | None = None):
    """A ``torch.compile`` backend for a helper: inductor compiles (and caches) the graphs of function
    ``name``, marking each ``<name>.<kind>`` in ``marks``. ``exit_after``: the graph after whose
    compilation this process ends."""
    from torch._inductor.compile_fx import compile_fx_inner

    def inner_compile(gm, example_inputs, **kwargs):
        graph = f"{name}.{graph_kind(kwargs)}"
        out = compile_fx_inner(gm, example_inputs, **kwargs)
        if marks is not None:
            _mark(marks, graph)
        if graph == exit_after:
            sys.stdout.flush()
            os._exit(0)  # a helper has nothing left to do; its compile workers see it gone
        return out

    return _inductor_with(inner_compile)


class Waits:
    """What the engine's process waited for: graph -> (seconds waited, whether the mark came)."""

    def __init__(self):
        self.graphs: dict[str, tuple[float, bool]] = {}

    def summary(self) -> str:
        return ", ".join(f"{g} waited {s:.1f} s ({'marked' if ok else 'no mark: compiled here'})"
                         for g, (s, ok) in self.graphs.items()) or "none waited for"


def wait_for_mark(marks: Path, graph: str, proc, timeout: float) -> tuple[float, bool]:
    """Wait until ``graph`` is marked in ``marks``, the helper ``proc`` has ended, or ``timeout``
    seconds have passed; returns the seconds waited and whether the mark came."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if (marks / graph).exists():
            return time.perf_counter() - t0, True
        if proc.poll() is not None:  # ended: its mark, if any, is there now
            return time.perf_counter() - t0, (marks / graph).exists()
        time.sleep(0.005)
    return time.perf_counter() - t0, (marks / graph).exists()


def waiting_backend(name: str, marks: Path, helpers: dict[str, subprocess.Popen], waits: Waits,
                    timeout: float = 60.0, worker: GraphWorker | None = None,
                    backward_worker: GraphWorker | None = None):
    """The engine's backend: inductor as usual, but before compiling a graph that a live helper
    compiles (``helpers``: graph -> process), wait for its mark, at most ``timeout`` seconds, so that
    inductor finds it in its cache; the graph :data:`FORWARD_GRAPH` sent to ``worker``, and then the
    backward lowered at once (:data:`BACKWARD_GRAPH` sent to ``backward_worker`` if given)."""
    from torch._inductor.compile_fx import compile_fx_inner

    def inner_compile(gm, example_inputs, **kwargs):
        graph = f"{name}.{graph_kind(kwargs)}"
        if graph in helpers and graph not in waits.graphs:
            waits.graphs[graph] = wait_for_mark(marks, graph, helpers[graph], timeout)
        if worker is not None and graph == FORWARD_GRAPH:
            return worker.inner_compile(gm, example_inputs, **kwargs)
        if backward_worker is not None and graph == BACKWARD_GRAPH:
            return backward_worker.inner_compile(gm, example_inputs, **kwargs)
        return compile_fx_inner(gm, example_inputs, **kwargs)

    inductor = _inductor_with(inner_compile)
    if worker is None or not FORWARD_GRAPH.startswith(f"{name}."):
        return inductor

    def backend(gm, example_inputs):
        # the backward lowered right after the forward is sent, while the worker compiles it
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            return inductor(gm, example_inputs)

    return backend


FORWARD_GRAPH = "step.forward"
"""The graph :class:`GraphWorker` compiles: the training step's forward."""
BACKWARD_GRAPH = "step.backward"
"""The graph the backward's worker compiles (``Helpers(backward_worker=True)``)."""

_WEAK_CONTAINERS = (weakref.WeakValueDictionary, weakref.WeakKeyDictionary, weakref.WeakSet)


def _empty(kind):
    return kind()


@contextlib.contextmanager
def graph_pickling():
    """Inductor's graph pickler (``torch.fx._graph_pickler.GraphPickler``, which its out-of-process
    compilation sends graphs and compiled code with) as needed between two processes of this run:
    any operator by name, not only ``torch.ops.aten``'s (the worker imports the modules that define
    the benchmarks' operators), and weak containers as empty ones. torch 2.11 refuses both; the
    weak containers are caches (the fake-tensor converter's memo, reached from the example values
    of the graph that dynamo traced, in the tracing context; found with ``GraphPickler.debug_dumps``
    on an H100)."""
    from unittest import mock

    from torch.fx._graph_pickler import GraphPickler, Options
    from torch.utils.weak import WeakIdKeyDictionary

    weak = (*_WEAK_CONTAINERS, WeakIdKeyDictionary)

    class Pickler(GraphPickler):
        def reducer_override(self, obj):
            if isinstance(obj, weak):
                return _empty, (type(obj),)
            return super().reducer_override(obj)

    def dumps(cls, obj, options=None):
        with io.BytesIO() as stream:
            Pickler(stream, options or Options(ops_filter=None)).dump(obj)
            return stream.getvalue()

    with mock.patch.object(GraphPickler, "dumps", classmethod(dumps)):
        yield


def _worker_warm(device: str) -> int:
    """A worker's first task, while the engine's process traces: import inductor, start CUDA and
    inductor's pool of compile processes, and compile a small graph, so that the code generation
    and Triton's compiler are loaded when the forward comes."""
    import torch._inductor.compile_fx  # noqa: F401
    import torch._inductor.compile_fx_subproc  # noqa: F401

    if device == "cuda":
        torch.cuda.init()
    try:
        from torch._inductor.async_compile import AsyncCompile

        AsyncCompile.warm_pool()
    except (ImportError, AttributeError):  # pragma: no cover - another torch
        pass
    x = torch.randn(64, 256, device=device)
    torch.compile(lambda t: (torch.nn.functional.gelu(t) * t.mean(-1, keepdim=True)).sum(0), dynamic=False)(x)
    return os.getpid()


def _worker_compile(pickled, modules: tuple[str, ...]):
    """In the worker: import the modules that define the graph's operators, then inductor's
    compilation of the serialised graph (what its ``subprocess`` mode runs in a child)."""
    import importlib

    from torch._inductor.compile_fx_subproc import _SubprocessFxCompile

    for module in modules:
        importlib.import_module(module)
    t0 = time.perf_counter()
    with graph_pickling():
        out = _SubprocessFxCompile._run_in_child_subprocess(pickled, None)
    return out, time.perf_counter() - t0


# the worker's tasks travel pickled by module and name: the name this file imports under there
# (tests load it under another)
for _task in (_worker_warm, _worker_compile):
    _task.__module__ = "compile_helpers"


def _op_modules(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """The modules that define the custom operators ``gm`` calls (``torch.library.custom_op``)."""
    from torch._library.custom_ops import OPDEFS

    modules = set()
    for node in gm.graph.nodes:
        op = getattr(node.target, "_schema", None)
        if node.op == "call_function" and op is not None and op.name in OPDEFS:
            module = OPDEFS[op.name]._init_fn.__module__
            if module != "__main__":  # imported under another name there: the worker cannot
                modules.add(module)
    return tuple(sorted(modules))


def _slices_registered_for_pytree() -> None:
    """Newer torch's graph pickler (2.13) registers ``slice`` as a pytree node while it pickles and
    removes it after; that changes the version of pytree's registry, which dynamo guards the traced
    step on, and the step would be traced and compiled again at its next call. Registered once,
    before anything is traced, the pickler leaves the registry as it is."""
    import torch.utils._pytree as pytree
    from torch.fx import _graph_pickler

    if hasattr(_graph_pickler, "patch_pytree_map_over_slice") and slice not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(slice, lambda s: ([s.start, s.stop, s.step], None), lambda v, _: slice(*v))


class GraphWorker:
    """A process, spawned at the build, that compiles one of the step's graphs (the forward, while the
    engine's process compiles the backward or sends it to a second worker: :func:`waiting_backend`):
    inductor's compilation of a graph, sent serialised (:func:`graph_pickling`); the compiled code
    comes back and is loaded at the first call (:class:`Pending`). A graph inductor cannot serialise
    is compiled in the engine's process. ``fallback``: until the compiled code is back, a call runs
    the traced graph eagerly instead of waiting. ``label``: the graph's name in :meth:`summary` and
    in errors."""

    def __init__(self, device: str, fallback: bool = False, label: str = "forward"):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _slices_registered_for_pytree()
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        # the process starts at the first task, with this process's import path: this file's folder in it
        here = str(Path(__file__).resolve().parent)
        added = here not in sys.path
        if added:
            sys.path.insert(0, here)
        try:
            self._warm = self.pool.submit(_worker_warm, device)
        finally:
            if added:
                sys.path.remove(here)
        self.log: dict[str, float | bool] = {}
        self.fallback, self.label = fallback, label
        self.future = None  # the compilation sent, once sent
        self._done_here = False  # not serialisable: compiled in the engine's process

    def done(self) -> bool:
        """Whether the graph's compiled code is back (or failed: its first call says so)."""
        return self._done_here or (self.future is not None and self.future.done())

    def inner_compile(self, gm, example_inputs, **kwargs):
        """Inductor's ``compile_fx_inner``, the graph's compilation sent to the worker."""
        import torch._inductor.compile_fx as compile_fx
        from torch._inductor.compile_fx_ext import _OutOfProcessFxCompile

        pool, log = self.pool, self.log
        in_process = compile_fx.fx_codegen_and_compile
        outputs = [getattr(a, "meta", {}).get("val") for a in gm.graph.output_node().args[0]]
        # checked at the first call for a forward (below); a backward's gradients may take any
        traced_strides = [tuple(v.stride()) if isinstance(v, torch.Tensor) and not kwargs.get("is_backward") else None
                          for v in outputs]

        class ToWorker(_OutOfProcessFxCompile):
            def _send_to_child_async(self, pickled_input):
                return pool.submit(_worker_compile, pickled_input, _op_modules(gm))

        def send(gm, example_inputs, inputs_to_check, **graph_kwargs):
            t0 = time.perf_counter()
            scheme = ToWorker()
            with graph_pickling():
                serialized = scheme.serialize_compile(gm, example_inputs, inputs_to_check, graph_kwargs)
            if serialized is None:  # inductor cannot serialise it (it logged why): compile it here
                log["sent"] = False
                self._done_here = True
                return in_process(gm, example_inputs, inputs_to_check, **graph_kwargs)
            pickled, constants = serialized
            future = self.future = scheme._send_to_child_async(pickled)
            log.update(sent=True, send_s=time.perf_counter() - t0, worker_warm=self._warm.done())
            return Pending(future, constants, scheme, log, traced_strides, fallback=gm if self.fallback else None,
                           label=self.label)

        # every output of a forward at its traced strides, as the backward lowered beside it expects:
        # inductor may otherwise lay out a 4-d one channels-last (an AttnSleep convolution's, saved
        # for the backward, when compiled for the CPU)
        if not kwargs.get("is_backward"):
            output = gm.graph.output_node()
            output.meta["user_visible_output_idxs"] = list(range(len(output.args[0])))
        compile_fx.fx_codegen_and_compile = send
        try:
            # no FX graph cache for it: inductor would pickle the pending graph into it
            with torch._inductor.config.patch(fx_graph_cache=False):
                return compile_fx.compile_fx_inner(gm, example_inputs, **kwargs)
        finally:
            compile_fx.fx_codegen_and_compile = in_process

    def summary(self) -> str:
        log, who = self.log, f"{self.label} worker"
        if not log:
            return f"{who}: nothing sent"
        if not log["sent"]:
            return f"{who}: not serialisable, compiled here"
        eager = f", {log['fallback_calls']} call(s) run eagerly meanwhile" if "fallback_calls" in log else ""
        return (f"{who}: sent in {log['send_s']:.1f} s (worker {'warm' if log['worker_warm'] else 'still warming'}), "
                f"compiled there in {log.get('compile_s', float('nan')):.1f} s, waited {log.get('wait_s', float('nan')):.1f} s, "
                f"loaded in {log.get('load_s', float('nan')):.1f} s{eager}")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Pending(_OutputCodeBase):
    """A graph being compiled in the worker: at its first call, wait for the compiled code, load it,
    run it, and check that its outputs have the strides it was traced with, which the backward,
    lowered meanwhile, was compiled for (inductor keeps them unless it pads rows:
    ``comprehensive_padding``). ``fallback``: the traced graph (ATen operations), run eagerly by the
    calls that come before the compiled code is back instead of waiting; its outputs have the traced
    strides, being what they were traced from."""

    def __init__(self, future, constants, scheme, log: dict, traced_strides: list, fallback=None,
                 label: str = "forward"):
        self._boxed_call = True
        self._label = label
        self._future, self._constants, self._scheme, self._log = future, constants, scheme, log
        self._traced_strides = traced_strides
        self._fallback = fallback
        self._compiled = None
        self._post = None

    def post_compile(self, example_inputs, constants, graph_kwargs) -> None:
        self._post = (example_inputs, constants, graph_kwargs)

    def prepare_for_serialization(self) -> None:
        pass

    def set_triton_bundle(self, triton_bundle) -> None:
        pass

    def __call__(self, inputs):
        if self._compiled is not None:
            return self._compiled(inputs)
        if self._fallback is not None and not self._future.done():
            self._log["fallback_calls"] = self._log.get("fallback_calls", 0) + 1
            return run_as_traced(self._fallback, inputs)
        self._compiled = self._load()
        outputs = self._compiled(inputs)
        check_strides(outputs, self._traced_strides)
        return outputs

    def _load(self):
        t0 = time.perf_counter()
        try:
            pickled, compile_s = self._future.result()
        except Exception as e:
            how = "without --train-while-compiling" if self._label == "backward" else "with --no-forward-worker"
            raise RuntimeError(f"the step's {self._label} failed to compile in the worker process "
                               f"({type(e).__name__}: {e}); run {how} to compile it in this process") from e
        t1 = time.perf_counter()
        with graph_pickling():
            output = pickled.deserialize(self._constants)
        self._scheme._postprocess(output)
        compiled = output.graph
        compiled.post_compile(*self._post)
        self._log.update(compile_s=compile_s, wait_s=t1 - t0, load_s=time.perf_counter() - t1)
        return compiled


def run_as_traced(gm: torch.fx.GraphModule, inputs: list):
    """Run a traced graph op by op, called as compiled graphs are (AOTAutograd's boxed convention: a
    list of inputs, which the callee owns and empties, so that the backward frees saved tensors as
    it goes)."""
    if isinstance(gm.graph._codegen, torch.fx.graph._BoxedCodeGen):
        return gm(inputs)
    args = list(inputs)
    inputs.clear()
    return gm(*args)


def check_strides(outputs, traced_strides: list) -> None:
    """Stop with an error if a compiled forward's tensor outputs do not have the strides the graph
    was traced with (the backward compiled beside it assumed them); the stride of a dimension of
    size 1 is never used, so it may differ."""
    for i, (out, traced) in enumerate(zip(outputs, traced_strides)):
        if not isinstance(out, torch.Tensor) or traced is None:
            continue
        if any(n > 1 and a != b for n, a, b in zip(out.shape, out.stride(), traced)) or len(traced) != out.ndim:
            raise RuntimeError(
                f"the forward compiled in the worker returned output {i} with strides {tuple(out.stride())}, but the "
                f"backward was compiled for {traced} (inductor padded it, or laid it out otherwise?): run with "
                "--lean-compile (padding off) or without --compile-helpers")


class Helpers:
    """The helper processes of one engine: one per role of :data:`ROLES`, each this process's command
    line (``argv``) run again, and with ``forward_worker`` (a device type) a :class:`GraphWorker`
    for that device; :meth:`backend_for` is the engine's ``compile_backend``, which waits for them.
    ``backward_worker``: a second worker for the step's backward, both falling back to the traced
    graphs until their code is back; :meth:`ready` is then the engine's ``compiled_ready``."""

    def __init__(self, argv: list[str] | None = None, timeout: float = 60.0, forward_worker: str | None = None,
                 backward_worker: bool = False):
        self.marks = Path(tempfile.mkdtemp(prefix="compile_helpers_"))
        self.timeout = timeout
        self.waits = Waits()
        argv = sys.argv if argv is None else argv
        self.procs = {graph: subprocess.Popen([sys.executable, *argv],
                                              env={**os.environ, ROLE_ENV: r, MARKS_ENV: str(self.marks)})
                      for r, graph in ROLES.items()}
        if backward_worker and not forward_worker:
            raise ValueError("a backward worker goes with a forward worker (forward_worker: the device type)")
        self.worker = GraphWorker(forward_worker, fallback=backward_worker) if forward_worker else None
        self.backward_worker = (GraphWorker(forward_worker, fallback=True, label="backward")
                                if backward_worker else None)

    def backend_for(self, name: str):
        return waiting_backend(name, self.marks, self.procs, self.waits, self.timeout, self.worker, self.backward_worker)

    def ready(self, name: str = "step") -> bool:
        """The engine's ``compiled_ready``: for ``"step"``, whether the workers' compiled graphs are
        back; for ``"update"``, whether its helper has marked it (or ended), so that inductor finds
        it in its cache instead of the engine waiting for it."""
        if name == "update":
            graph = ROLES["update"]
            proc = self.procs.get(graph)
            return proc is None or (self.marks / graph).exists() or proc.poll() is not None
        return all(w.done() for w in (self.worker, self.backward_worker) if w is not None)

    def summary(self) -> str:
        return self.waits.summary() + "".join(f"; {w.summary()}" for w in (self.worker, self.backward_worker)
                                              if w is not None)

    def close(self) -> None:
        """End helpers still running (one that was never waited for) and remove the marks."""
        import shutil

        for worker in (self.worker, self.backward_worker):
            if worker is not None:
                worker.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        shutil.rmtree(self.marks, ignore_errors=True)


def step_for_the_update(engine) -> None:
    """In the update's helper: one step of ``engine``, its forward and backward run eagerly, not
    traced, so that only the update is compiled (by the helper's backend). Traced as traced graphs
    (step 14's helper) they cost the helper as much as they cost the engine's process, some 10 s of
    dynamo and AOTAutograd, on the CPUs the engine's process then compiles with."""
    engine._compiled_forward = None
    engine._step()


def helper_backend_for():
    """In a helper process: the engine's ``compile_backend`` that compiles this process's graph
    (:data:`ROLES`) for real, marks it and ends the process."""
    r = role()
    if r not in ROLES:
        raise SystemExit(f"{ROLE_ENV}={r!r}: expected one of {', '.join(ROLES)}")
    graph = ROLES[r]
    marks = Path(os.environ[MARKS_ENV])
    # other functions (the step's, run eagerly by step_for_the_update) are not compiled here
    return lambda name: helper_backend(name, marks, exit_after=graph) if graph.startswith(f"{name}.") else "eager"
