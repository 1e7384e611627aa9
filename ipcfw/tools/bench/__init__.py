"""``ipcfw bench``: how much does the ipcfw stack cost over a hand-written ZeroMQ broker, and
how far is it from what the standard library offers?

What is measured
----------------
For each system, from this (the bench) process acting as the client:

* **sync round-trip latency**: one call at a time, each call timed on its own with
  ``time.perf_counter_ns``; the median and the 99th percentile are reported, in microseconds.
* **pipelined throughput**: 64 requests kept in flight (issue 64, then wait for the oldest and
  issue one more), reported as completed calls per second.
* **shared-session throughput** (ipcfw only): 8 threads of this process make sync calls on ONE
  session, shared with ``ShareAuto``; reported as the calls per second of all 8 together (wall
  time from the start of a chunk to the last thread's last reply), with the per-call median and
  99th percentile, next to ipcfw's single-thread sync calls per second from the same run (its
  calls divided by the sum of their latencies). The threads share one GIL: the figure shows how
  far the client runtime and the kernel overlap concurrent round trips on one session.

* **CPU per pipelined call** of each process of each system (this one as the client, the
  broker, the server), all threads included, over the pipelined steps: where the time goes.

Every request carries the equivalent of an opcode and four 32-bit ints (a 32-byte body for the
bare systems, ``SendReceive(1, (42, 0, 0, 0))`` for ipcfw, ``adder.add(42, 0, 0, 0)`` for
managers, the tuple ``(1, 42, 0, 0, 0)`` for mp-pipe), and every reply echoes it (managers'
returns the sum).

The systems
-----------
``bare-pingpong``
    A DEALER in this process, a ROUTER echo server in another. Two processes, one hop: the floor
    that any ZeroMQ-in-Python design pays.
``bare-forwarder``
    DEALER client -> a Python ROUTER/ROUTER forwarder process -> an echo worker process (a
    DEALER). Three processes and two hops, exactly the shape of ipcfw's client -> kernel ->
    server path. The forwarder is what a competent engineer would hand-write: a plain
    ``zmq.Poller`` loop that drains each ready socket with ``NOBLOCK``, two frames on the
    client side and three on the worker side, no decoding, no tables. It is **the** fair
    baseline: it pays for the same process hops and context switches as ipcfw, so the ratio
    of ipcfw to it isolates what ipcfw itself adds (codec, handle and slot checks, policy,
    completion routing, the client runtime), while the ratio to ``bare-pingpong`` also
    includes the price of having a broker at all.
``managers``
    ``multiprocessing.managers``: a ``BaseManager`` process serving one object, and a proxy in
    this process calling its ``add`` method. Two processes, one hop, a thread of the server's
    per connection reading a plain Unix socket. A proxy call blocks until its answer, so it has
    no pipelined figure. It is what a user would pick instead of ipcfw: a reference, not a
    target for the kernel path (every ipcfw call crosses the kernel).
``mp-pipe``
    ``multiprocessing.connection``, the ``Connection`` objects ``multiprocessing.Pipe`` gives
    (here over a Unix socket, so that a separately started process can serve it): pickled
    tuples sent and echoed by a helper process, with blocking reads.
``ipcfw``
    The real stack, started by `ipcfw.testing.Stack`: ``python -m ipcfw kernel``, ``python -m
    ipcfw serve ipcfw.tools.bench.echo:EchoServer`` (``echo``, unsharable sessions) and an
    ``RSession`` in this process.
``ipcfw-direct``
    The same kernel and echo server, a second ``RSession`` created with ``path="direct"``: the
    kernel creates the session, but its requests go on a Unix socket from this thread straight
    to the server's process. The report compares its sync median with managers' and its
    pipelined rate with bare-pingpong's (a raw pyzmq DEALER/ROUTER, direct), as references.
``ipcfw-shared-8``
    The same kernel, a second server process ``python -m ipcfw serve
    ipcfw.tools.bench.echo:SharedEchoServer`` (the same server registered as ``echo-shared``
    with ``sharing = ESharableSessions``: ``EchoServer`` itself refuses ``ShareAuto``), one
    ``RSession`` created by the main thread and shared with ``ShareAuto``, and 8 worker threads
    calling ``SendReceive(1, (42, 0, 0, 0))`` on it, each on its own channel to the kernel.
    Reported in its own table below the main one; ``--shared 0`` leaves it out.

Targets: ipcfw's sync median at most 1.5x bare-forwarder's, and its pipelined throughput at
least 0.5x bare-forwarder's. The report also prints ipcfw's sync median as a multiple of
managers' (a reference, in the JSON as ``managers_sync_ratio``).

All systems are started first, warmed up, and then measured in interleaved chunks (the order
rotates chunk by chunk; the shared-session case takes its turn among the sync chunks), so that
noise from other work on a shared machine hits every system alike; ``--repeat R`` runs the whole
set R times and keeps each system's best run.

Exit status: 0 when every system was measured (or ipcfw was left out with ``--no-ipcfw``), 1 when
ipcfw or its shared-session case could not be started or measured (the other numbers are still
reported) or a baseline failed, 2 with ``--strict`` when ipcfw was measured but missed a target,
130 when interrupted.

The package, by idea: ``roles`` (the baselines' helper processes, ``python -m
ipcfw.tools.bench.roles``), ``echo`` (the ipcfw echo servers), ``clients`` (one client per
system, and what a call is), ``systems`` (starting them all with `ipcfw.testing`: each process
writes READY on an inherited pipe once it can serve, the kernel's and ``ipcfw serve``'s
handshake too), ``measure`` (the interleaved runs and the one percentile formula), ``report``
(the tables, targets and JSON) and ``driver`` (options, the run, the exit status).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """Entry point of ``ipcfw bench``; returns the process exit status.

    Imports the bench lazily: the helper processes (``roles``) and the echo servers (``echo``)
    import this package too, and need none of the rest.
    """
    from .driver import main as run

    return run(argv)
