"""Raw HTTP/1.1 over asyncio streams, for tests that need what a client
library hides: pipelining, half-sent heads, exact bytes after an answer."""

from __future__ import annotations

import asyncio


async def read_answer(reader: asyncio.StreamReader, head_request: bool = False) -> tuple[bytes, bytes]:
    """One answer's head and body (no body for an answer to HEAD)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, (b"" if head_request else await reader.readexactly(length))


async def closed_within(reader: asyncio.StreamReader, within_s: float = 10.0) -> bool:
    """True when the server ends the connection (EOF or reset) within
    ``within_s``; whatever it sent first is read and dropped."""
    try:
        while await asyncio.wait_for(reader.read(65536), within_s):
            pass
    except ConnectionError:  # a reset, or our own write failing on the closed socket
        pass
    except TimeoutError:
        return False
    return True
