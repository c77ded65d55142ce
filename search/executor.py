"""Where independent evaluations run: in this process one after another (serial, the default) or as Ray tasks on
one machine or a cluster (`[distributed] engine = "ray"`).

A fan-out is `executor.map(fn, context, items, on_result)`: `fn(context, item)` is a picklable top-level function
that reads models from the shared run directory (by path, named by content hash) and returns a plain result;
`context` is shared data (feeds, references) that Ray ships once through its object store. Results come back
to the driver, which hands each one to `on_result` as it arrives: the driver writes it into the evaluation cache
(the only source of truth), so a killed driver resumes with every finished result kept. Ray retries a task
whose worker died (`max_retries`); an exception raised by `fn` is not retried (it would fail again) and
fails the fan-out after the other tasks finished.

`stream(fn, parts, on_result)` is the same fan-out over parts that arrive while it runs: `parts` yields
(context, items, priority) and is consumed beside the running tasks (Ray: in a thread of the driver), so the
driver prepares the next part's context (a graph's feeds) while the workers run the previous part's items;
waiting items go out highest priority first. `map` is `stream` of one part.

Both return only when every task is done, so nothing runs on the workers while the driver times a model:
latency is measured in the driver between fan-outs, never beside other work on the node.
"""
from __future__ import annotations

import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from core.errors import WorkbenchError

RAY_HINT = "pip install -e .[ray]"


class SerialExecutor:
    """Today's behaviour: each item in this process, in order."""

    parallel = 1
    name = "serial"

    def map(self, fn: Callable, context: Any, items: Sequence, on_result: Callable[[int, Any], None] | None = None,
            desc: str = "", progress: bool = True) -> list:
        return map_by_stream(self, fn, context, items, on_result, desc, progress)

    def stream(self, fn: Callable, parts: Iterable[tuple[Any, Sequence, float]],
               on_result: Callable[[int, int, Any], None] | None = None, desc: str = "", progress: bool = True) -> list:
        outs = []
        with tqdm(desc=desc, disable=not progress or not desc) as bar:
            for p, (context, items, _) in enumerate(parts):
                bar.total = (bar.total or 0) + len(items)
                outs.append([])
                for i, item in enumerate(items):
                    outs[-1].append(fn(context, item))
                    if on_result:
                        on_result(p, i, outs[-1][-1])
                    bar.update(1)
        return outs

    def close(self) -> None:
        pass


def map_by_stream(executor, fn, context, items, on_result, desc, progress) -> list:
    """`map` as a stream of one part (one loop per executor)."""
    if not items:
        return []
    got = None if on_result is None else (lambda p, i, r: on_result(i, r))
    return executor.stream(fn, [(context, items, 0.0)], got, desc=desc, progress=progress)[0]


def _run(fn, context, item):
    return fn(context, item)


