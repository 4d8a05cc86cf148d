// A TLS front for the reference server, which serves only plaintext HTTP:
// `node tls-front.mjs LISTEN_HOST LISTEN_PORT BACKEND_PORT CERT KEY`
// terminates TLS (HTTP/1.1 only: the reference server speaks nothing else)
// and pipes the bytes, unchanged, to 127.0.0.1:BACKEND_PORT, without delaying
// small writes (TCP_NODELAY on both legs, like Node's https server).
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';

const [host, port, backend, cert, key] = process.argv.slice(2);
const server = tls.createServer(
  { cert: fs.readFileSync(cert), key: fs.readFileSync(key), ALPNProtocols: ['http/1.1'] },
  (client) => {
    // No Nagle on either leg, as Node's own https server does (noDelay):
    // otherwise the end of a response written in pieces waits for an ACK.
    client.setNoDelay(true);
    const upstream = net.connect({ port: Number(backend), host: '127.0.0.1', noDelay: true });
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.pipe(upstream).pipe(client);
  }
);
server.on('tlsClientError', () => {});
server.listen(Number(port), host, () => console.log(`tls front on ${host}:${port}`));
