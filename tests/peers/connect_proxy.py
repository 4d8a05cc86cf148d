"""A small real HTTP CONNECT proxy for the tests (what HTTPS_PROXY names).

    connect_proxy.py --listen HOST:PORT --hosts FILE --log FILE

Answers `CONNECT host:port HTTP/1.1` by connecting to host (an IP literal, or
a name looked up in the hosts FILE only: never DNS) and, once connected,
`200 Connection Established`, then relays bytes both ways until either side
closes. Anything else gets 405; a target it cannot reach, 502. Every tunnel
it opened is logged to the log FILE as one line `host:port`. Only loopback
targets are reached.
"""

import argparse
import asyncio
import ipaddress


def load_hosts(path: str) -> dict:
    names = {}
    with open(path) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            for name in fields[1:]:
                names.setdefault(name.lower(), fields[0])
    return names


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, OSError):
            pass


def answer(writer: asyncio.StreamWriter, status: str) -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    writer.close()


async def handle(reader, writer, hosts: dict, log_path: str) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        writer.close()
        return
    request = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(request) != 3 or request[0] != "CONNECT":
        return answer(writer, "405 Method Not Allowed")
    host, _, port = request[1].rpartition(":")
    host = host.strip("[]").lower()
    try:
        addr = ipaddress.ip_address(hosts.get(host, host))
        port = int(port)
    except ValueError:
        return answer(writer, "502 Bad Gateway")
    if not addr.is_loopback:
        return answer(writer, "502 Bad Gateway")
    try:
        up_reader, up_writer = await asyncio.open_connection(str(addr), port)
    except OSError:
        return answer(writer, "502 Bad Gateway")
    with open(log_path, "a") as log:
        log.write(f"{host}:{port}\n")
    writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    await writer.drain()
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--hosts", required=True)
    p.add_argument("--log", required=True)
    args = p.parse_args()
    hosts = load_hosts(args.hosts)
    host, _, port = args.listen.rpartition(":")
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, hosts, args.log), host.strip("[]"), int(port)
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
