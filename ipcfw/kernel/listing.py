"""The kernel's introspection: the session, server and process lists (``ipcfw ps``). No I/O.

Theory of operation
-------------------
`ListSessions`, `ListServers` and `ListProcesses` are answered from the kernel's tables, a page
at a time. `Lists` reads those tables (the state's own dicts, which `KernelState` alone
changes: it hands them over once, and reads nothing back but what the methods return) and
makes the pages; the lists waiting for censuses are the state's too (`KernelState.listings`),
given with each call. Times come in as arguments (`now`, the loop's clock).

Rules this module keeps (rule 12 of `ipcfw.kernel.state`):

1. A page is the next `SESSIONS_PAGE` sessions by handle, `SERVERS_PAGE` servers by name key,
   or `PROCESSES_PAGE` processes by pid, after the last one the asker saw; its `more` (the
   last one's handle, key or pid) is set only when the page is full.
2. When a page counts what servers taking direct connections hold (a session page with
   direct sessions, a server page with such servers that have direct sessions, any process
   page while one of them does), those servers are first asked what is in service on their
   direct connections (`Census`, one at a time per server), and the list waits in the
   state's `listings` until each has answered (`census`) or gone (`done`). At most
   `MAX_LISTINGS` lists wait at once; past it a list is answered at once with the counts the
   servers last reported.
3. Every message the kernel holds has an age: `now` when it was made; a census says how
   long its oldest has been in service, per session and client process; a row shows how many
   messages are outstanding (the kernel's and the last census's) and the oldest one's age.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

from ..protocol import (
    PROCESSES_PAGE,
    SERVERS_PAGE,
    SESSIONS_PAGE,
    Census,
    ListProcesses,
    ListServers,
    ListSessions,
    Message,
    ProcessList,
    ProcessRow,
    Role,
    ServerList,
    ServerRow,
    SessionList,
    SessionRow,
    pack_process_rows,
    pack_server_rows,
    pack_session_rows,
    unpack_census,
)
from ..naming import lookup_key
from .tables import MessageRecord, Peer, ProcessKey, ProcessRecord, ServerRecord, SessionRecord

__all__ = ["MAX_LISTINGS", "ListRequest", "Listing", "Lists"]

#: Session lists (`ListSessions`) waiting for servers' censuses at once; past it, a list is
#: answered at once with the counts the servers last reported.
MAX_LISTINGS = 64

#: A request for a page of a list.
ListRequest = ListSessions | ListServers | ListProcesses


@dataclass(eq=False)
class Listing:
    """A list (ListSessions, ListServers, ListProcesses) waiting for the censuses of the
    servers whose direct connections its page counts."""

    rid: bytes
    message: ListRequest
    waiting: set[bytes]  # routing ids of the servers not yet answered


class Lists:
    """The lists over the state's tables (given once, by reference: the state never rebinds
    them). Each method returns the frames to send, as (routing id, message) pairs."""

    def __init__(
        self,
        *,
        peers: dict[bytes, Peer],
        processes: dict[ProcessKey, ProcessRecord],
        servers: dict[str, ServerRecord],
        server_of_peer: dict[bytes, ServerRecord],
        sessions: dict[int, SessionRecord],
        messages: dict[int, MessageRecord],
    ) -> None:
        self.peers = peers
        self.processes = processes
        self.servers = servers
        self.server_of_peer = server_of_peer
        self.sessions = sessions
        self.messages = messages

    def ask(self, rid: bytes, message: ListRequest, now: float, listings: list[Listing]
            ) -> list[tuple[bytes, Message]]:
        """Channel `rid` asks for a page: the page, or, if it counts what servers hold on their
        direct connections, first the Census of each of them not asked yet, the list waiting
        in `listings` (the state's) for their answers (rule 2)."""
        servers = [s for s in self._census_servers(message) if s.rid in self.server_of_peer]
        if not servers or len(listings) >= MAX_LISTINGS:
            return [(rid, self._page(message, now))]
        listings.append(Listing(rid, message, {s.rid for s in servers}))
        frames: list[tuple[bytes, Message]] = []
        for server in sorted(servers, key=lambda s: s.name):
            if not server.census_asked:
                server.census_asked = True
                frames.append((server.rid, Census(0)))
        return frames

    def census(self, server: ServerRecord, counts: bytes, now: float, listings: list[Listing]
               ) -> list[tuple[bytes, Message]]:
        """`server` answered its Census with `counts` (raises `ProtocolError` if they do not
        decode, before anything changes): the lists of `listings` it completes."""
        items = unpack_census(counts)
        server.census = {
            (item.handle, item.pid): (item.messages, item.slots_used, now - item.oldest / 1000)
            for item in items if item.handle in server.sessions and item.messages
        }
        server.census_asked = False
        return self.done(server.rid, now, listings)

    def done(self, server_rid: bytes, now: float, listings: list[Listing]
             ) -> list[tuple[bytes, Message]]:
        """Server `server_rid` answered its Census, or is gone: the lists of `listings` it
        completes (taken out), to the channels still there."""
        frames: list[tuple[bytes, Message]] = []
        for listing in list(listings):
            listing.waiting.discard(server_rid)
            if not listing.waiting:
                listings.remove(listing)
                if listing.rid in self.peers:
                    frames.append((listing.rid, self._page(listing.message, now)))
        return frames

    def _census_servers(self, message: ListRequest) -> set[ServerRecord]:
        """The servers whose census the page `message` asks for counts."""
        if type(message) is ListSessions:
            return {s.server for s in self._session_page(message.after) if s.direct}
        if type(message) is ListServers:
            servers: Iterable[ServerRecord] = self._server_page(message.after)
        else:
            servers = self.servers.values()  # (any may serve any process)
        return {s for s in servers if s.direct and any(self.sessions[h].direct for h in s.sessions)}

    def _page(self, message: ListRequest, now: float) -> Message:
        if type(message) is ListSessions:
            sessions = self._session_page(message.after)
            more = sessions[-1].handle if len(sessions) == SESSIONS_PAGE else 0
            rows = pack_session_rows([self._session_row(s, now) for s in sessions])
            return SessionList(message.req_id, more, rows)
        if type(message) is ListServers:
            servers = self._server_page(message.after)
            key = lookup_key(servers[-1].name) if len(servers) == SERVERS_PAGE else ""
            server_rows = pack_server_rows([self._server_row(s, now) for s in servers])
            return ServerList(message.req_id, key, server_rows)
        assert type(message) is ListProcesses
        pid = message.after
        processes = sorted((p for p in self.processes.values() if p.identity.pid > pid),
                           key=lambda p: p.identity.pid)
        processes = processes[:PROCESSES_PAGE]
        last = processes[-1].identity.pid if len(processes) == PROCESSES_PAGE else 0
        process_rows = pack_process_rows(self._process_rows(processes))
        return ProcessList(message.req_id, last, process_rows)

    def _session_page(self, after: int) -> list[SessionRecord]:
        handles = sorted(h for h in self.sessions if h > after)[:SESSIONS_PAGE]
        return [self.sessions[h] for h in handles]

    def _server_page(self, after: str) -> list[ServerRecord]:
        keys = sorted(key for key in self.servers if key > after)[:SERVERS_PAGE]
        return [self.servers[key] for key in keys]

    def _session_row(self, session: SessionRecord, now: float) -> SessionRow:
        threads: collections.Counter[ProcessRecord] = collections.Counter(
            self.peers[rid].process for rid in session.attached
        )
        holders = tuple(sorted((p.identity.pid, threads[p]) for p in session.holders))
        census = session.server.census
        direct = [entry for (handle, _), entry in census.items()
                  if handle == session.handle] if session.direct else []
        outstanding, oldest = _outstanding(
            (self.messages[m] for m in session.messages), direct, now
        )
        slots_used = session.slots_used + sum(slots for _, slots, _ in direct)
        return SessionRow(session.handle, session.server.name, int(session.direct),
                          session.state.value, outstanding, holders, oldest,
                          session.creator.process.identity.pid, session.thread,
                          slots_used, session.slots, _age(session.since, now))

    def _server_row(self, server: ServerRecord, now: float) -> ServerRow:
        outstanding, oldest = _outstanding(
            server.messages.values(), (entry for _, entry in _census_of(server)), now
        )
        identity = server.process.identity
        state = "running" if server.terminating is None else "terminating"
        return ServerRow(server.name, identity.pid, identity.exe, server.version, server.sharing,
                         bool(server.direct), len(server.sessions), outstanding, oldest,
                         _age(server.since, now), state)

    def _process_rows(self, processes: list[ProcessRecord]) -> list[ProcessRow]:
        direct: collections.Counter[int] = collections.Counter()  # pid -> in service
        for server in self.servers.values():
            for pid, (count, _, _) in _census_of(server):
                direct[pid] += count
        rows = []
        for process in processes:
            peers = [self.peers[rid] for rid in process.peers]
            identity = process.identity
            names = tuple(sorted(self.server_of_peer[p.rid].name for p in peers
                                 if p.rid in self.server_of_peer))
            rows.append(ProcessRow(
                identity.pid, identity.uid, identity.exe,
                sum(p.role is Role.CHANNEL for p in peers), process.inbox is not None, names,
                len(process.sessions), process.outstanding + direct[identity.pid],
            ))
        return rows


def _age(since: float, now: float) -> int:
    """Milliseconds from `since` to `now` (never negative)."""
    return max(0, int((now - since) * 1000))


def _outstanding(records: Iterable[MessageRecord], direct: Iterable[tuple[int, int, float]],
                 now: float) -> tuple[int, int]:
    """How many messages `records` and the census entries `direct` ((count, slots used,
    since) each) hold, and the oldest one's age in ms (0 with none)."""
    count, oldest = 0, now
    for record in records:
        count += 1
        oldest = min(oldest, record.since)
    for n, _, since in direct:
        count += n
        oldest = min(oldest, since)
    return count, _age(oldest, now) if count else 0


def _census_of(server: ServerRecord) -> list[tuple[int, tuple[int, int, float]]]:
    """(client pid, (count, slots used, since)) of `server`'s last census, for its sessions
    still open on the direct path (a census is not pruned as sessions end)."""
    return [(pid, entry) for (handle, pid), entry in server.census.items()
            if handle in server.sessions]
