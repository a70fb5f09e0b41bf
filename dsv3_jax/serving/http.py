"""The HTTP server around the app: uvicorn with read, idle and shutdown timeouts.

uvicorn times out idle keep-alive connections but never a client that sends its request slowly: a connection
that dribbles its headers (or body) a byte at a time stays open for ever, and a few hundred such clients use up
the server's sockets. :class:`ReadTimeoutH11` closes a connection whose request is not fully received
``read_timeout`` seconds after the connection opened (or after its previous response finished). A request that
has arrived completely is never timed out: generation may take as long as it takes.

    config = server_config(app, host="127.0.0.1", port=8000, read_timeout=30)
    uvicorn.Server(config).run()
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

READ_TIMEOUT_S = 30.0  # to send one request's headers and body
KEEP_ALIVE_S = 5  # idle between requests on one connection (uvicorn's default)
SHUTDOWN_S = 10  # SIGTERM/SIGINT: longest wait for requests in flight before closing their connections


class ReadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for receiving each request (class attribute ``read_timeout``)."""

    read_timeout: float = READ_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _received_all(self) -> bool:
        return self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self._received_all() and not self.transport.is_closing():
            self.logger.info("closing a connection that did not send its request within %g s", self.read_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._received_all():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._received_all():  # waiting for the next request
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_config(app: Any, host: str = "127.0.0.1", port: int = 8000, *, read_timeout: float = READ_TIMEOUT_S,
                  keep_alive: int = KEEP_ALIVE_S, shutdown_timeout: int = SHUTDOWN_S,
                  log_level: str = "info") -> uvicorn.Config:
    """A uvicorn config serving ``app`` over h11 with the read, keep-alive and graceful-shutdown timeouts."""
    if read_timeout <= 0 or keep_alive <= 0 or shutdown_timeout < 0:
        raise ValueError(f"timeouts must be positive (read {read_timeout}, keep-alive {keep_alive}, "
                         f"shutdown {shutdown_timeout})")
    protocol = type("ReadTimeoutH11", (ReadTimeoutH11,), {"read_timeout": float(read_timeout)})
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=keep_alive,
                          timeout_graceful_shutdown=shutdown_timeout, log_level=log_level)
