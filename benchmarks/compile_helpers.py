"""The training step's optimiser-update graph compiled by a helper process while the engine's own
process compiles the forward and backward (``train_speed.py --compile-helpers``).

``torch.compile`` compiles a step's graphs one after another in one process: the forward at the
step's first call, its backward at the first backward, the optimiser update after that (on an H100
23.4 + 11.3 + 2.9 s of AttnSleep's cold start, ``benchmarks/RESULTS.md`` step 13). Inductor's work
is Python in one thread, so threads do not overlap them; processes do. A helper traces the same step
and compiles one graph for real, which inductor stores in its on-disk FX graph cache; the graphs it
does not compile it runs as traced (:class:`AsTraced`). When the engine's process reaches that
graph it waits for the helper's mark (:func:`waiting_backend`) and inductor finds the graph in its
cache: the same graph, inputs and options give the same key. A helper that dies or is late costs a
wait of at most ``timeout`` seconds, then the engine compiles the graph itself.

The helper is this command line run again (:class:`Helpers`, with :data:`ROLE_ENV` set): it builds
the engine on a few random epochs of the run's shapes and runs one step, so its graphs are the
engine's own. Only the update has a helper: one for the backward (its forward lowered but not
compiled) marked it 35-42 s after the start, 10-12 s after the engine needed it, as a helper must
also import, build and trace before it compiles (step 14).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
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


class AsTraced(_OutputCodeBase):
    """A graph run as traced, op by op, in place of its compiled code: what a helper does with the
    graphs another process compiles."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self._boxed_call = True  # AOTAutograd calls compiled graphs with a list of inputs
        self._boxed_graph = isinstance(gm.graph._codegen, torch.fx.graph._BoxedCodeGen)

    def __call__(self, inputs):
        if self._boxed_graph:
            return self.gm(inputs)
        args = list(inputs)
        inputs.clear()  # the boxed convention: the callee owns (and frees) the inputs
        return self.gm(*args)

    def post_compile(self, *args, **kwargs) -> None:
        pass

    def prepare_for_serialization(self) -> None:
        pass

    def set_triton_bundle(self, triton_bundle) -> None:
        pass


def _inductor_with(inner_compile):
    """Inductor as a ``torch.compile`` backend, each graph compiled by ``inner_compile`` (which
    wraps inductor's own ``compile_fx_inner``)."""
    from torch._inductor.compile_fx import compile_fx

    return lambda gm, example_inputs: compile_fx(gm, example_inputs, inner_compile=inner_compile)


def _mark(marks: Path, graph: str) -> None:
    tmp = marks / f".{graph}.part"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marks / graph)  # atomic: the engine never sees a half-written mark


def helper_backend(name: str, compile_for_real: set[str], marks: Path | None, exit_after: str | None = None):
    """A ``torch.compile`` backend for a helper: inductor compiles (and caches) the graphs of function
    ``name`` whose ``<name>.<kind>`` is in ``compile_for_real``, marking each in ``marks``; the other
    graphs run as traced. ``exit_after``: the graph after whose compilation this process ends."""
    from torch._inductor.compile_fx import compile_fx_inner

    def inner_compile(gm, example_inputs, **kwargs):
        graph = f"{name}.{graph_kind(kwargs)}"
        if graph not in compile_for_real:
            return AsTraced(gm)
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
                    timeout: float = 60.0):
    """The engine's backend: inductor as usual, but before compiling a graph that a live helper
    compiles (``helpers``: graph -> process), wait for its mark, at most ``timeout`` seconds, so that
    inductor finds it in its cache."""
    from torch._inductor.compile_fx import compile_fx_inner

    def inner_compile(gm, example_inputs, **kwargs):
        graph = f"{name}.{graph_kind(kwargs)}"
        if graph in helpers and graph not in waits.graphs:
            waits.graphs[graph] = wait_for_mark(marks, graph, helpers[graph], timeout)
        return compile_fx_inner(gm, example_inputs, **kwargs)

    return _inductor_with(inner_compile)


class Helpers:
    """The helper processes of one engine: one per role of :data:`ROLES`, each this process's command
    line (``argv``) run again; :meth:`backend_for` is the engine's ``compile_backend``, which waits
    for them."""

    def __init__(self, argv: list[str] | None = None, timeout: float = 60.0):
        self.marks = Path(tempfile.mkdtemp(prefix="compile_helpers_"))
        self.timeout = timeout
        self.waits = Waits()
        argv = sys.argv if argv is None else argv
        self.procs = {graph: subprocess.Popen([sys.executable, *argv],
                                              env={**os.environ, ROLE_ENV: r, MARKS_ENV: str(self.marks)})
                      for r, graph in ROLES.items()}

    def backend_for(self, name: str):
        return waiting_backend(name, self.marks, self.procs, self.waits, self.timeout)

    def close(self) -> None:
        """End helpers still running (one that was never waited for) and remove the marks."""
        import shutil

        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        shutil.rmtree(self.marks, ignore_errors=True)


def helper_backend_for():
    """In a helper process: the engine's ``compile_backend`` that compiles this process's graph
    (:data:`ROLES`) for real, marks it and ends the process."""
    r = role()
    if r not in ROLES:
        raise SystemExit(f"{ROLE_ENV}={r!r}: expected one of {', '.join(ROLES)}")
    graph = ROLES[r]
    marks = Path(os.environ[MARKS_ENV])
    return lambda name: helper_backend(name, {graph}, marks, exit_after=graph)
