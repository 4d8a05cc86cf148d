"""Crash-test load (PyPI `mcp`): WORKERS sessions make mixed tool calls until
killed, and print one JSON line for every answer the agent actually received.

    load.py URL TAG [--workers N]

Worker 0 rotates through an allow (search_docs), a deny (delete_records) and a
hold (transfer above the limit); the other workers make allows and denies only
(kya keys a held call by session and JSON-RPC id, and a stateless server gives
every session of one process the same key, so concurrent holds with equal ids
from one process would be refused as ambiguous). Every call's arguments are
unique (TAG, worker, number), so an answer can be matched to its audit record by
the SHA-256 of the canonical arguments. Each line: {"tool", "args", "args_sha256", "isError",
"text"}; a transport failure prints {"error"} and ends that worker.
"""

import argparse
import asyncio
import hashlib
import json
import sys

from mcp import Client


def digest(args: dict) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces), as kya records it."""
    text = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def worker(url: str, tag: str, w: int) -> None:
    try:
        async with Client(url) as client:
            n = 0
            while True:
                unique = f"{tag}-{w}-{n}"
                kind = n % 3 if w == 0 else (n + w) % 2
                if kind == 0:
                    tool, args = "search_docs", {"query": unique}
                elif kind == 1:
                    tool, args = "delete_records", {"table": unique}
                else:
                    tool, args = "transfer", {"amount": 5000 + n, "to": unique}
                result = await client.call_tool(tool, args, read_timeout_seconds=15)
                text = "".join(getattr(c, "text", "") for c in result.content)
                emit({"tool": tool, "args": args, "args_sha256": digest(args),
                      "isError": bool(result.is_error), "text": text})
                n += 1
    except BaseException as e:  # noqa: BLE001 - the daemon is killed under us
        emit({"error": repr(e)})


async def run(a: argparse.Namespace) -> None:
    await asyncio.gather(*(worker(a.url, a.tag, w) for w in range(a.workers)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("tag")
    p.add_argument("--workers", type=int, default=4)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
