"""Running the app under uvicorn with bounds on what clients can hold: header and body read time, idle
keep-alive, open connections, header size; and a bounded drain on SIGTERM.

uvicorn bounds idle keep-alive (``timeout_keep_alive``) and header size (h11's incomplete-event limit) itself;
it has no header timeout, and its ``limit_concurrency`` answers 503 only once the request is read (the connection
and its file descriptor stay held). :class:`GuardedH11Protocol` adds both: a connection whose request line and
headers are not complete within ``header_timeout_s`` is closed, and one over ``max_connections`` (or over
``max_connections_per_client`` from one IP address, so clients that reconnect in a storm cannot take every slot)
is answered 503 and closed as soon as it is accepted. The body read time is bounded in the app
(``middleware.BodyLimit``). Every refused client is one log line, never a traceback, and lines are rate limited
(:class:`LogRateLimit`) so a storm of refusals cannot grow the log by megabytes a minute.

Drain (:class:`GradstoreServer`): on SIGTERM (or Ctrl-C) the server keeps accepting for a while but answers every
new request 503 with ``Connection: close`` (``middleware.Drain``), lets requests in flight finish, and then shuts
down: once none is in flight, or ``drain_s`` after the signal, whichever comes first. Requests still in flight when
``drain_s`` is over are answered 503 + Retry-After (``Lifecycle.expire``), never a 500, and the process exits
within a fraction of a second. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import threading
import time
from collections import Counter
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..run.config import ServerConfig
from .middleware import Lifecycle

__all__ = ["GradstoreServer", "GuardedH11Protocol", "LogRateLimit", "connection_limits", "serve", "uvicorn_config"]

logger = logging.getLogger("uvicorn.error")

FD_RESERVE = 32  # file descriptors kept for the process's own later use (store and index files, logs)
ACCEPT_BURSTS = 4
LINGER_S = 0.5  # after the last in-flight answer, how long clients still get a 503 rather than a refused connect
EXIT_GRACE_S = 0.5  # after the drain: what uvicorn waits for the 503s of requests cut short to be written
# A refusal sent while the client is still sending its body: half-close and discard what follows for at most this
# long / this many bytes before closing, so the client reads the answer instead of a reset (closing a socket with
# unread bytes makes the kernel send RST, which also drops the answer from the client's receive buffer).
DISCARD_S = 2.0
DISCARD_BYTES = 16 << 20
LOG_BURST, LOG_PERIOD_S = 10, 10.0  # log lines of one kind let through per period; the rest are counted


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: assume a modest number
        return 64


def connection_limits(settings: ServerConfig) -> tuple[int, int]:
    """(most open connections, listen backlog) that fit the process's soft file-descriptor limit.

    asyncio accepts up to ``backlog`` connections in one go before any of them can be refused, so the open
    connections, ``ACCEPT_BURSTS`` accept bursts, the descriptors open now and ``FD_RESERVE`` must all fit under
    the limit. A small backlog under a flood only makes the kernel drop SYNs, which clients retry."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections, 2048
    headroom = max(2, soft - _open_fds() - FD_RESERVE)
    connections = max(1, min(settings.max_connections, headroom // 2))
    if connections < settings.max_connections:
        logger.warning(
            "server.max_connections=%d lowered to %d to fit the file-descriptor limit of %d (raise it: ulimit -n)",
            settings.max_connections,
            connections,
            soft,
        )
    # a refused connection's descriptor is closed a few loop iterations after its accept: allow bursts in flight
    return connections, max(1, min(2048, (headroom - connections) // ACCEPT_BURSTS))


def _peer(protocol: H11Protocol) -> str:
    return f"{protocol.client[0]}:{protocol.client[1]}" if protocol.client else "a client"


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a cap on open connections (class attributes, set per
    server by :func:`uvicorn_config`)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000
    max_per_client: int = 256
    per_client: Counter[str]  # open connections per client IP address (one Counter per server's class)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.client_ip: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.discarding: int | None = None  # bytes discarded after a refusal, while lingering
        super().connection_made(_LingeringClose(transport, self))  # type: ignore[arg-type]
        self.client_ip = self.client[0] if self.client else None
        self.per_client[self.client_ip or ""] += 1
        if len(self.connections) > self.max_connections:
            logger.warning(
                "refused %s: %d connections open (server.max_connections)", _peer(self), self.max_connections
            )
            return self._refuse(transport)
        if self.client_ip is not None and self.per_client[self.client_ip] > self.max_per_client:
            logger.warning(
                "refused %s: %d connections open from that address (server.max_connections_per_client)",
                _peer(self),
                self.max_per_client,
            )
            return self._refuse(transport)
        self._arm_header_timer()

    @staticmethod
    def _refuse(transport: asyncio.Transport) -> None:
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b'retry-after: 1\r\ncontent-length: 48\r\n\r\n{"detail": "too many connections; retry later"}\n'
        )
        transport.close()

    def _arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            logger.warning(
                "dropped %s: request headers not complete within %g s (server.header_timeout_s)",
                _peer(self),
                self.header_timeout_s,
            )
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.discarding is not None:
            self.discarding += len(data)
            if self.discarding > DISCARD_BYTES:
                self.transport.close()
            return
        between_requests = self.cycle is None or self.cycle.response_complete
        if between_requests and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # a new request starts: its headers have header_timeout_s from now
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm_header_timer()

    def eof_received(self) -> None:
        if self.discarding is not None:
            self.transport.close()
            return
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        key = self.client_ip or ""
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]
        super().connection_lost(exc)

    # -- drain --------------------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        """A request read completely and not yet answered (the app is working on it)."""
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete and not cycle.more_body

    def drop_unfinished(self) -> None:
        """At shutdown: close the connection unless a request is in flight (slow headers or body, idle)."""
        if not self.in_flight and not self.transport.is_closing():
            self.transport.close()


class _LingeringClose:
    """The connection's transport, whose ``close()`` lingers while the client is still sending the body of the
    request just answered: the answer is flushed and the write side shut (FIN), then the rest of the body is read
    and dropped unparsed (:data:`DISCARD_S`, :data:`DISCARD_BYTES`) until the client closes, then the socket is."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.discarding is not None or self._transport.is_closing()

    def close(self) -> None:
        protocol, transport = self._protocol, self._transport
        mid_body = protocol.conn.their_state is h11.SEND_BODY and protocol.discarding is None
        if not mid_body or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the client is gone already
            transport.close()
            return
        protocol.discarding = 0
        transport.resume_reading()
        protocol.loop.call_later(DISCARD_S, transport.close)


class LogRateLimit(logging.Filter):
    """Lets through at most ``burst`` records of one kind (the message template; for the access log, the status)
    per ``period_s``, and counts the rest; the next record let through says how many were left out. Access-log
    lines of answers under 400 always pass."""

    def __init__(self, burst: int = LOG_BURST, period_s: float = LOG_PERIOD_S) -> None:
        super().__init__()
        self.burst, self.period_s = burst, period_s
        self.windows: dict[object, tuple[float, int, int]] = {}  # kind -> (window start, let through, left out)
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self._kind(record)
        if kind is None:
            return True
        now = time.monotonic()
        with self.lock:
            start, passed, dropped = self.windows.get(kind, (now, 0, 0))
            if now - start >= self.period_s:
                start, passed = now, 0
            if passed >= self.burst:
                self.windows[kind] = (start, passed, dropped + 1)
                return False
            self.windows[kind] = (start, passed + 1, 0)
        if dropped and isinstance(record.msg, str):
            record.msg += f" ({dropped} more like this left out of the log: rate limited)"
        return True

    @staticmethod
    def _kind(record: logging.LogRecord) -> object | None:
        if record.name == "uvicorn.access":
            status = record.args[-1] if isinstance(record.args, tuple) and record.args else None
            return None if isinstance(status, int) and status < 400 else ("access", status)
        return (record.name, record.levelno, str(record.msg))


class GradstoreServer(uvicorn.Server):
    """uvicorn's server with a bounded drain (see the module docstring), one-line accept errors and rate-limited
    logs (while it runs)."""

    LOGGERS = ("uvicorn.error", "uvicorn.access")

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_s: float) -> None:
        super().__init__(config)
        self.lifecycle, self.drain_s = lifecycle, drain_s
        self.drain_deadline: float | None = None
        self.idle_since: float | None = None
        self.log_limit = LogRateLimit()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None:  # a second signal: stop waiting
            self.force_exit = self.should_exit = True
            return
        if self.drain_s == 0:
            self.lifecycle.draining = True  # what is still in flight at shutdown is answered 503
            return super().handle_exit(sig, frame)
        self.drain_deadline = time.monotonic() + self.drain_s
        self.lifecycle.draining = True
        self._captured_signals.append(sig)  # uvicorn re-raises it once shut down, as it does without a drain

    async def serve(self, sockets: Any = None) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self.log_limit)
        try:
            await super().serve(sockets=sockets)
        finally:
            for name in self.LOGGERS:
                logging.getLogger(name).removeFilter(self.log_limit)

    async def startup(self, sockets: Any = None) -> None:
        asyncio.get_running_loop().set_exception_handler(_one_line_errors)
        await super().startup(sockets=sockets)
        if self.lifecycle.draining:  # a signal during startup
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            now = time.monotonic()
            busy = any(getattr(c, "in_flight", False) for c in self.server_state.connections)
            self.idle_since = None if busy else (self.idle_since or now)
            if now >= self.drain_deadline or (self.idle_since is not None and now - self.idle_since >= LINGER_S):
                self._end_drain()
        return await super().on_tick(counter)

    def _end_drain(self) -> None:
        cut = self.lifecycle.expire()  # each answered 503 + Retry-After
        logger.info("drain over: %d request(s) still in flight answered 503; shutting down", cut)
        for connection in list(self.server_state.connections):
            if isinstance(connection, GuardedH11Protocol):
                connection.drop_unfinished()
        self.config.timeout_graceful_shutdown = EXIT_GRACE_S  # type: ignore[assignment]  # a float works as well
        self.should_exit = True


def _one_line_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The event loop's errors (accept() out of file descriptors, a reset connection) as one log line."""
    error = context.get("exception")
    logger.warning("%s%s", context.get("message", "event loop error"), f": {error!r}" if error else "")


def uvicorn_config(app: Any, host: str, port: int, settings: ServerConfig, log_level: str = "info") -> uvicorn.Config:
    """uvicorn settings from ``[server]``: timeouts, connection and header limits (see the module docstring)."""
    max_connections, backlog = connection_limits(settings)
    protocol = type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_connections": max_connections,
            "max_per_client": settings.max_connections_per_client,
            "per_client": Counter(),
        },
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # uvicorn takes a float as well
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=settings.drain_s,  # type: ignore[arg-type]
        backlog=backlog,
    )


def serve(app: Any, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` (from :func:`~gradstore.server.http.app.create_app`) on ``host:port`` until SIGTERM/SIGINT."""
    settings: ServerConfig = app.state.settings
    server = GradstoreServer(
        uvicorn_config(app, host, port, settings, log_level), app.state.lifecycle, settings.drain_s
    )
    server.run()
