"""A real MCP client (PyPI `mcp`) for kya's tests: call one tool, print JSON.

    client.py URL TOOL [JSON_ARGS] [--sse] [--progress] [--header "NAME: VALUE"]...
    client.py URL --list [--sse]

Prints {"isError": bool, "text": str, "progress": [messages...]} or
{"tools": [names]}; exit 0 unless the transport failed.
"""

import argparse
import asyncio
import json
import sys

from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def run(a: argparse.Namespace) -> dict:
    if a.sse:
        target = sse_client(a.url)
    elif a.header:
        # Extra headers on every request (e.g. a forged Kya-Decision).
        headers = dict(h.split(":", 1) for h in a.header)
        target = streamable_http_client(
            a.url, http_client=create_mcp_http_client(headers={k.strip(): v.strip() for k, v in headers.items()})
        )
    else:
        target = a.url
    progress: list = []

    async def on_progress(value, total, message):
        progress.append(message)

    async with Client(target) as client:
        if a.list:
            tools = await client.list_tools()
            return {"tools": [t.name for t in tools.tools]}
        args = json.loads(a.args) if a.args else {}
        result = await client.call_tool(
            a.tool, args, read_timeout_seconds=a.timeout,
            progress_callback=on_progress if a.progress else None,
        )
        text = "".join(getattr(c, "text", "") for c in result.content)
        return {"isError": bool(result.is_error), "text": text, "progress": progress}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("tool", nargs="?")
    p.add_argument("args", nargs="?")
    p.add_argument("--sse", action="store_true")
    p.add_argument("--list", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--header", action="append", default=[], metavar="NAME: VALUE")
    a = p.parse_args()
    try:
        out = asyncio.run(run(a))
    except BaseException as e:  # noqa: BLE001 - report any transport failure as JSON
        print(json.dumps({"error": repr(e)}))
        sys.exit(2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
