"""Server-sent events on an aiohttp response, framed as TGI / LoRAX's router (axum) frames them:
`data:<json>\\n\\n` per event, no `event:` or `id:` fields."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class EventStream:
    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self._request = request
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event at once
            **(headers or {})})

    async def open(self) -> None:
        await self.response.prepare(self._request)

    async def send(self, data: Any) -> None:
        """One event; `data` as JSON, or a str sent as it is (OpenAI's `[DONE]`). Raises
        ConnectionResetError when the client has gone."""
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                               separators=(",", ":"))
        await self.response.write(f"data:{text}\n\n".encode())

    async def close(self) -> None:
        await self.response.write_eof()
