"""A small real MCP server (PyPI `mcp`) for kya's tests.

    server.py --port N [--transport streamable-http|sse] [--json]

Tools: search_docs(query), delete_records(table), transfer(amount, to). DNS-rebinding
protection is off because the tests reach it through kya's proxy, whose address
is the Host the client sends.
"""

import argparse

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

server = MCPServer("kya-test-peer")


@server.tool()
def search_docs(query: str) -> str:
    """Search the documentation."""
    return f"found 3 documents about {query}"


@server.tool()
def delete_records(table: str) -> str:
    """Delete every record of a table."""
    return f"deleted all records of {table}"


@server.tool()
def transfer(amount: int, to: str) -> str:
    """Transfer money."""
    return f"transferred {amount} to {to}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--transport", default="streamable-http", choices=["streamable-http", "sse"])
    p.add_argument("--json", action="store_true", help="answer POSTs with application/json")
    a = p.parse_args()
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if a.transport == "sse":
        server.run("sse", host="127.0.0.1", port=a.port, transport_security=security)
    else:
        server.run(
            "streamable-http",
            host="127.0.0.1",
            port=a.port,
            json_response=a.json,
            transport_security=security,
        )


if __name__ == "__main__":
    main()
