"""Ray actors score a generation (DESIGN.md section 8c, ``scale: ray``): a population across GPUs
and machines.

Why this shape:

- One actor per worker holds what a trial needs (the sources, a ``Merger`` or ``PathModel``, the
  evaluator: an ``evolve._Runner``), loaded once; genomes go out as lists of floats and metrics
  dicts come back, never weights, so a trial costs the network a few hundred bytes.
- Each actor scores one genome at a time and the next waiting genome goes to whichever actor is
  free; results are handed back in genome order, so the trial log and the optimizer see exactly
  what one process would give them (evaluation is deterministic).
- An actor whose process dies (a crash, the OOM killer, a lost node) is restarted by Ray and its
  in-flight genome is scored again (``max_restarts`` / ``max_task_retries``); the restarted actor
  reloads its models on that genome. Only a genome that kills its worker on every try ends the run.
- Ray is imported here only, when a run asks for it (the core never needs it). A cluster this
  module starts (no ``ray_address``) is local only (it listens on 127.0.0.1), has no dashboard
  and sends no usage statistics, and is shut down when the stage ends; a cluster joined through
  ``ray_address`` (or a Ray session the caller already opened) is left running. Ray's token
  authentication applies as Ray sets it up: joining a cluster that uses it needs its token and
  ``RAY_AUTH_MODE=token`` in the driver's environment.
- Actors must import the evaluator (``module:function``) and fastmerge itself: they get the
  driver's ``sys.path`` (less the interpreter's own directories) as ``PYTHONPATH``. On a cluster,
  every node must see the models, the evaluator's data and its module at the driver's paths.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import site
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from ._optional import require
from .errors import FastmergeError

if TYPE_CHECKING:
    from .evolve import _RunnerSpec

#: times a genome whose worker died is scored again (on the restarted actor) before the run fails;
#: an actor itself is restarted as often as it dies (occasional deaths over a long run are absorbed)
RETRIES = 3
#: environment variables a worker gets from the driver when they are set there
FORWARDED_ENV = ("TOKENIZERS_PARALLELISM", "LID176FTZ_PATH", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TRITON_INTERPRET")


def import_ray() -> ModuleType:
    """``ray``, with usage statistics off (read when Ray is imported); a missing Ray is one line
    naming ``pip install 'fastmerge[ray]'``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return require("ray", "scale: ray")


