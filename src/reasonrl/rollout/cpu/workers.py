"""CPU worker processes that share the policy's weights (`rollout.workers`).

On a CPU, a small model's decode step is hundreds of small ops that a second intra-op thread barely speeds up, while
whole rows split between processes run in parallel. `Workers` forks `count - 1` processes beside
this one. The policy's parameters and buffers are moved to shared memory first, so every process works on the
current weights without copying them. The fast engine samples a share of each chunk's rows in them
(`rollout.FastEngine`).

A task is a module-level function `fn(context, *args)` run in a worker on its inherited `context` (the object given
at the fork: the engine). `keep_freed_memory` is the glibc allocator setting that CPU training wants beside them.

(Splitting the update pass between the processes the same way was measured too: no gain over two intra-op threads,
which scale well on its large matmuls, so the update stays in this process; `git show d061be7:docs/benchmarks.md`.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch


def fork_available() -> bool:
    """Linux only: elsewhere (macOS) forking a process that has loaded these libraries is not safe."""
    import multiprocessing
    import sys

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def shared_memory_shortfall(model: torch.nn.Module, root: str = "/dev/shm") -> str | None:
    """Why the model's tensors cannot move to shared memory (a line), or None. Containers often give /dev/shm only
    64 MiB, and a tensor that outgrows it would crash the process rather than raise."""
    import os
    import shutil

    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_shared())
    if not need or not os.path.isdir(root):
        return None
    free = shutil.disk_usage(root).free
    if free >= 2 * need:  # room to spare for the rest of the process's shared memory
        return None
    return f"the model needs {need / 2**20:.0f} MiB of shared memory and {root} has {free / 2**20:.0f} MiB free"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """This process's share runs on one torch thread while the workers use the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Workers:
    """`count` - 1 forked processes beside this one, sharing `model`'s tensors; each runs the tasks it is sent on its
    copy of `context`, one torch thread each."""

    def __init__(self, model: torch.nn.Module, count: int, context: Any) -> None:
        import multiprocessing

        self.model, self.count = model, count
        model.share_memory()
        _release_free_memory()  # freed heap pages would be shared copy-on-write: reusing them here would copy them
        ctx = multiprocessing.get_context("fork")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for _ in range(count - 1):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_loop, args=(context, theirs, os.getpid()), name="reasonrl-worker", daemon=True
            )
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def start(self, calls: list[tuple[Callable[..., Any], tuple]]) -> Callable[[], list[Any]]:
        """Send call i to worker i (at most `count - 1` calls); returns `wait`, which gives their results in order
        once all have replied, and raises RuntimeError (after closing the workers) if one failed or died."""
        sent = list(zip(self.conns, self.procs, strict=True))[: len(calls)]
        failed = [_send(conn, proc, call) for (conn, proc), call in zip(sent, calls, strict=True)]

        def wait() -> list[Any]:
            replies = [f or _receive(conn, proc) for f, (conn, proc) in zip(failed, sent, strict=True)]
            for reply in replies:
                if isinstance(reply, str):
                    self.close()  # its owner starts a new set on its next call
                    raise RuntimeError(f"rollout worker: {reply}")
            return [value for _, value in replies]

        return wait

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
                conn.close()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.conns, self.procs = [], []


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process for reuse: no trimming, and no mmap for blocks under 32 MiB.

    PyTorch's CPU tensors come straight from malloc. With glibc's defaults, every activation or KV buffer above its
    mmap threshold is a fresh mapping whose pages fault in on first touch, step after step (about 10 % of the
    embedded default's generation on the 2-core test machine, measured with and without). False where this is not
    glibc. The CLI calls it for its training and evaluation commands; the benchmarks call it for both trainers."""
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def _release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`), where there is one."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc() -> Any:
    """The C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _send(conn: Any, proc: Any, msg: Any) -> str | None:
    """Send a worker its task; None, or a line saying why it could not be sent."""
    try:
        conn.send(msg)
    except OSError:
        return _died(proc)
    return None


def _receive(conn: Any, proc: Any) -> Any:
    """A worker's reply (ok, value), or a line saying why there is none."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return _died(proc)


def _died(proc: Any) -> str:
    """The line that reports a worker whose pipe broke, once it has exited."""
    proc.join(timeout=1)
    return f"process {proc.pid} died (exit code {proc.exitcode})"


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this worker when its parent dies, SIGKILL included (a killed trainer cannot stop
    its workers, and a worker forked after another holds a copy of that one's pipe end, so it would never see EOF)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def _worker_loop(context: Any, conn: Any, parent: int) -> None:
    """Run the tasks this worker is sent until told to stop (None) or its parent goes away."""
    import gc
    import signal

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    gc.freeze()  # the collector leaves the inherited objects alone, so their pages stay shared with the parent
    torch.set_num_threads(1)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args = msg
        try:
            reply: Any = ("ok", fn(context, *args))
        except Exception as e:  # reported by the parent, which raises it
            reply = f"{type(e).__name__}: {e}"
        conn.send(reply)
