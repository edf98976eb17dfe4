"""Request limits: a cap on body size (pure ASGI, so it holds for chunked bodies too) and a per-token
rate limit (a token bucket per token, in the server's memory)."""

from __future__ import annotations

import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """Refuse (413) a request whose body is over `max_bytes`: at once when Content-Length says so, else
    as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = b'{"detail":"request body too large (at most %d bytes)"}' % self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _reply(send, 400, b'{"detail":"bad Content-Length"}')
                    return
                if declared > self.max_bytes:
                    await _reply(send, 413, message)
                    return
        received = 0
        started = False
        refused = False

        async def limited_receive() -> Message:
            # Past the limit, answer 413 here and tell the app the client went away: raising instead
            # would be caught by the framework's body parsing and turned into a 400.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await _reply(send, 413, message)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been sent; drop whatever the app answers after the disconnect
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        await self.app(scope, limited_receive, guarded_send)


class RateLimiter:
    """A token bucket per key: `rate` requests per second on average, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate limit needs rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        # Every token a request names gets a bucket, unknown ones included (so guessing is limited too);
        # past `max_keys` buckets the full ones are dropped (a full bucket is the same as none), and under
        # a flood all but the most recent half, so made-up tokens cannot grow the server's memory unbounded.
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate  # seconds in which an empty bucket refills
        kept = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        if len(kept) >= self.max_keys // 2:  # a flood of fresh keys: keep the most recent half
            recent = sorted(kept.items(), key=lambda item: item[1][1])[len(kept) - self.max_keys // 2 :]
            kept = dict(recent)
        self._buckets = kept

    def allow(self, key: str) -> float:
        """0 when the request may go ahead (and takes a token), else seconds to wait before retrying."""
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) >= self.max_keys and key not in self._buckets:
                self._prune(now)
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
