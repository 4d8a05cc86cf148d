"""A small real MCP server (PyPI `mcp`) for kya's tests.

    server.py --port N [--host ADDR] [--transport streamable-http|sse] [--json]

Tools: search_docs(query), delete_records(table), transfer(amount, to). DNS-rebinding
protection is off because the tests reach it through kya's proxy, whose address
is the Host the client sends.
"""

import argparse
import os

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

server = MCPServer("kya-test-peer")


def record(name: str) -> None:
    """Append the tool that really ran to $KYA_PEER_LOG: the server's own record."""
    path = os.environ.get("KYA_PEER_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(name + "\n")


@server.tool()
def search_docs(query: str) -> str:
    """Search the documentation."""
    record("search_docs")
    return f"found 3 documents about {query}"


@server.tool()
def delete_records(table: str) -> str:
    """Delete every record of a table."""
    record("delete_records")
    return f"deleted all records of {table}"


@server.tool()
def transfer(amount: int, to: str) -> str:
    """Transfer money."""
    record("transfer")
    return f"transferred {amount} to {to}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--transport", default="streamable-http", choices=["streamable-http", "sse"])
    p.add_argument("--json", action="store_true", help="answer POSTs with application/json")
    a = p.parse_args()
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if a.transport == "sse":
        server.run("sse", host=a.host, port=a.port, transport_security=security)
    else:
        server.run(
            "streamable-http",
            host=a.host,
            port=a.port,
            json_response=a.json,
            transport_security=security,
        )


if __name__ == "__main__":
    main()
