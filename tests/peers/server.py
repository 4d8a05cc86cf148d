"""A small real MCP server (PyPI `mcp`) for kya's tests.

    server.py --port N [--host ADDR] [--transport streamable-http|sse] [--json]
              [--require-kya-proof KEY [--proof-log FILE]]

Tools: search_docs(query), delete_records(table), transfer(amount, to). DNS-rebinding
protection is off because the tests reach it through kya's proxy, whose address
is the Host the client sends.
"""

import argparse
import json
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


PROOF_LOG = None


def proof_record(ok: bool, detail: dict) -> None:
    """Append each proof check to the --proof-log file (JSON lines): the server's own record."""
    if PROOF_LOG:
        with open(PROOF_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps({"ok": ok, **detail}) + "\n")


def serve_with_proof(a: argparse.Namespace, security: TransportSecuritySettings) -> None:
    """The same app behind the proof-of-decision middleware (tests/peers/verify_proof.py)."""
    import uvicorn

    from verify_proof import VerifyKyaProof

    if a.transport == "sse":
        app = server.sse_app(transport_security=security, host=a.host)
    else:
        app = server.streamable_http_app(json_response=a.json, transport_security=security, host=a.host)
    app = VerifyKyaProof(app, a.require_kya_proof, on_result=proof_record)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--transport", default="streamable-http", choices=["streamable-http", "sse"])
    p.add_argument("--json", action="store_true", help="answer POSTs with application/json")
    p.add_argument(
        "--require-kya-proof", metavar="KEY",
        help="refuse (401) every request without a valid Kya-Decision header signed by this "
        "key (a did:key or kya's signing-key.pub.pem)",
    )
    p.add_argument("--proof-log", metavar="FILE", help="append each proof check here (JSON lines)")
    a = p.parse_args()
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if a.require_kya_proof:
        global PROOF_LOG
        PROOF_LOG = a.proof_log
        serve_with_proof(a, security)
        return
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
