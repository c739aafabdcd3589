"""HTTP CONNECT proxy on a unix socket: kube-apiserver's egress selector ("cluster") in the lab's
kubelet mode, so that `kubectl logs/exec/port-forward` reach the kubelets on the node network.

Runs inside the lab's bridge namespace (hm-lab) and connects only to addresses inside the
network given as the second argument (the lab's node network); everything else gets 403.

usage: egress-proxy.py SOCKET NETWORK
"""

import asyncio
import ipaddress
import os
import sys

SOCKET = sys.argv[1]
ALLOWED = ipaddress.ip_network(sys.argv[2])
CONNECT_TIMEOUT_SECONDS = 5


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def handle(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        host, port = target.rsplit(":", 1)
        if method != "CONNECT" or ipaddress.ip_address(host.strip("[]")) not in ALLOWED:
            writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT_SECONDS
        )
    except (ValueError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


async def main():
    if os.path.exists(SOCKET):
        os.unlink(SOCKET)
    server = await asyncio.start_unix_server(handle, SOCKET)
    os.chmod(SOCKET, 0o600)
    async with server:
        await server.serve_forever()


asyncio.run(main())
