"""An agent that wants around kya: replays one case of the bypass corpus.

    bypass.py CASE_JSON

CASE_JSON is one `[[case]]` of tests/bypass/corpus.toml as JSON, with the
test's own additions (`host`, `port`, `ca`). The script connects the way the
case says (plaintext or TLS, silent first, garbage first, a ClientHello cut into
tiny records, an ALPN list, a forged Host), sends the case's body or bytes, and
prints one JSON line: {"outcome": "refused"|"answered", "status": int|null,
"detail": str}. It never decides whether kya held: the test reads the upstream
server's own record of what it executed.

With `proxy` ("host:port"), the agent honours a proxy as HTTPS_PROXY makes
clients do: it connects to the proxy, asks `CONNECT <connect>` (default
host:port of the case) and, once answered 200, speaks the case through the
tunnel. A proxy that answers otherwise is reported as the answer.

Only loopback addresses are used.
"""

import json
import socket
import ssl
import sys
import time

CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "TOOL", "arguments": {}},
}

ARGS = {
    "search_docs": {"query": "bypass"},
    "delete_records": {"table": "accounts"},
    "transfer": {"amount": 9000, "to": "mallory"},
}


def call(tool: str, id_: int = 1) -> dict:
    c = json.loads(json.dumps(CALL))
    c["id"] = id_
    c["params"]["name"] = tool
    c["params"]["arguments"] = ARGS[tool]
    return c


def body_bytes(case: dict) -> tuple:
    """(body bytes, content type) for the case's `body` variant."""
    tool = case.get("tool", "delete_records")
    kind = case.get("body", "call")
    ct = case.get("content_type", "application/json")
    if kind == "call":
        return json.dumps(call(tool)).encode(), ct
    if kind == "bom":
        return b"\xef\xbb\xbf" + json.dumps(call(tool)).encode(), ct
    if kind == "utf16":
        return json.dumps(call(tool)).encode("utf-16"), ct
    if kind == "utf32":
        return json.dumps(call(tool)).encode("utf-32"), ct
    if kind == "batch":
        return json.dumps([call("search_docs", 1), call(tool, 2)]).encode(), ct
    if kind == "raw":
        return case["raw"].replace("TOOL", tool).encode(), ct
    raise SystemExit(f"unknown body {kind}")


def fix_lengths(raw: str) -> str:
    """Replace each `Content-Length: AUTO` by the length of the body that
    follows its head, up to the next request line or the end."""
    marker, out = "Content-Length: AUTO", ""
    while marker in raw:
        i = raw.index(marker)
        body_start = raw.index("\r\n\r\n", i) + 4
        nxt = raw.find("POST /mcp HTTP/1.1", body_start)
        end = nxt if nxt >= 0 else len(raw)
        length = len(raw[body_start:end].encode())
        out += raw[:i] + f"Content-Length: {length}" + raw[i + len(marker):end]
        raw = raw[end:]
    return out + raw


def request_bytes(case: dict, host_header: str) -> bytes:
    if "raw_request" in case:
        tool = case.get("tool", "delete_records")
        raw = case["raw_request"].replace("TOOL", tool).replace("HOST", host_header)
        return fix_lengths(raw).encode()
    body, ct = body_bytes(case)
    head = (
        f"POST /mcp HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        f"Content-Type: {ct}\r\n"
        f"Accept: application/json, text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n"
    )
    return head.encode() + body


def read_answer(recv) -> dict:
    """Read until the peer closes (every request says Connection: close)."""
    data = b""
    try:
        while True:
            chunk = recv()
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError) as e:
        if not data:
            return {"outcome": "refused", "status": None, "detail": repr(e)}
    if not data:
        return {"outcome": "refused", "status": None, "detail": "closed without an answer"}
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return {"outcome": "answered", "status": status, "detail": data[-600:].decode("latin-1")}


class ProxyAnswered(Exception):
    """The proxy answered CONNECT with something other than 200."""

    def __init__(self, result: dict):
        super().__init__(result["detail"])
        self.result = result


