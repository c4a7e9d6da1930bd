"""A TCP proxy in front of Postgres that can cut a connection at the worst moment:
right after the client's COMMIT reached the server, before its answer comes back.

The server then commits while the client sees its connection die, and cannot know
whether its transaction committed: the case a group commit must get right without
storing a group twice or acknowledging one that is not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class CommitCutter:
    """Forwards 127.0.0.1:`port` to Postgres on `upstream`, in a thread of its own.
    `arm(n)`: the next n connections whose client sends a COMMIT are cut right after
    it is forwarded; `cuts` counts the connections cut so far."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.cuts = 0
        self._armed = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def arm(self, count: int = 1) -> None:
        with self._lock:
            self._armed = count

    def _take_cut(self) -> bool:
        with self._lock:
            if self._armed <= 0:
                return False
            self._armed -= 1
            self.cuts += 1
            return True

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            client_w.transport.abort()
            return

        cutting = asyncio.Event()

        async def upward() -> None:
            while data := await client_r.read(65536):
                # asyncpg ends a transaction with the simple query "COMMIT;".
                if b"COMMIT" in data and self._take_cut():
                    cutting.set()
                server_w.write(data)
                await server_w.drain()
            server_w.write_eof()

        async def downward() -> None:
            while data := await server_r.read(65536):
                if cutting.is_set():
                    # The server's answer to COMMIT: it has committed. The client
                    # never learns it.
                    raise ConnectionResetError("cut after COMMIT")
                client_w.write(data)
                await client_w.drain()

        # Either side ending (or the cut) ends the connection on both sides.
        tasks = [asyncio.ensure_future(upward()), asyncio.ensure_future(downward())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for writer in (client_w, server_w):
            writer.transport.abort()

    def __enter__(self) -> CommitCutter:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def commit_cutter(upstream: int) -> Iterator[CommitCutter]:
    with CommitCutter(upstream) as cutter:
        yield cutter
