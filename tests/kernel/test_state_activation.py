"""Tests of activation on demand's rules (ipcfw.kernel.activation, kernel rule 14): service
files parsed, and the kernel's state fed connects, registrations, exits and times, checked on
actions. No processes, sockets, clocks or sleeps (kernel_world.py); the real thing is in
tests/test_activation.py."""

from __future__ import annotations

import pytest

from ipcfw import errors
from ipcfw.kernel.activation import (
    DEFAULT_START_TIMEOUT,
    MAX_HELD,
    RESTART_DELAY_MOST,
    STOP_GRACE,
    Kill,
    restart_delay,
    Service,
    ServiceFileError,
    Spawn,
    parse_service,
)
from ipcfw.kernel.state import KernelState
from ipcfw.protocol import (
    ActivatableList,
    AwaitServer,
    Close,
    Complete,
    Completed,
    Connect,
    Connected,
    Disconnect,
    ListActivatable,
    NewSession,
    Register,
    Terminate,
    Terminating,
    TerminationReason,
    unpack_activatable,
)

from kernel_world import C1, C2, CLI2, S1, S2, SERVER, SRV, SRV2, hello, new_state, one, sends
from kernel_world import start_client

SRC = "/srv/ipcfw/services/echo.toml"


# -- service files -------------------------------------------------------------------------------


def test_a_service_file_with_every_key() -> None:
    service = parse_service("echo", '''
        command = "ipcfw serve 'servers.echo:EchoServer' --log-level warning"
        working_directory = "/srv/app"
        start_timeout = 2.5
        idle_exit = 30
        [environment]
        PYTHONPATH = "/srv/app"
        ''', SRC)
    assert service == Service(
        "echo", ("ipcfw", "serve", "servers.echo:EchoServer", "--log-level", "warning"), SRC,
        "/srv/app", (("PYTHONPATH", "/srv/app"),), 2.5, 30.0)


def test_a_service_file_with_only_a_command_list() -> None:
    service = parse_service("Echo", 'command = ["python3", "-m", "ipcfw", "serve", "m:C"]', SRC)
    assert service.command == ("python3", "-m", "ipcfw", "serve", "m:C")
    assert service.working_directory is None and service.environment == ()
    assert service.start_timeout == DEFAULT_START_TIMEOUT and service.idle_exit is None


@pytest.mark.parametrize("name, text, key, problem", [
    ("echo", "command = [", None, "not valid TOML"),
    ("echo", 'command = "x"\nidle = 3', "idle", "unknown key"),
    ("echo", 'working_directory = "/"', "command", "missing"),
    ("echo", "command = 42", "command", "must be a list of strings or a string, got an integer"),
    ("echo", 'command = ["ipcfw", 1]', "command", "must be a list of strings or a string"),
    ("echo", "command = []", "command", "is empty"),
    ("echo", 'command = "   "', "command", "is empty"),
    ("echo", "command = \"ipcfw serve 'm:C\"", "command", "cannot be split into words"),
    ("echo", 'command = "x"\nworking_directory = 3', "working_directory",
     "must be a non-empty string"),
    ("echo", 'command = "x"\nenvironment = "A=1"', "environment", "must be a table"),
    ("echo", 'command = "x"\n[environment]\nA = 1', "environment.A", "must be a string"),
    ("echo", 'command = "x"\n[environment]\n"A=B" = "1"', "environment.A=B",
     "not a variable name"),
    ("echo", 'command = "x"\nstart_timeout = 0', "start_timeout", "above 0, got an integer"),
    ("echo", 'command = "x"\nstart_timeout = -1.5', "start_timeout", "above 0"),
    ("echo", 'command = "x"\nstart_timeout = "10"', "start_timeout", "got a string"),
    ("echo", 'command = "x"\nidle_exit = true', "idle_exit", "got a boolean"),
    ("echo", 'command = "x"\nidle_exit = inf', "idle_exit", "above 0"),
    ("ec*ho", 'command = "x"', None, "the file's name must be the server's name"),
])
def test_each_mistake_in_a_service_file_is_named(
    name: str, text: str, key: str | None, problem: str
) -> None:
    with pytest.raises(ServiceFileError) as caught:
        parse_service(name, text, SRC)
    assert caught.value.source == SRC and caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{SRC}: {key}: " if key else f"{SRC}: ")


