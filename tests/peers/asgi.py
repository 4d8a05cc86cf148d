"""The test server (server.py's tools) as an ASGI app for hypercorn, which serves it
over HTTP/2 (TLS + ALPN h2):

    hypercorn --certfile C --keyfile K --bind 127.0.0.1:N asgi:app

Stateless with JSON answers, so a single tools/call POST needs no session.
"""

from mcp.server.transport_security import TransportSecuritySettings

from server import register_tools, server

register_tools()

app = server.streamable_http_app(
    json_response=True,
    stateless_http=True,
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)
