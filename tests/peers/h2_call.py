"""An HTTP/2 MCP client (PyPI httpx with http2=True): POST one tools/call and print
{"http_version": ..., "status": ..., "body": ...} as JSON.

    h2_call.py URL CA_PEM TOOL JSON_ARGS     (env KYA_SNI: SNI and Host to send)
"""

import json
import os
import ssl
import sys

import httpx


def main() -> None:
    url, ca, tool, args = sys.argv[1:5]
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": json.loads(args)}}
    # KYA_SNI: the name to send as SNI and Host while connecting to the URL's
    # address (the test reaches the proxy by IP, as the redirect would).
    sni = os.environ.get("KYA_SNI")
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-06-18"}
    extensions = {}
    if sni:
        headers["host"] = sni
        extensions["sni_hostname"] = sni
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=ca), timeout=30) as c:
        r = c.post(url, json=call, headers=headers, extensions=extensions)
        print(json.dumps({"http_version": r.http_version, "status": r.status_code,
                          "body": r.json() if r.content else None}))


if __name__ == "__main__":
    main()