def init_local(num_cpus: int | None = None) -> None:
    """Start a local Ray cluster for this process (what a run without ``ray_address`` does): every
    Ray process listens on 127.0.0.1 only, no dashboard, Ray's own logging at WARNING."""
    ray = import_ray()
    # a new local cluster turns on token authentication and says so at WARNING: expected, not news
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        with _loopback_only():
            ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                     logging_level=logging.WARNING)
    finally:
        auth_log.setLevel(level)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's single-machine mode while a cluster starts (or is joined at a loopback address).

    On Linux Ray turns 127.0.0.1 into the machine's routable address (and listens on every
    interface) unless it believes it runs a single-machine cluster, its mode for Windows and macOS
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is imported). So that mode is on while
    ``ray.init`` runs, for this process and the Ray processes it starts, and off again afterwards:
    a later ``ray_address`` in this process must still reach other machines."""
    flag = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env = os.environ.get(flag)
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without that switch: its default binding (token authentication still applies)
        ray_constants = None
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[flag] = "0"
    if saved is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(flag, None)
        else:
            os.environ[flag] = saved_env


def _is_loopback(address: str) -> bool:
    host = address.rpartition("://")[2].rpartition(":")[0].strip("[]") or address
    return host == "localhost" or host == "::1" or host.startswith("127.")


class _Worker:
    """One actor: an ``evolve._Runner`` built on first use (again after a restart, on the genome Ray
    hands the new process: Ray re-runs ``__init__`` only, not ``load``)."""

    def __init__(self, spec: _RunnerSpec):
        self.spec = spec
        self.runner = None

    def _runner(self):
        if self.runner is None:
            from .evolve import _Runner

            self.runner = _Runner(self.spec)
        return self.runner

    def load(self) -> None:
        self._runner()

    def score(self, x: list[float]) -> dict:
        return self._runner()(x)


class RayScorer:
    """Scores genomes on ``workers`` Ray actors, results in genome order (``start`` ... ``close``)."""

    def __init__(self, spec: _RunnerSpec, workers: int, address: str | None = None):
        self.spec, self.workers, self.address = spec, workers, address
        self.actors: list = []
        self._ray: ModuleType | None = None
        self._owned = False  # we opened the Ray session (started a cluster or joined one): we close it

    def start(self) -> RayScorer:
        """Open (or reuse) the Ray session, place the actors and load their models."""
        ray = self._ray = import_ray()
        try:
            if not ray.is_initialized():
                self._connect(ray)
            num_cpus, num_gpus, threads = self._resources(ray)
            spec = type(self.spec)(**{**self.spec.__dict__, "threads": threads})
            env = {"PYTHONPATH": os.pathsep.join(_driver_path()), "OMP_NUM_THREADS": str(threads),
                   "MKL_NUM_THREADS": str(threads),
                   **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
            actor = ray.remote(_Worker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1,
                                                max_task_retries=RETRIES, runtime_env={"env_vars": env})
            self.actors = [actor.remote(spec) for _ in range(self.workers)]
            for i, ref in enumerate([a.load.remote() for a in self.actors]):
                self._get(ref, f"loading worker {i}")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the actors; end the Ray session if this scorer opened it (a cluster it started
        stops; a joined cluster keeps running, only this process disconnects)."""
        ray = self._ray
        if ray is None:
            return
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self.actors = []
        if self._owned:
            ray.shutdown()
            self._owned = False

    def score(self, xs: Sequence[np.ndarray]) -> Iterator[dict]:
        """Each actor scores one genome at a time; results come back in the order of ``xs``."""
        ray = self._ray
        todo = [np.asarray(x, dtype=np.float64).tolist() for x in xs]
        idle = list(self.actors)
        running: dict = {}  # ObjectRef -> (genome index, actor)
        done: dict[int, dict] = {}
        submitted = 0
        for want in range(len(todo)):
            while want not in done:
                while idle and submitted < len(todo):
                    a = idle.pop(0)
                    running[a.score.remote(todo[submitted])] = (submitted, a)
                    submitted += 1
                (ref,), _ = ray.wait(list(running), num_returns=1)
                i, a = running.pop(ref)
                done[i] = self._get(ref, f"scoring genome {i} of the generation")
                idle.append(a)
            yield done.pop(want)

    # -- helpers

    def _connect(self, ray: ModuleType) -> None:
        if self.address is None:
            init_local()
        else:
            try:
                with _loopback_only() if _is_loopback(self.address) else contextlib.nullcontext():
                    ray.init(address=self.address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise FastmergeError(f"ray_address: cannot join the Ray cluster at {self.address} "
                                     f"({_first_line(e)})") from None
        self._owned = True

    def _resources(self, ray: ModuleType) -> tuple[float, int, int]:
        """(num_cpus, num_gpus, torch threads) per actor: one GPU each on cuda; on CPUs the
        cluster's cores split between the actors (fractions of a core when there are more actors
        than cores; no actor asks for more cores than the largest node has)."""
        total = ray.cluster_resources()
        n = self.workers
        if self.spec.device.startswith("cuda"):
            gpus = int(total.get("GPU", 0))
            if gpus < n:
                raise FastmergeError(f"workers: {n} Ray workers on {self.spec.device} need {n} GPUs; the Ray "
                                     f"cluster has {gpus}")
            return 1, 1, self.spec.threads or 1
        node_max = max([node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")] or [0.0])
        share = min(node_max, total.get("CPU", 0.0) / n)
        if share <= 0:
            raise FastmergeError("scale: ray: the Ray cluster has no CPU to run workers on")
        num_cpus = math.floor(share) if share >= 1 else max(1e-4, math.floor(share * 1e4) / 1e4)
        return num_cpus, 0, self.spec.threads or max(1, math.floor(share))

    def _get(self, ref, doing: str):
        """``ray.get``; a worker's FastmergeError as itself (one line); a genome whose worker died
        on each of its tries as one line."""
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, FastmergeError):
                raise FastmergeError(str(e.cause)) from None
            raise
        except ray.exceptions.RayActorError as e:
            raise FastmergeError(f"a Ray worker died {doing}, {RETRIES + 1} times in a row (restarted each "
                                 f"time): {_first_line(e)}") from None


def _driver_path() -> list[str]:
    """This process's ``sys.path`` ('' as the working directory), less the interpreter's own
    directories and what lies under them (a worker's Python brings its own standard library and
    site-packages)."""
    own = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    own |= set(site.getsitepackages()) | {site.getusersitepackages()}
    own = {os.path.realpath(p) for p in own if p}
    out: list[str] = []
    for p in sys.path:
        full = os.path.abspath(p or os.getcwd())
        real = os.path.realpath(full)
        if os.path.isdir(full) and full not in out and not any(real == o or real.startswith(o + os.sep) for o in own):
            out.append(full)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