def open_socket(case: dict) -> socket.socket:
    """A connection to the case's server: direct, or through the proxy."""
    if not case.get("proxy"):
        s = socket.create_connection((case["host"], case["port"]), timeout=20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    host, _, port = case["proxy"].rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    target = case.get("connect", f"{case['host']}:{case['port']}")
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        try:
            chunk = s.recv(1)
        except OSError as e:
            s.close()
            raise ProxyAnswered({"outcome": "refused", "status": None, "detail": repr(e)})
        if not chunk:
            s.close()
            raise ProxyAnswered({"outcome": "refused", "status": None, "detail": "closed before answering CONNECT"})
        head += chunk
    line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    status = int(line[1]) if len(line) > 1 and line[1].isdigit() else None
    if status != 200:
        s.close()
        raise ProxyAnswered({"outcome": "answered", "status": status, "detail": head.decode("latin-1")})
    return s


def plain(case: dict) -> dict:
    try:
        s = open_socket(case)
    except ProxyAnswered as e:
        return e.result
    except OSError as e:
        return {"outcome": "refused", "status": None, "detail": repr(e)}
    try:
        if case.get("echo"):
            return echo(s, case["echo"].encode())
        if case.get("garbage_first"):
            s.sendall(case["garbage_first"].encode())
        if case.get("stall_prefix"):
            # A prefix of an HTTP method, then silence.
            s.sendall(case["stall_prefix"].encode())
        time.sleep(case.get("delay", 0))
        req = request_bytes(case, case.get("host_header", f"{case['host']}:{case['port']}"))
        if case.get("stall_prefix"):
            req = req[len(case["stall_prefix"]):]
        if case.get("h2"):
            return h2_call(s, case)
        s.sendall(req)
        return read_answer(lambda: s.recv(65536))
    except (ConnectionResetError, BrokenPipeError, OSError) as e:
        return {"outcome": "refused", "status": None, "detail": repr(e)}
    finally:
        s.close()


def echo(s: socket.socket, data: bytes) -> dict:
    """Send bytes that are neither TLS nor HTTP to an echo server and read
    them back (as many as were sent)."""
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    if not got:
        return {"outcome": "refused", "status": None, "detail": "closed without an answer"}
    return {"outcome": "answered", "status": None, "detail": got.decode("latin-1")}


def h2_call(s: socket.socket, case: dict) -> dict:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    body, ct = body_bytes(case)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "POST"),
            (":path", "/mcp"),
            (":scheme", "http"),
            (":authority", f"{case['host']}:{case['port']}"),
            ("content-type", ct),
            ("accept", "application/json, text/event-stream"),
            ("content-length", str(len(body))),
        ],
    )
    conn.send_data(sid, body, end_stream=True)
    s.sendall(conn.data_to_send())
    status, data = None, b""
    while True:
        try:
            chunk = s.recv(65536)
        except OSError as e:
            return {"outcome": "refused", "status": status, "detail": repr(e)}
        if not chunk:
            break
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                return {"outcome": "answered", "status": status, "detail": data[-600:].decode("latin-1")}
        s.sendall(conn.data_to_send())
    if status is None:
        return {"outcome": "refused", "status": None, "detail": "closed without an answer"}
    return {"outcome": "answered", "status": status, "detail": data[-600:].decode("latin-1")}


def recut(records: bytes, size: int) -> bytes:
    """Re-cut TLS handshake records into records of at most `size` bytes."""
    out, pos = b"", 0
    while pos + 5 <= len(records):
        ctype, ver, length = records[pos], records[pos + 1:pos + 3], int.from_bytes(records[pos + 3:pos + 5], "big")
        body = records[pos + 5:pos + 5 + length]
        pos += 5 + length
        if ctype != 0x16:
            out += bytes([ctype]) + ver + length.to_bytes(2, "big") + body
            continue
        for i in range(0, len(body), size):
            piece = body[i:i + size]
            out += bytes([0x16]) + ver + len(piece).to_bytes(2, "big") + piece
    return out + records[pos:]


def tls(case: dict) -> dict:
    ctx = ssl.create_default_context(cafile=case["ca"])
    if case.get("alpn"):
        ctx.set_alpn_protocols(case["alpn"])
    sni = case.get("sni")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        s = open_socket(case)
    except ProxyAnswered as e:
        return e.result
    except OSError as e:
        return {"outcome": "refused", "status": None, "detail": repr(e)}
    first = True

    def flush():
        nonlocal first
        data = outgoing.read()
        if not data:
            return
        if first and case.get("split_hello"):
            data = recut(data, case["split_hello"])
            # One record per write, so the records arrive as separate segments.
            pos = 0
            while pos < len(data):
                n = 5 + int.from_bytes(data[pos + 3:pos + 5], "big")
                s.sendall(data[pos:pos + n])
                pos += n
        else:
            s.sendall(data)
        first = False

    try:
        time.sleep(case.get("delay", 0))
        while True:
            try:
                obj.do_handshake()
                flush()
                break
            except ssl.SSLWantReadError:
                flush()
                chunk = s.recv(65536)
                if not chunk:
                    return {"outcome": "refused", "status": None, "detail": "closed during the handshake"}
                incoming.write(chunk)
        host_header = case.get("host_header", f"{sni}:{case['port']}" if sni else case["host"])
        obj.write(request_bytes(case, host_header))
        flush()

        def recv():
            while True:
                try:
                    return obj.read(65536)
                except ssl.SSLWantReadError:
                    chunk = s.recv(65536)
                    if not chunk:
                        return b""
                    incoming.write(chunk)
                except ssl.SSLZeroReturnError:
                    return b""

        return read_answer(recv)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, OSError) as e:
        return {"outcome": "refused", "status": None, "detail": repr(e)}
    finally:
        s.close()


def main() -> None:
    case = json.loads(sys.argv[1])
    result = tls(case) if case.get("transport") == "tls" else plain(case)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
