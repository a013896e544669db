#!/usr/bin/env python3
"""Opens N keep-alive connections to a proxy, sends one request on each, reads
the answer and keeps every connection open, so the proxy's memory per idle
keep-alive connection can be read from /proc (benches/load.sh).

Prints `ready OK_COUNT` once every connection has its answer, then holds them
for HOLD_SECS (the caller kills it sooner once it has measured).

Usage: hold_conns.py HOST PORT PATH N KEY [HOLD_SECS]
"""
import asyncio
import sys


async def one(host, port, request, conns, sem):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await asyncio.wait_for(reader.readexactly(length), 10)
            ok = head.startswith(b"HTTP/1.1 200")
            conns.append((reader, writer))
            return ok
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False


async def main():
    host, port, path, n, key = sys.argv[1:6]
    hold = float(sys.argv[6]) if len(sys.argv) > 6 else 30.0
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nx-proxy-key: {key}\r\n"
        "user-agent: hold-conns\r\n\r\n"
    ).encode()
    conns = []
    sem = asyncio.Semaphore(256)  # opening rate: at most 256 requests in flight
    results = await asyncio.gather(*(one(host, port, request, conns, sem) for _ in range(int(n))))
    print(f"ready {sum(results)}", flush=True)
    await asyncio.sleep(hold)
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
