# Minimal HTTP CONNECT proxy on a unix socket, for kube-apiserver's egress selector ("cluster").
# Runs inside the lab's bridge namespace, so it reaches the kubelets on the node network only.
import asyncio, ipaddress, os, sys
SOCK = sys.argv[1]
ALLOWED = ipaddress.ip_network(sys.argv[2])   # e.g. 192.168.177.0/24
async def pipe(r, w):
    try:
        while (b := await r.read(65536)):
            w.write(b); await w.drain()
    except Exception: pass
    finally:
        try: w.close()
        except Exception: pass
async def handle(r, w):
    try:
        head = await r.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        host, port = target.rsplit(":", 1)
        if method != "CONNECT" or ipaddress.ip_address(host.strip("[]")) not in ALLOWED:
            w.write(b"HTTP/1.1 403 Forbidden\r\n\r\n"); await w.drain(); w.close(); return
        ur, uw = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    except Exception as e:
        w.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"); w.close(); return
    w.write(b"HTTP/1.1 200 Connection established\r\n\r\n"); await w.drain()
    await asyncio.gather(pipe(r, uw), pipe(ur, w))
async def main():
    if os.path.exists(SOCK): os.unlink(SOCK)
    srv = await asyncio.start_unix_server(handle, SOCK)
    os.chmod(SOCK, 0o600)
    async with srv: await srv.serve_forever()
asyncio.run(main())