def test_two_files_for_one_name_are_refused() -> None:
    one_ = parse_service("echo", 'command = "x"', "/d/echo.toml")
    two = parse_service("ECHO", 'command = "x"', "/d/ECHO.toml")
    with pytest.raises(ServiceFileError, match=r"/d/ECHO.toml: names the same server as "
                                               r"/d/echo.toml"):
        KernelState(services=[one_, two])


# -- the rules, through the kernel's state ---------------------------------------------------


def service(name: str = "Echo", **keys: object) -> Service:
    values = {"start_timeout": 5.0, "idle_exit": None, **keys}
    return Service(name, ("ipcfw", "serve", "m:C"), f"/d/{name}.toml",
                   start_timeout=values["start_timeout"],  # type: ignore[arg-type]
                   idle_exit=values["idle_exit"])  # type: ignore[arg-type]


def world(**keys: object) -> KernelState:
    """A kernel with the service "Echo" and two client processes (channels C1, C2)."""
    state = new_state(services=[service(**keys)])
    start_client(state)
    start_client(state, CLI2, C2, None)
    return state


def connect(state: KernelState, chan: bytes, req_id: int, name: str = "echo") -> list:
    return state.receive(chan, Connect(req_id, name, (1, 0, 0), -1, b""))


def spawns(actions: list) -> list:
    return [a for a in actions if type(a) is Spawn]


def register(state: KernelState, rid: bytes = S1, name: str = "Echo") -> list:
    hello(state, rid, SERVER, SRV if rid == S1 else SRV2)
    return state.receive(rid, Register(900, name, 0, (1, 0, 0)))


def listing(state: KernelState) -> dict[str, str]:
    return dict(state.activatable())


def test_concurrent_connects_are_held_and_start_the_server_once() -> None:
    state = world()
    assert listing(state) == {"Echo": "activatable"}
    first = connect(state, C1, 1)
    assert first == [Spawn(service())]  # no answer: held
    assert connect(state, C2, 2, "ECHO") == []  # started already
    assert connect(state, C1, 3) == []
    assert listing(state) == {"Echo": "starting"}
    actions = register(state)
    assert one(actions, S1, Completed).value == errors.KErrNone
    news = sends(actions, S1, NewSession)
    assert len(news) == 3  # the held connects proceed as if just received
    assert spawns(actions) == [] and listing(state) == {"Echo": "running"}
    answer = state.receive(S1, Complete(news[1].msg_id, errors.KErrNone, ()))
    assert sends(answer) == [Connected(2, errors.KErrNone, news[1].handle, b"")]
    assert state.activations.held_per_channel == {}


def test_a_name_without_a_service_is_refused_as_before() -> None:
    state = world()
    actions = connect(state, C1, 1, "other")
    assert one(actions, C1, Connected).result == errors.KErrNotFound
    assert spawns(actions) == []


def test_an_exit_before_registering_fails_the_held_connects_and_waits() -> None:
    state = world()
    connect(state, C1, 1)
    state.receive(C2, AwaitServer(5, "echo"))
    actions = state.service_exited("Echo", "exited with status 3", "Traceback\nImportError: m")
    refused = one(actions, C1, Connected)
    assert refused.result == errors.KErrNotFound and refused.handle == 0
    assert refused.text == (
        "server 'Echo' exited with status 3 before it registered (started by /d/Echo.toml: "
        "ipcfw serve m:C); its output ended:\nTraceback\nImportError: m")
    assert sends(actions, C2) == [Completed(5, errors.KErrNotFound, (), refused.text)]
    assert state.statistics()["awaits"] == 0 and listing(state) == {"Echo": "activatable"}
    state.now += 1.0  # (rule 6: not started again within a second of a failed start)
    assert connect(state, C1, 2) == [Spawn(service())]  # the next connect starts it again


