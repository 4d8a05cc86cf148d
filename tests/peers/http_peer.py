"""A raw HTTP/1.1 MCP server (stateless, JSON answers) whose connection
handling the tests control exactly, for kya's transparency tests:

    http_peer.py --port N --log FILE [--host IP] [--certfile C --keyfile K]
                 [--close-every N] [--idle-timeout S]
                 [--require-auth] [--notify-result] [--big-bytes N]

* --close-every N: the Nth request on a connection is answered with
  `Connection: close` and the connection closed (nginx's keepalive_requests).
* --idle-timeout S: a kept-alive connection idle for S seconds is closed.
* --require-auth: a POST without `Authorization` gets what the TypeScript SDK's
  requireBearerAuth answers: 401, `WWW-Authenticate`, and an OAuth error body.
* --notify-result: a notification is answered `200 {"jsonrpc":"2.0","result":{}}`
  (no id), as some servers do; otherwise 202.

Tools: `echo` (returns its `text`), `big` (a text of --big-bytes bytes).
The log gets one line per event: `call TOOL`, `idle-close`, `close-after N`.
"""

import argparse
import asyncio
import json
import ssl

A = None


def log(line: str) -> None:
    with open(A.log, "a") as f:
        f.write(line + "\n")


def result(mid, value) -> dict:
    return {"jsonrpc": "2.0", "id": mid, "result": value}


def answer(msg: dict):
    """(status, body bytes or None) for one JSON-RPC message."""
    method = msg.get("method")
    mid = msg.get("id")
    if mid is None:
        if A.notify_result:
            return 200, json.dumps({"jsonrpc": "2.0", "result": {}}).encode()
        return 202, b""
    if method == "initialize":
        pv = (msg.get("params") or {}).get("protocolVersion", "2025-06-18")
        return 200, json.dumps(result(mid, {
            "protocolVersion": pv,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "http-peer", "version": "1"},
        })).encode()
    if method == "tools/list":
        tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("echo", "big")]
        return 200, json.dumps(result(mid, {"tools": tools})).encode()
    if method == "tools/call":
        params = msg.get("params") or {}
        name = params.get("name")
        args = params.get("arguments") or {}
        log(f"call {name}")
        if name == "big":
            text = "x" * A.big_bytes
        else:
            text = str(args.get("text", ""))
        return 200, json.dumps(result(mid, {
            "content": [{"type": "text", "text": text}], "isError": False,
        })).encode()
    if method == "ping":
        return 200, json.dumps(result(mid, {})).encode()
    return 200, json.dumps({"jsonrpc": "2.0", "id": mid,
                            "error": {"code": -32601, "message": "no such method"}}).encode()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    served = 0
    try:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                              A.idle_timeout or None)
            except asyncio.TimeoutError:
                log("idle-close")
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            n = int(headers.get("content-length", "0"))
            body = await reader.readexactly(n) if n else b""
            served += 1
            status, out, extra = 404, b"", []
            ctype = "application/json"
            if path.startswith("/.well-known/oauth-protected-resource"):
                status, out = 200, json.dumps({
                    "resource": f"http://{A.host}:{A.port}/mcp",
                    "authorization_servers": ["http://127.0.0.1:1"],
                }).encode()
            elif method == "POST" and A.require_auth and "authorization" not in headers:
                status = 401
                extra.append(("WWW-Authenticate", 'Bearer error="invalid_token", '
                              f'resource_metadata="http://{A.host}:{A.port}'
                              '/.well-known/oauth-protected-resource"'))
                out = json.dumps({"error": "invalid_token",
                                  "error_description": "Missing Authorization header"}).encode()
            elif method == "POST":
                msg = json.loads(body)
                if isinstance(msg, dict) and "method" not in msg:
                    status, out = 202, b""
                else:
                    status, out = answer(msg)
            elif method == "GET":
                status, out, ctype = 405, b"", "text/plain"
            closing = A.close_every and served % A.close_every == 0
            reason = {200: "OK", 202: "Accepted", 401: "Unauthorized",
                      404: "Not Found", 405: "Method Not Allowed"}[status]
            resp = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}",
                    f"Content-Length: {len(out)}"]
            resp += [f"{k}: {v}" for k, v in extra]
            if closing:
                resp.append("Connection: close")
            writer.write(("\r\n".join(resp) + "\r\n\r\n").encode() + out)
            await writer.drain()
            if closing:
                log(f"close-after {served}")
                return
    finally:
        writer.close()


async def main() -> None:
    ctx = None
    if A.certfile:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(A.certfile, A.keyfile)
        ctx.set_alpn_protocols(["http/1.1"])
    server = await asyncio.start_server(handle, A.host, A.port, reuse_address=True, ssl=ctx)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--certfile")
    p.add_argument("--keyfile")
    p.add_argument("--log", required=True)
    p.add_argument("--close-every", type=int, default=0)
    p.add_argument("--idle-timeout", type=float, default=0)
    p.add_argument("--require-auth", action="store_true")
    p.add_argument("--notify-result", action="store_true")
    p.add_argument("--big-bytes", type=int, default=50_000_000)
    A = p.parse_args()
    asyncio.run(main())
