"""A node about to go: notice it in the training worker, so the loop can checkpoint at the next step boundary.

Two notices, both read without a collective (the loop folds the flag into the all-reduce it does every step anyway,
so every rank learns of it at the same step):
- a node drain (`ray drain-node`, the autoscaler, a cloud's spot reclaim warning): Ray Train's preemption watcher
  marks every worker of the group (`PreemptionInfo`, Ray 2.60);
- SIGTERM delivered to this Ray Train worker process (a spot instance's shutdown, Kubernetes' pod termination).
  The handler only records it. A second SIGTERM runs the handler that was there before (Ray's: exit now).

Signal handlers can only be set from a process's main thread, and the training function runs in a thread of the
Ray Train worker actor, whose main thread serves the actor's calls: the handler is installed by a call on the
worker's own actor, which runs on that main thread.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Notice:
    """What told this worker its node is about to go, and when it was first seen here."""

    source: str  # "drain" or "SIGTERM"
    seen_at_s: float  # time.time() when this worker first saw it
    deadline_s: Optional[float] = None  # when the node goes (a drain's deadline), if known
    detail: str = ""


_sigterm_at: Optional[float] = None
_previous_handler = None
_lock = threading.Lock()


def _on_sigterm(signum, frame) -> None:
    global _sigterm_at
    with _lock:
        first = _sigterm_at is None
        if first:
            _sigterm_at = time.time()
    if not first and callable(_previous_handler):  # asked twice: do what the process did before (exit)
        _previous_handler(signum, frame)


def _install_on_main_thread() -> bool:
    global _previous_handler
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _on_sigterm:
        _previous_handler = previous
        signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _restore_on_main_thread() -> None:
    global _sigterm_at
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _previous_handler if _previous_handler is not None else signal.SIG_DFL)
    _sigterm_at = None


class PreemptionWatch:
    """This worker's view of a coming preemption; `notice()` is cheap enough to call every step."""

    def __init__(self, warn: Callable[[str], None] = lambda _: None):
        self.warn = warn
        self.sigterm = False
        self._first: Optional[Notice] = None

    def install(self, timeout_s: float = 30.0) -> None:
        """Catch SIGTERM in this Ray Train worker (a no-op outside one, or where the actor call is unavailable:
        the drain notice still works, and SIGTERM keeps Ray's behaviour, an immediate exit)."""
        if _install_on_main_thread():  # a plain process (tests, a local run without a worker actor)
            self.sigterm = True
            return
        try:
            import ray

            actor = ray.get_runtime_context().current_actor
            self.sigterm = bool(ray.get(actor.execute.remote(_install_on_main_thread), timeout=timeout_s))
        except Exception as e:  # noqa: BLE001 - the drain path does not depend on it
            self.warn(f"warning: SIGTERM is not caught in this worker ({type(e).__name__}: {e}); a node drain "
                      f"is still noticed")

    def uninstall(self, timeout_s: float = 10.0) -> None:
        if not self.sigterm:
            return
        try:
            if threading.current_thread() is threading.main_thread():
                _restore_on_main_thread()
            else:
                import ray

                ray.get(ray.get_runtime_context().current_actor.execute.remote(_restore_on_main_thread),
                        timeout=timeout_s)
        except Exception:  # noqa: BLE001 - the worker is going away anyway
            pass

    def notice(self) -> Optional[Notice]:
        """The first notice seen by this worker, or None."""
        if self._first is not None:
            return self._first
        if _sigterm_at is not None:
            self._first = Notice("SIGTERM", _sigterm_at, detail="SIGTERM to this worker")
            return self._first
        info = _ray_preemption_info()
        if info is not None:
            deadline = info.deadline_ms / 1000.0 if info.deadline_ms else None
            self._first = Notice("drain", time.time(), deadline,
                                 detail=f"drain of node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} "
                                        f"(ranks {info.preempted_ranks})")
        return self._first


def _ray_preemption_info():
    """Ray Train's preemption info for this worker, read locally (`ray.train.get_preemption_info()` would be a
    barrier through an actor on every call; the loop's own all-reduce makes the ranks agree instead)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except Exception:  # noqa: BLE001 - outside a Ray Train worker, or another Ray version
        return None