def test_a_service_that_keeps_failing_is_started_again_ever_more_slowly() -> None:
    state = world()
    state.now = 100.0
    for failures, delay in ((1, 1.0), (2, 2.0), (3, 4.0)):
        assert spawns(connect(state, C1, 10 * failures)) == [Spawn(service())]
        state.service_exited("Echo", "exited with status 1", "boom")
        # Within the delay: refused at once with the last failure, nothing started.
        state.now += delay - 0.1
        actions = connect(state, C1, 10 * failures + 1)
        refused = one(actions, C1, Connected)
        assert spawns(actions) == [] and refused.result == errors.KErrNotFound
        assert refused.text.startswith(
            f"server 'Echo' is not started again for 0.1 s: its last {failures} start"), refused
        assert "exited with status 1 before it registered" in refused.text
        state.now += 0.1
    assert spawns(connect(state, C1, 99)) == [Spawn(service())]
    register(state)  # a start that works clears the count
    assert state.activations.by_key["echo"].failures == 0
    assert restart_delay(0) == 0.0 and restart_delay(20) == RESTART_DELAY_MOST


def test_a_start_that_takes_too_long_is_killed_and_fails_with_timed_out() -> None:
    state = world(start_timeout=2.0)
    state.now = 100.0
    connect(state, C1, 1)
    assert state.next_activation_deadline() == 102.0
    state.now = 101.9
    assert state.activation_tick() == []
    state.now = 102.0
    assert state.activation_tick() == [Kill("echo")]
    state.now = 103.0
    assert state.activation_tick() == []  # killed once
    assert state.next_activation_deadline() is None
    actions = state.service_exited("Echo", "was killed by SIGKILL", "")
    refused = one(actions, C1, Connected)
    assert refused.result == errors.KErrTimedOut
    assert refused.text.startswith("server 'Echo' did not register within 2 s of its start, "
                                   "and was killed (started by /d/Echo.toml")
    assert refused.text.endswith("; it wrote nothing")


def test_an_idle_server_is_told_to_end_and_the_next_connect_starts_it_again() -> None:
    state = world(idle_exit=10.0)
    state.now = 1.0
    connect(state, C1, 1)
    state.now = 2.0
    new = one(register(state), S1, NewSession)
    state.receive(S1, Complete(new.msg_id, errors.KErrNone, ()))
    state.now = 50.0
    assert state.next_activation_deadline() is None  # it has a session: not idle
    closing = state.receive(C1, Close(new.handle))
    state.receive(S1, Complete(one(closing, S1, Disconnect).msg_id, errors.KErrNone, ()))
    assert state.next_activation_deadline() == 60.0
    state.now = 59.0
    assert state.activation_tick() == []
    state.now = 60.0
    actions = state.activation_tick()
    assert sends(actions, S1) == [Terminating(TerminationReason.IDLE)]
    assert listing(state) == {"Echo": "stopping"}
    assert "echo" not in state.servers  # (nothing outstanding: the name is free at once)
    assert connect(state, C2, 7) == []  # held until the old process has gone
    restarted = state.service_exited("Echo", "exited with status 0", "")
    assert restarted == [Spawn(service(idle_exit=10.0))]
    assert listing(state) == {"Echo": "starting"}


def test_a_server_that_does_not_exit_after_its_registration_ended_is_killed() -> None:
    state = world()
    state.now = 0.0
    connect(state, C1, 1)
    new = one(register(state), S1, NewSession)
    state.receive(S1, Complete(new.msg_id, errors.KErrNone, ()))
    state.receive(C2, Terminate(4, "echo", TerminationReason.ADMINISTRATOR))
    assert listing(state) == {"Echo": "stopping"}
    state.now = STOP_GRACE
    assert state.activation_tick() == [Kill("echo")]


def test_a_session_keeps_an_idle_exit_server_running() -> None:
    state = world(idle_exit=10.0)
    state.now = 0.0
    connect(state, C1, 1)
    new = one(register(state), S1, NewSession)
    state.now = 100.0  # connecting since 0: a session, so not idle
    assert state.activation_tick() == [] and listing(state) == {"Echo": "running"}
    assert new.handle in state.servers["echo"].sessions


def test_the_held_connects_of_a_channel_that_went_are_dropped() -> None:
    state = world()
    connect(state, C1, 1)
    connect(state, C2, 2)
    state.peer_gone(C1)
    actions = register(state)
    assert len(sends(actions, S1, NewSession)) == 1
    assert sends(actions, C1) == []


