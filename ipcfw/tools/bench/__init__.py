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

Then, in a second part that needs the whole stack at once (``phases``):

* **client processes** (``--fleet 8``): 8 processes per system, each with its own client
  (an ``echo`` session on the direct path, one through the kernel, a managers proxy) making
  sync calls for ``--fleet-seconds`` per system, in 3 alternating runs; reported as the calls
  of all of them over the span from the earliest start to the latest end, with the CPU per
  call of the clients together, the kernel and the server (``fleet``).
* **descriptor round trips** (``--descriptor-mib``): ``SendReceive(2, (data, out))`` with
  `data` ``bytes`` and `out` a ``bytearray`` of the same size S (1 KiB, 64 KiB, 1 MiB,
  16 MiB), echoed by the server; MB/s = S / median round trip, beside an in-process
  ``out[:] = data`` copy of S in the same run, on both paths. A size a path cannot carry is
  reported as FAIL with the error's text (``descriptors``).
* **open sessions** (``--open-sessions 10000``): ipcfw-direct's sync median with 1,000, then
  10,000, then 1,000 idle direct sessions open to the same server (the 1,000 halves pooled);
  the kernel is started with ``--sessions-per-process`` room for them. The kernel's and the
  server's RSS with none and with 10,000 open (``crowd``).
* **memory per connection** (``--connections 32``): the RSS and descriptors of the kernel,
  the server and this process, before and while N threads each hold a direct session (each
  thread its own direct connection), divided by N (``memory``).
* **churn** (``--churn 2000``; ``--churn 100000`` for issue 11's count): direct sessions
  opened and closed, the kernel's and the server's RSS and descriptors before and after, and
  the sessions the kernel still holds afterwards (``churn``).

Each count set to 0 leaves its step out. On a terminal, stderr shows the step in progress.

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

Targets (``targets``; each a ratio within the same run, printed PASS or FAIL, and in the JSON
under ``targets``): the kernel path's sync median at most 1.5x bare-forwarder's and its
pipelined throughput at least 0.5x; ipcfw-direct's sync median at most 1.0x managers' and its
pipelined throughput at least 1.0x bare-pingpong's; the 8 client processes' aggregate on the
direct path at least 1.0x managers'; the sync median with 10,000 open sessions at most 1.2x
the one with 1,000; the 16 MiB round trip on the direct path at least 0.25x the in-process
copy's MB/s. The report also prints the kernel path's sync median as a multiple of managers'
(a reference).

All systems are started first, warmed up, and then measured in interleaved chunks (the order
rotates chunk by chunk; the shared-session case takes its turn among the sync chunks), so that
noise from other work on a shared machine hits every system alike; ``--repeat R`` runs the whole
set R times and keeps each system's best run.

Exit status: 0 when every system was measured (or ipcfw was left out with ``--no-ipcfw``), 1 when
ipcfw, its shared-session case or a step of the second part could not be started or measured
(the other numbers are still reported) or a baseline failed, 2 with ``--strict`` when a target
was measured and FAILed, 130 when interrupted.

The package, by idea: ``roles`` (the baselines' helper processes, ``python -m
ipcfw.tools.bench.roles``), ``echo`` (the ipcfw echo servers), ``clients`` (one client per
system, and what a call is), ``systems`` (starting them all with `ipcfw.testing`: each process
writes READY on an inherited pipe once it can serve, the kernel's and ``ipcfw serve``'s
handshake too), ``measure`` (the interleaved runs and the one percentile formula),
``phases`` (the second part, one module per step: ``fleet``, whose client processes are
``python -m ipcfw.tools.bench.fleet``, ``descriptors``, ``crowd``, ``memory``, ``churn``;
``progress`` on a terminal), ``targets`` (the targets and their verdicts), ``report`` (the
tables and JSON), ``plot`` (``--plot``: the same record drawn, with matplotlib) and ``driver``
(options, the run, the exit status).
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