class RayExecutor:
    """Items as Ray tasks, at most `max_parallel` in flight, each holding `threads` CPUs (the ONNX Runtime
    threads of one evaluation, the serial run's count: ORT CPU results are bit-identical for one thread count)."""

    name = "ray"

    def __init__(self, address: str, max_parallel: int, threads: int, log_dir: Path | None = None,
                 max_retries: int = 3):
        ray = import_ray()
        self.ray, self.threads, self.max_retries, self.log_dir = ray, threads, max_retries, log_dir
        self._refs: dict[str, Any] = {}
        self.owns = not ray.is_initialized()  # a cluster this process joined (tests) is left running
        if self.owns:
            _connect(ray, address)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        fits = max(1, cpus // threads)
        self.parallel = min(max_parallel, fits) if max_parallel > 0 else fits
        self._remote = ray.remote(num_cpus=threads, max_retries=max_retries, retry_exceptions=False)(_run)
        if log_dir is not None:
            self._record_session()

    def _session_dir(self) -> Path | None:
        try:
            return Path(self.ray._private.worker._global_node.get_session_dir_path())
        except Exception:  # noqa: BLE001 - a client connection has no local session directory
            return None

    def _record_session(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        session = self._session_dir()
        (self.log_dir / "session.txt").write_text(f"{session or 'remote cluster'}\n")

    def _put(self, context: Any):
        """The context in the object store, once per run for a keyed context ({"key": content hash, ...})."""
        key = context.get("key") if isinstance(context, dict) else None
        if key is None:
            return self.ray.put(context)
        if key not in self._refs:
            self._refs[key] = self.ray.put(context)
        return self._refs[key]

    def map(self, fn: Callable, context: Any, items: Sequence, on_result: Callable[[int, Any], None] | None = None,
            desc: str = "", progress: bool = True) -> list:
        return map_by_stream(self, fn, context, items, on_result, desc, progress)

    def stream(self, fn: Callable, parts: Iterable[tuple[Any, Sequence, float]],
               on_result: Callable[[int, int, Any], None] | None = None, desc: str = "", progress: bool = True) -> list:
        ray = self.ray
        arrived: queue.Queue = queue.Queue()  # (context ref, items, priority), then None (or the producer's error)
        stop = threading.Event()  # the driver's loop ended (an error, Ctrl-C): make no further part

        def produce():
            try:
                for context, items, priority in parts:
                    # the context is pickled here, in the thread that runs the task's code (a task's lazy caches
                    # never change while they are pickled)
                    arrived.put((self._put(context), items, priority))
                    if stop.is_set():
                        return
                arrived.put(None)
            except BaseException as exc:  # noqa: BLE001 - raised in the driver's loop below
                arrived.put(exc)

        producer = threading.Thread(target=produce, name="fan-out parts", daemon=True)
        producer.start()
        todo: list = []  # (-priority, arrival, part, index, context ref, item): kept sorted, highest priority first
        running: dict = {}  # ObjectRef -> (part, index)
        outs: list[list] = []
        items_of: list[Sequence] = []
        failed: list[tuple[int, int, BaseException]] = []
        more, seq = True, 0
        bar = tqdm(total=0, desc=desc or "fan-out", disable=not progress)
        try:
            while more or todo or running:
                while more:  # take every part that has arrived; wait for one only when nothing else can go on
                    try:
                        part = arrived.get(block=not (todo or running))
                    except queue.Empty:
                        break
                    if part is None:
                        more = False
                    elif isinstance(part, BaseException):
                        raise part
                    else:
                        ctx, items, priority = part
                        p = len(outs)
                        outs.append([None] * len(items))
                        items_of.append(items)
                        for i, item in enumerate(items):
                            todo.append((-priority, seq, p, i, ctx, item))
                            seq += 1
                        todo.sort(key=lambda t: t[:2])
                        bar.total += len(items)
                        bar.refresh()
                while todo and len(running) < self.parallel:
                    _, _, p, i, ctx, item = todo.pop(0)
                    running[self._remote.remote(fn, ctx, item)] = (p, i)
                if not running:
                    continue
                bar.set_postfix(running=len(running), failed=len(failed), refresh=False)
                # while parts may still arrive, look up for them between results
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.05 if more else None)
                for ref in done:
                    p, i = running.pop(ref)
                    try:
                        outs[p][i] = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - collected, raised once the others are done
                        failed.append((p, i, exc))
                        continue
                    if on_result:
                        on_result(p, i, outs[p][i])
                    bar.update(1)
        except BaseException:
            for ref in running:  # Ctrl-C or a failing on_result: nothing keeps running behind the driver's back
                ray.cancel(ref, force=True)
            raise
        finally:
            stop.set()
            bar.set_postfix(running=0, failed=len(failed))
            bar.close()
        if failed:
            p, i, exc = failed[0]
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, WorkbenchError):
                raise cause
            n = sum(len(x) for x in items_of)
            raise WorkbenchError(f"{len(failed)} of {n} Ray tasks of {desc or 'a fan-out'} failed; the first "
                                 f"({items_of[p][i]!r}): {str(cause).splitlines()[-1] if str(cause) else cause!r}")
        return outs

    def close(self) -> None:
        """Copy the session's logs into the run directory (Ray keeps them under /tmp, whose socket paths must stay
        short), then stop the cluster this executor started."""
        session = self._session_dir() if self.log_dir is not None else None
        if self.owns:
            self.ray.shutdown()
        if session is not None and (session / "logs").is_dir():
            dest = self.log_dir / "logs"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(session / "logs", dest, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock"))

# What a Ray client hears when the cluster's client server could not start the per-client server it runs for each
# connection (Ray's proxier: the new process died or was not up within RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S).
# It is transient on a busy head (seen in CI on 2 cores, the process gone before Ray read its command line), and
# the next connection gets a new server on a new port, so a client connection is tried this many times.
_CLIENT_START_FAILURE = "Initialization failure from server"
CLIENT_ATTEMPTS = 3


def _connect(ray, address: str, attempts: int = CLIENT_ATTEMPTS, wait_s: float = 2.0) -> None:
    """`ray.init` for a local cluster, an existing one ("auto", host:port) or a client address ("ray://..."); any
    failure becomes one WorkbenchError line, after retrying only Ray's transient client-server start failure."""
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    for attempt in range(1, attempts + 1):
        try:
            if address == "local":
                ray.init(**kwargs)
            else:
                ray.init(address=address, **kwargs)
            return
        except Exception as exc:  # ConnectionError and Ray's own errors: one line for the user
            # one line, but the whole of it (Ray puts the cause on the lines after "...failure from server:")
            why = " ".join(x.strip() for x in str(exc).splitlines() if x.strip())[:600] or type(exc).__name__
            if address.startswith("ray://") and _CLIENT_START_FAILURE in why and attempt < attempts:
                print(f"warning: the Ray client server at {address} failed to start this client's server "
                      f"(attempt {attempt} of {attempts}); connecting again", file=sys.stderr)
                ray.shutdown()  # no half-made client context left for the next ray.init
                time.sleep(wait_s * attempt)
                continue
            if address.startswith("ray://") and "timeout" in why.lower():
                # what a token-authenticated cluster (Ray's default since 2.5x) answers a client without one
                why += ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token and give the "
                        "token (RAY_AUTH_TOKEN, or the cluster's ~/.ray/auth_token on this machine)")
            raise WorkbenchError(f"cannot start or reach the Ray cluster at distributed.address = {address!r}: "
                                 f"{why}") from None


def import_ray():
    try:
        import ray
    except ImportError:
        raise WorkbenchError(f"distributed.engine = \"ray\" needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def make_executor(dist: dict, threads: int, run_dir: Path | None = None):
    """The executor of a config's [distributed] table (validated by pipeline.config)."""
    if dist["engine"] == "serial":
        return SerialExecutor()
    return RayExecutor(dist["address"], dist["max_parallel"], threads,
                       log_dir=Path(run_dir) / "ray" if run_dir is not None else None)
