// Loaded into the conformance runner (`node --import`): its client-mode
// scenario servers listen on port 0, a random port kya does not guard. With
// KYA_CONFORMANCE_PORTS="p1,p2,..." every listen on port 0 takes the next port
// of that list instead (round robin), so the servers run on ports the daemon
// guards. Unset or empty: nothing changes.
import net from 'node:net';

const ports = (process.env.KYA_CONFORMANCE_PORTS ?? '')
  .split(',')
  .map((p) => Number.parseInt(p, 10))
  .filter((p) => Number.isInteger(p) && p > 0 && p < 65536);
let next = 0;
const listen = net.Server.prototype.listen;

net.Server.prototype.listen = function (...args) {
  if (ports.length > 0) {
    const port = ports[next % ports.length];
    if (args[0] === 0 || args[0] === '0') {
      next += 1;
      args[0] = port;
    } else if (args[0] !== null && typeof args[0] === 'object' && Number(args[0].port) === 0) {
      next += 1;
      args[0] = { ...args[0], port };
    }
  }
  return listen.apply(this, args);
};
