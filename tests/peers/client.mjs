// A real MCP client (npm @modelcontextprotocol/sdk) for kya's tests: call one tool,
// print JSON.   node client.mjs URL TOOL [JSON_ARGS] [--sse]   |   node client.mjs URL --list
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";

const argv = process.argv.slice(2);
const flags = new Set(argv.filter((a) => a.startsWith("--")));
const [url, tool, rawArgs] = argv.filter((a) => !a.startsWith("--"));

async function main() {
  const transport = flags.has("--sse")
    ? new SSEClientTransport(new URL(url))
    : new StreamableHTTPClientTransport(new URL(url));
  const client = new Client({ name: "kya-test-node-client", version: "1.0.0" });
  await client.connect(transport);
  try {
    if (flags.has("--list")) {
      const r = await client.listTools();
      return { tools: r.tools.map((t) => t.name) };
    }
    const r = await client.callTool({ name: tool, arguments: rawArgs ? JSON.parse(rawArgs) : {} });
    const text = (r.content || []).map((c) => c.text || "").join("");
    return { isError: Boolean(r.isError), text };
  } finally {
    await client.close();
  }
}

main().then(
  (out) => { console.log(JSON.stringify(out)); process.exit(0); },
  (e) => { console.log(JSON.stringify({ error: String(e) })); process.exit(2); },
);
