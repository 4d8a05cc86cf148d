// An HTTP/2 front for the reference server, which speaks only HTTP/1.1:
// `node h2-front.mjs LISTEN_HOST LISTEN_PORT BACKEND_PORT CERT KEY LOG`
// terminates TLS offering h2 and http/1.1 by ALPN, and forwards every request
// to http://127.0.0.1:BACKEND_PORT, streaming both bodies (server-sent events
// included). It appends each request's HTTP version to LOG, so a test can see
// which version its clients spoke.
import fs from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';

const [host, port, backend, cert, key, log] = process.argv.slice(2);
const hopByHop = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'transfer-encoding',
  'upgrade',
  'http2-settings'
]);

function forwardable(headers) {
  const out = {};
  for (const [name, value] of Object.entries(headers)) {
    if (!name.startsWith(':') && !hopByHop.has(name)) {
      out[name] = value;
    }
  }
  return out;
}

const server = http2.createSecureServer(
  { cert: fs.readFileSync(cert), key: fs.readFileSync(key), allowHTTP1: true },
  (req, res) => {
    fs.appendFileSync(log, `${req.httpVersion}\n`);
    const headers = forwardable(req.headers);
    headers.host = req.headers[':authority'] ?? req.headers.host;
    const upstream = http.request(
      { host: '127.0.0.1', port: Number(backend), method: req.method, path: req.url, headers },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, forwardable(answer.headers));
        if (typeof res.flushHeaders === 'function') {
          res.flushHeaders();
        }
        answer.pipe(res);
      }
    );
    upstream.on('error', () => {
      if (!res.headersSent) {
        res.writeHead(502);
      }
      res.end();
    });
    res.on('close', () => upstream.destroy());
    req.pipe(upstream);
  }
);
server.on('tlsClientError', () => {});
server.listen(Number(port), host, () => console.log(`h2 front on ${host}:${port}`));
