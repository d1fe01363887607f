"""One robust AMQP connection over the nodes of a RabbitMQ cluster (worker and client alike).

aio-pika's `connect_robust` takes one URL and reconnects to it alone. `FailoverConnection` is its
`RobustConnection` with a list of URLs: every (re)connect tries them in turn, starting with the
node after the one that was lost, so a stopped node costs one refused connection and the robust
machinery (channels, declarations, bindings, consumers restored) carries on against another node.
Connection options (`?heartbeat=30&reconnect_interval=2`) are read from the first URL.

    connection = await connect("amqp://u:p@node-a:5672/,amqp://u:p@node-b:5672/")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aio_pika.robust_connection import RobustConnection
from yarl import URL

from consumer.logging import redact_url


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """`urls` as a list: a comma-separated string or a sequence of URLs (blanks dropped)."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip() for u in items if u and u.strip()]
    if not out:
        raise ValueError("no AMQP URL given")
    return out


class FailoverConnection(RobustConnection):
    """A RobustConnection that moves to the next URL of `urls` when a connection is lost or an
    attempt fails."""

    def __init__(self, url: URL, *, urls: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.urls = [URL(u) for u in urls] or [URL(url)]
        self._current = 0

    @property
    def current_url(self) -> str:
        """The node this connection uses (or tries next), password redacted."""
        return redact_url(str(self.urls[self._current]))

    async def _on_connection_close(self, closing: Any) -> None:
        if not (self._close_called or self.is_closed):
            self._current = (self._current + 1) % len(self.urls)  # the lost node is tried last
        await super()._on_connection_close(closing)

    # RobustConnection's reconnect loop calls this (name-mangled) for every attempt; aio-pika has no
    # public hook for the URL of an attempt. tests/consumer/test_connection.py guards the name.
    async def _RobustConnection__connect_transport(self) -> None:
        error: BaseException | None = None
        for _ in range(len(self.urls)):
            tried = self._current
            self.url = self.urls[tried]
            try:
                await RobustConnection._RobustConnection__connect_transport(self)  # type: ignore[attr-defined]
                return
            except Exception as e:  # refused, timed out, or its channels could not be restored
                error = e
                if self._current == tried:  # (a failed attempt usually moved on in the close callback)
                    self._current = (tried + 1) % len(self.urls)
        assert error is not None
        raise error


async def connect(urls: str | Sequence[str], **kwargs: Any) -> FailoverConnection:
    """`aio_pika.connect_robust` over every URL of `urls` (see `split_urls`); `kwargs`: those of
    RobustConnection (client_properties, ...) and `timeout`. Raises the last node's error when none
    answers."""
    listed = split_urls(urls)
    timeout = kwargs.pop("timeout", None)
    connection = FailoverConnection(URL(listed[0]), urls=listed, **kwargs)  # as connect_robust does
    await connection.connect(timeout=timeout)
    return connection