def test_a_channel_may_hold_only_so_many_connects() -> None:
    state = world()
    for req_id in range(1, MAX_HELD + 1):
        connect(state, C1, req_id)
    refused = one(connect(state, C1, 99), C1, Connected)
    assert refused.result == errors.KErrOverflow and str(MAX_HELD) in refused.text
    assert connect(state, C2, 1) == []  # another channel is not affected


def test_a_wait_for_the_name_starts_its_server() -> None:
    state = world()
    assert state.receive(C1, AwaitServer(3, "echo")) == [Spawn(service())]
    assert state.receive(C2, AwaitServer(4, "echo")) == []
    actions = register(state)
    assert sends(actions, C1) == [Completed(3, errors.KErrNone, ())]
    assert sends(actions, C2) == [Completed(4, errors.KErrNone, ())]


def test_another_server_registering_the_name_meanwhile_satisfies_the_waiters() -> None:
    state = world()
    connect(state, C1, 1)
    actions = register(state, S2)  # not the process the kernel started
    assert len(sends(actions, S2, NewSession)) == 1
    # the kernel's own process then fails to register (KErrAlreadyExists) and exits:
    assert state.service_exited("Echo", "exited with status 1", "AlreadyExists") == []
    assert listing(state) == {"Echo": "running"}  # (the name is served all the same)


def test_a_connect_while_the_registration_ends_waits_for_the_name_to_be_free() -> None:
    state = world()
    connect(state, C1, 1)
    new = one(register(state), S1, NewSession)  # its connect stays outstanding
    state.receive(C2, Terminate(4, "echo", TerminationReason.ADMINISTRATOR))
    assert connect(state, C2, 5) == []  # held, and no start while the name is taken
    assert state.service_exited("Echo", "exited with status 0", "") == []  # name still taken
    actions = state.receive(S1, Complete(new.msg_id, errors.KErrNone, ()))  # drained: released
    assert spawns(actions) == [Spawn(service())]


def test_the_activatable_list_is_answered_to_any_peer() -> None:
    state = new_state(services=[service("b"), service("A")])
    start_client(state)
    connect(state, C1, 1, "b")
    reply = one(state.receive(C1, ListActivatable(8)), C1, ActivatableList)
    assert unpack_activatable(reply.rows) == [("A", "activatable"), ("b", "starting")]


# -- a services directory (files, no processes) ------------------------------------------------


def test_a_services_directory_is_read_one_file_per_name(tmp_path) -> None:
    from ipcfw.kernel.spawner import command_of, load_services

    (tmp_path / "app").mkdir()
    (tmp_path / "echo.toml").write_text('command = "ipcfw serve m:C"\nworking_directory = "app"')
    (tmp_path / "kv.toml").write_text('command = ["sh", "-c", "exit 1"]')
    (tmp_path / "notes.txt").write_text("not a service")
    echo, kv = load_services(str(tmp_path))
    assert (echo.name, kv.name) == ("echo", "kv")
    assert echo.working_directory == str(tmp_path / "app")  # relative to the directory
    assert command_of(echo)[1:] == ["-m", "ipcfw", "serve", "m:C"]  # the kernel's own ipcfw
    assert command_of(kv) == ["sh", "-c", "exit 1"]


@pytest.mark.parametrize("text, key, problem", [
    ('command = "ipcfw serve m:C"\nworking_directory = "missing"', "working_directory",
     "is not a directory"),
    ('command = "no-such-program-ipcfw serve"', "command", "is not found on the PATH"),
    ('command = "./missing.sh"', "command", "is not an executable file"),
])
def test_a_service_whose_directory_or_program_is_missing_is_refused(
    tmp_path, text: str, key: str, problem: str
) -> None:
    from ipcfw.kernel.spawner import load_services

    (tmp_path / "echo.toml").write_text(text)
    with pytest.raises(ServiceFileError) as caught:
        load_services(str(tmp_path))
    assert caught.value.source == str(tmp_path / "echo.toml") and caught.value.key == key
    assert problem in caught.value.problem


def test_a_missing_services_directory_is_refused(tmp_path) -> None:
    from ipcfw.kernel.spawner import load_services

    with pytest.raises(ServiceFileError, match="cannot read the services directory"):
        load_services(str(tmp_path / "nope"))
