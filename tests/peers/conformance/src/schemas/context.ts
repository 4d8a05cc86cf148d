// Stand-in for the conformance repository's `src/schemas/context.ts`, which the
// npm runner does not ship and `examples/clients/typescript/everything-client.ts`
// imports to read MCP_CONFORMANCE_CONTEXT (the runner's JSON for the
// client-credentials, pre-registration and cross-app scenarios). It checks that
// the context names a scenario and keeps every other field as the runner sent it.
import { z } from 'zod';

export const ClientConformanceContextSchema = z
  .object({ name: z.string() })
  .passthrough();
