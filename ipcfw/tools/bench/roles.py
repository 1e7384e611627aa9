"""The baselines' helper processes: ``python -m ipcfw.tools.bench.roles --role ROLE``.

``echo-router`` is bare-pingpong's server, ``forwarder`` and ``echo-worker`` are bare-forwarder's
broker and worker (see the ``ipcfw.tools.bench`` docstring): each a plain pyzmq loop with no
ipcfw in its path. ``managers`` serves an `Adder` with ``multiprocessing.managers``, and
``mp-pipe`` echoes what a ``multiprocessing.connection`` sends (the `Connection` objects
``multiprocessing.Pipe`` gives, over a Unix socket here): what a user would pick instead of
ipcfw, from the standard library.

A role started with ``--ready-fd N`` writes READY on it once it can serve
(`ipcfw.testing.ReadySignal`, the handshake the kernel and ``ipcfw serve`` use too); the
forwarder only once its worker has registered, so that one handshake covers both processes.
Each returns, or exits, when the bench process that started it (``--parent-pid``) is gone."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Listener
from multiprocessing.managers import BaseManager

import zmq

from ...testing import ReadySignal

PARENT_CHECK_MS = 1000
HELLO = b"HELLO"
STARTUP_TIMEOUT = 10.0
"""Seconds each helper process and the ipcfw stack have to become ready."""


def _orphaned(parent_pid: int) -> bool:
    return parent_pid > 0 and os.getppid() != parent_pid


def _echo_loop(sock: zmq.Socket[bytes], parent_pid: int) -> None:
    """Echo every multipart message back unchanged; return when the bench process is gone."""
    sock.rcvtimeo = PARENT_CHECK_MS
    while True:
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            if _orphaned(parent_pid):
                return
            continue
        sock.send_multipart(frames)


def run_echo_router(endpoint: str, parent_pid: int, ready: ReadySignal) -> None:
    """bare-pingpong's server: a ROUTER that sends ``[rid, body]`` straight back."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.linger = 0
        sock.bind(endpoint)
        ready.set()
        _echo_loop(sock, parent_pid)


def run_echo_worker(endpoint: str, parent_pid: int) -> None:
    """bare-forwarder's worker: a DEALER that registers with HELLO, then echoes
    ``[client_rid, body]`` back to the forwarder."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(endpoint)
        sock.send(HELLO)
        _echo_loop(sock, parent_pid)


def _pump_requests(front: zmq.Socket[bytes], back: zmq.Socket[bytes], worker_rid: bytes) -> None:
    """Drain the client side: ``[client_rid, body]`` -> ``[worker_rid, client_rid, body]``."""
    try:
        while True:
            client_rid, body = front.recv_multipart(zmq.NOBLOCK)
            back.send_multipart((worker_rid, client_rid, body))
    except zmq.Again:
        pass


def _pump_replies(back: zmq.Socket[bytes], front: zmq.Socket[bytes]) -> None:
    """Drain the worker side: ``[worker_rid, client_rid, body]`` -> ``[client_rid, body]``."""
    try:
        while True:
            _worker_rid, client_rid, body = back.recv_multipart(zmq.NOBLOCK)
            front.send_multipart((client_rid, body))
    except zmq.Again:
        pass


def _await_worker(back: zmq.Socket[bytes]) -> bytes:
    if not back.poll(int(STARTUP_TIMEOUT * 1000)):
        raise TimeoutError(f"no echo worker registered within {STARTUP_TIMEOUT:.0f} s")
    worker_rid, hello = back.recv_multipart()
    if hello != HELLO:
        raise RuntimeError(f"expected {HELLO!r} from the worker, got {hello!r}")
    return worker_rid


def run_forwarder(frontend: str, backend: str, parent_pid: int, ready: ReadySignal) -> None:
    """bare-forwarder's broker: ROUTER for clients, ROUTER for the worker, one Poller loop.

    Ready (READY on its ready fd) only once the worker has registered, so the bench's handshake
    covers both processes.
    """
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as front, ctx.socket(zmq.ROUTER) as back:
        front.linger = back.linger = 0
        front.bind(frontend)
        back.bind(backend)
        worker_rid = _await_worker(back)
        ready.set()
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        while True:
            events = poller.poll(PARENT_CHECK_MS)
            if not events and _orphaned(parent_pid):
                return
            for sock, _ in events:
                if sock is front:
                    _pump_requests(front, back, worker_rid)
                else:
                    _pump_replies(back, front)


class Adder:
    """The object the ``managers`` baseline serves: a method adding four ints (an opcode's worth
    of work, as the echo servers' is)."""

    def add(self, a: int, b: int, c: int, d: int) -> int:
        return a + b + c + d


_ADDER = Adder()


def _the_adder() -> Adder:
    return _ADDER


class AdderManager(BaseManager):
    """``multiprocessing.managers``' side of the ``managers`` baseline: ``manager.Adder()`` is a
    proxy to the one `Adder` of the server process."""


AdderManager.register("Adder", callable=_the_adder)
MANAGERS_AUTHKEY = b"ipcfw-bench"  # (the socket is in the bench's private 0700 directory)


def exit_when_orphaned(parent_pid: int) -> None:
    """End this process once the bench is gone, whatever its main thread is blocked in."""
    def watch() -> None:
        while not _orphaned(parent_pid):
            time.sleep(PARENT_CHECK_MS / 1000)
        os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def run_managers(address: str, parent_pid: int, ready: ReadySignal) -> None:
    """The ``managers`` baseline's server: a `BaseManager` serving one `Adder`."""
    server = AdderManager(address=address, authkey=MANAGERS_AUTHKEY).get_server()
    exit_when_orphaned(parent_pid)
    ready.set()
    server.serve_forever()


def run_mp_pipe(address: str, parent_pid: int, ready: ReadySignal) -> None:
    """The ``mp-pipe`` baseline's server: send back every object the one client sends."""
    exit_when_orphaned(parent_pid)
    with Listener(address, family="AF_UNIX") as listener:
        ready.set()
        with listener.accept() as conn:
            while True:
                try:
                    message = conn.recv()
                except EOFError:  # the bench closed its end
                    return
                conn.send(message)


def role_argv(role: str, endpoint: str, *extra: str, module: str = __name__) -> list[str]:
    """The command line of a helper process of this (the bench) process (``python -m
    module``)."""
    return [sys.executable, "-m", module, "--role", role, "--endpoint", endpoint,
            "--parent-pid", str(os.getpid()), *extra]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipcfw.tools.bench.roles")
    parser.add_argument("--role", required=True,
                        choices=("echo-router", "forwarder", "echo-worker", "managers",
                                 "mp-pipe"))
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--backend", help="the worker side (the forwarder only)")
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    if args.role == "forwarder" and not args.backend:
        parser.error("the forwarder needs --backend")
    ready = ReadySignal(args.ready_fd)
    try:
        if args.role == "echo-router":
            run_echo_router(args.endpoint, args.parent_pid, ready)
        elif args.role == "echo-worker":
            run_echo_worker(args.endpoint, args.parent_pid)
        elif args.role == "managers":
            run_managers(args.endpoint, args.parent_pid, ready)
        elif args.role == "mp-pipe":
            run_mp_pipe(args.endpoint, args.parent_pid, ready)
        else:
            run_forwarder(args.endpoint, args.backend, args.parent_pid, ready)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
