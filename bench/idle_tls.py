#!/usr/bin/env python3
"""Open COUNT TLS connections to HOST:PORT and hold them idle, for bench/run.sh's memory-per-idle-
connection figures.

Stage 1: each connection completes a TLS handshake (ALPN http/1.1, no certificate check, no SNI when
HOST is an IP address) and sends nothing. When all are open (or failed), the line
`stage=handshake open=N failed=M seconds=S` is written to --ready-file (and stdout).
Stage 2, on SIGUSR1: one HTTP/1.1 keep-alive `GET /` on each open connection, response read in full,
so that the server then holds idle keep-alive connections; the line `stage=request ok=N failed=M ...`
is written the same way. The connections are held until SIGTERM/SIGINT or --hold seconds pass.
"""
import argparse
import asyncio
import os
import resource
import signal
import ssl
import sys
import time


async def handshake(host, port, ctx, server_hostname, sem, conns, errors):
    async with sem:
        try:
            conn = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_hostname),
                timeout=30,
            )
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"connect: {type(e).__name__}: {e}")
            return
        conns.append(conn)


async def request(host, port, conn, sem, errors):
    reader, writer = conn
    async with sem:
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
            status = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await asyncio.wait_for(reader.readexactly(length), timeout=30)
            if not status.startswith(b"2"):
                errors.append(f"status {status.decode()}")
                return False
            return True
        except Exception as e:  # noqa: BLE001
            errors.append(f"request: {type(e).__name__}: {e}")
            return False


def report(path, line):
    print(line, flush=True)
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, path)


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--concurrency", type=int, default=64, help="handshakes/requests in flight at once")
    ap.add_argument("--ready-file", help="where each stage's result line is written")
    ap.add_argument("--hold", type=float, default=120, help="longest time to hold the connections (s)")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.count + 100
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            sys.exit(f"idle_tls: need {want} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    is_ip = all(part.isdigit() for part in args.host.split("."))
    server_hostname = "" if is_ip else args.host

    loop = asyncio.get_running_loop()
    stop, go = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    deadline = time.monotonic() + args.hold

    conns, errors = [], []
    sem = asyncio.Semaphore(args.concurrency)
    start = time.monotonic()
    await asyncio.gather(
        *(handshake(args.host, args.port, ctx, server_hostname, sem, conns, errors) for _ in range(args.count))
    )
    line = f"stage=handshake open={len(conns)} failed={len(errors)} seconds={time.monotonic() - start:.1f}"
    if errors:
        line += f" first_error={errors[0]!r}"
    report(args.ready_file, line)

    waiter = asyncio.ensure_future(stop.wait())
    gowait = asyncio.ensure_future(go.wait())
    await asyncio.wait({waiter, gowait}, timeout=max(0, deadline - time.monotonic()),
                       return_when=asyncio.FIRST_COMPLETED)
    if go.is_set() and not stop.is_set():
        errors.clear()
        start = time.monotonic()
        results = await asyncio.gather(*(request(args.host, args.port, c, sem, errors) for c in conns))
        line = f"stage=request ok={sum(results)} failed={len(errors)} seconds={time.monotonic() - start:.1f}"
        if errors:
            line += f" first_error={errors[0]!r}"
        report(args.ready_file, line)
        await asyncio.wait({waiter}, timeout=max(0, deadline - time.monotonic()))
    for _, writer in conns:
        writer.transport.abort()


if __name__ == "__main__":
    asyncio.run(main())
