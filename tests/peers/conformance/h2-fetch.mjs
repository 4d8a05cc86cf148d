// Loaded into the conformance runner (`node --import`) for the HTTP/2 runs:
// fetch (the MCP SDK's transport) offers h2 by ALPN and uses it when the
// server picks it. Node's fetch takes its dispatcher from the global undici
// slot that `setGlobalDispatcher` fills.
import { Agent, setGlobalDispatcher } from 'undici';

setGlobalDispatcher(new Agent({ allowH2: true }));
