"""HTTP-level clients for kya's transparency tests (httpx, keep-alive pools,
as real MCP clients use them):

    http_client.py load URL --requests N --workers W
        W workers, each with its own kept-alive connection pool, make N
        `tools/call echo` POSTs each. Prints {"ok", "errors", "samples"}.
    http_client.py steps URL
        One pooled client; reads commands from stdin, one per line, and prints
        one JSON line per command: `call TEXT` (a tools/call echo),
        `call-port TEXT` (the same, with the local port of the connection it
        went over), `notify` (a notification), `raw` (an initialize, answered
        as is).
    http_client.py seq URL TEXT... [--tool-name NAME]
        One pooled client calls NAME (default `echo`) with each TEXT in turn; prints
        {"errors": [null or what was wrong, ...]}.
    http_client.py sdk URL TOOL [--timeout S]
        The real MCP client (PyPI `mcp`) calls TOOL; prints
        {"isError", "len", "sha256"} or {"error"}.
"""

import argparse
import asyncio
import hashlib
import json
import sys
import threading

import httpx

HEADERS = {"Accept": "application/json, text/event-stream",
           "Content-Type": "application/json",
           "MCP-Protocol-Version": "2025-06-18"}


def call_body(i: int, text: str, tool: str = "echo") -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                       "params": {"name": tool, "arguments": {"text": text}}}).encode()


def check(r: httpx.Response, i: int, text: str):
    """None if the answer is the tool's real result, else what was wrong."""
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    try:
        v = r.json()
        got = v["result"]["content"][0]["text"]
    except Exception as e:  # noqa: BLE001 - any malformed answer is an error
        return f"bad answer {e!r}: {r.text[:200]}"
    if v.get("id") != i or got != text:
        return f"wrong answer: {r.text[:200]}"
    return None


def load(a: argparse.Namespace) -> None:
    lock = threading.Lock()
    totals = {"ok": 0, "errors": 0, "samples": []}

    def worker(w: int) -> None:
        ok = errors = 0
        samples = []
        with httpx.Client(timeout=30) as c:
            for n in range(a.requests):
                text = f"w{w}-{n}"
                try:
                    r = c.post(a.url, content=call_body(n + 1, text), headers=HEADERS)
                    err = check(r, n + 1, text)
                except httpx.HTTPError as e:
                    err = repr(e)
                if err is None:
                    ok += 1
                else:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(err)
        with lock:
            totals["ok"] += ok
            totals["errors"] += errors
            totals["samples"] += samples

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(a.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(totals), flush=True)


def steps(a: argparse.Namespace) -> None:
    with httpx.Client(timeout=30) as c:
        n = 0
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            n += 1
            try:
                if cmd in ("call", "call-port"):
                    r = c.post(a.url, content=call_body(n, arg), headers=HEADERS)
                    out = {"error": check(r, n, arg)}
                    if cmd == "call-port":
                        # The local port of the connection the call went over.
                        stream = r.extensions["network_stream"]
                        out["port"] = stream.get_extra_info("client_addr")[1]
                elif cmd == "notify":
                    body = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                    r = c.post(a.url, json=body, headers=HEADERS)
                    out = {"status": r.status_code, "body": r.text}
                else:
                    body = {"jsonrpc": "2.0", "id": n, "method": "initialize", "params": {
                        "protocolVersion": "2025-06-18", "capabilities": {},
                        "clientInfo": {"name": "t", "version": "1"}}}
                    r = c.post(a.url, json=body, headers=HEADERS)
                    out = {"status": r.status_code, "body": r.text,
                           "www_authenticate": r.headers.get("www-authenticate")}
            except httpx.HTTPError as e:
                out = {"error": repr(e)}
            print(json.dumps(out), flush=True)


def seq(a: argparse.Namespace) -> None:
    errors = []
    with httpx.Client(timeout=a.timeout) as c:
        for n, text in enumerate(a.texts, start=1):
            try:
                r = c.post(a.url, content=call_body(n, text, a.tool_name), headers=HEADERS)
                errors.append(check(r, n, text))
            except httpx.HTTPError as e:
                errors.append(repr(e))
    print(json.dumps({"errors": errors}), flush=True)


async def sdk(a: argparse.Namespace) -> None:
    from mcp import Client
    try:
        async with Client(a.url) as client:
            res = await client.call_tool(a.tool, {}, read_timeout_seconds=a.timeout)
            text = "".join(getattr(c, "text", "") for c in res.content)
            out = {"isError": bool(res.is_error), "len": len(text),
                   "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text[:300]}
    except BaseException as e:  # noqa: BLE001 - report any failure as JSON
        out = {"error": repr(e)}
    print(json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["load", "steps", "seq", "sdk"])
    p.add_argument("url")
    p.add_argument("tool", nargs="?")
    p.add_argument("texts", nargs="*")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--tool-name", default="echo")
    a = p.parse_args()
    if a.mode == "load":
        load(a)
    elif a.mode == "steps":
        steps(a)
    elif a.mode == "seq":
        a.texts = ([a.tool] if a.tool else []) + a.texts
        seq(a)
    else:
        asyncio.run(sdk(a))


if __name__ == "__main__":
    main()
