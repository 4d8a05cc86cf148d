// A real OpenID Provider (npm oidc-provider) with CIBA, for kya's tests, plus
// a small control API on another loopback port with which a test plays the
// human on the authentication device.
//
//   node oidc_provider.mjs
//
// Environment (all optional except where noted):
//   OP_PORT        provider port on 127.0.0.1 (default 18300); the issuer is
//                  http://127.0.0.1:OP_PORT
//   CONTROL_PORT   control API port on 127.0.0.1 (default 18301)
//   CLIENT_ID      (default "kya")     CLIENT_SECRET (default "kya-test-secret")
//   CLIENT_JWK     the client's public JWK (JSON): the client authenticates
//                  with private_key_jwt against it instead of client_secret_basic
//   DELIVERY_MODE  poll | ping (default poll)
//   PING_URL       kya's notification endpoint (ping mode), e.g.
//                  https://127.0.0.1:18302/ciba/notify; start node with
//                  NODE_EXTRA_CA_CERTS=<kya state dir>/ca.pem so it trusts kya
//   ID_TOKEN_ALG   RS256 | ES256 | EdDSA (default RS256)
//   INTERVAL       poll interval (seconds) told to the client (default 1)
//   STRICT_BINDING 1: oidc-provider's default binding_message rule
//                  (^[a-zA-Z0-9-._+/!?#]{1,20}$); otherwise printable ASCII up to 128
//   BROKER_CLIENT_ID, BROKER_CLIENT_SECRET
//                  a second client (kya's, for credential brokering) allowed the
//                  client_credentials grant (scope "mcp") and, with KYA_PUBLIC_KEY,
//                  RFC 8693 token exchange
//   KYA_PUBLIC_KEY kya's Ed25519 public key (SPKI PEM file): token exchange accepts
//                  subject and actor tokens (EdDSA JWTs, aud = the token endpoint)
//                  kya signed with it; the issued token carries sub = the subject's
//                  sub and act = {sub: the actor's sub, kya_uid}
//   RS_CLIENT_ID, RS_CLIENT_SECRET
//                  a resource server's client, allowed RFC 7662 introspection
//
// Control API (JSON, 127.0.0.1:CONTROL_PORT):
//   GET  /requests            [{id, login_hint, binding_message, requested_expiry, done,
//                              id_token_sha256 (hex SHA-256 of the ID token the client got)}]
//   POST /requests/ID/approve the human approves (a Grant with scope openid)
//   POST /requests/ID/deny    the human refuses (AccessDenied)
//   POST /tamper?mode=none|evil_key|wrong_aud|wrong_sub|unknown_kid
//                 rewrite the ID token of the next token responses (a
//                 man-in-the-middle with a key outside the JWKS, or a real
//                 signature over wrong claims)
//   GET  /health              {"issuer": ...}
//   GET  /tokens              [{grant, client_id, sub, act}] every access token issued to
//                              the broker client (the provider's own record)
//
// On start it prints one line: {"ready": true, "issuer": ..., "control": ...}.

import http from 'node:http';
import crypto from 'node:crypto';
import Provider, { errors } from 'oidc-provider';
import * as jose from 'jose';

const OP_PORT = Number(process.env.OP_PORT || 18300);
const CONTROL_PORT = Number(process.env.CONTROL_PORT || 18301);
const CLIENT_ID = process.env.CLIENT_ID || 'kya';
const CLIENT_SECRET = process.env.CLIENT_SECRET || 'kya-test-secret';
const CLIENT_JWK = process.env.CLIENT_JWK ? JSON.parse(process.env.CLIENT_JWK) : null;
const MODE = process.env.DELIVERY_MODE || 'poll';
const PING_URL = process.env.PING_URL;
const ALG = process.env.ID_TOKEN_ALG || 'RS256';
const INTERVAL = Number(process.env.INTERVAL || 1);
const STRICT = process.env.STRICT_BINDING === '1';
const BROKER_CLIENT_ID = process.env.BROKER_CLIENT_ID;
const BROKER_CLIENT_SECRET = process.env.BROKER_CLIENT_SECRET;
const RS_CLIENT_ID = process.env.RS_CLIENT_ID;
const RS_CLIENT_SECRET = process.env.RS_CLIENT_SECRET;
const KYA_PUBLIC_KEY = process.env.KYA_PUBLIC_KEY;
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const JWT_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:jwt';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const ISSUER = `http://127.0.0.1:${OP_PORT}`;

function jwk(type, opts, kid) {
  const { privateKey } = crypto.generateKeyPairSync(type, opts);
  return { ...privateKey.export({ format: 'jwk' }), kid, use: 'sig' };
}
const signingKeys = [
  jwk('rsa', { modulusLength: 2048 }, 'rsa-1'),
  jwk('ec', { namedCurve: 'P-256' }, 'ec-1'),
  jwk('ed25519', {}, 'ed-1'),
];
// A key the provider does not publish: what an attacker would sign with.
const evilKeys = {
  RS256: jwk('rsa', { modulusLength: 2048 }, 'rsa-1'),
  ES256: jwk('ec', { namedCurve: 'P-256' }, 'ec-1'),
  EdDSA: jwk('ed25519', {}, 'ed-1'),
};
const realKeys = { RS256: signingKeys[0], ES256: signingKeys[1], EdDSA: signingKeys[2] };

const requests = new Map(); // auth_req_id -> {request, login_hint, binding_message, ...}
let tamper = 'none';

const client = {
  client_id: CLIENT_ID,
  client_secret: CLIENT_SECRET,
  grant_types: ['urn:openid:params:grant-type:ciba'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
  backchannel_token_delivery_mode: MODE,
  id_token_signed_response_alg: ALG,
};
if (CLIENT_JWK) {
  delete client.client_secret;
  client.token_endpoint_auth_method = 'private_key_jwt';
  client.jwks = { keys: [CLIENT_JWK] };
}
if (MODE === 'ping') {
  if (!PING_URL) throw new Error('DELIVERY_MODE=ping needs PING_URL');
  client.backchannel_client_notification_endpoint = PING_URL;
}

const clients = [client];
if (BROKER_CLIENT_ID) {
  clients.push({
    client_id: BROKER_CLIENT_ID,
    client_secret: BROKER_CLIENT_SECRET,
    grant_types: KYA_PUBLIC_KEY ? ['client_credentials', TOKEN_EXCHANGE] : ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: 'mcp',
    token_endpoint_auth_method: 'client_secret_basic',
  });
}
if (RS_CLIENT_ID) {
  clients.push({
    client_id: RS_CLIENT_ID,
    client_secret: RS_CLIENT_SECRET,
    grant_types: [],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  });
}
const issued = []; // what the broker client got: the provider's own record

const provider = new Provider(ISSUER, {
  clients,
  scopes: ['openid', 'mcp'],
  // Claims of an exchanged token (stashed on it by the grant below),
  // returned by introspection.
  async extraTokenClaims(_ctx, token) {
    return token.kyaClaims;
  },
  jwks: { keys: signingKeys },
  findAccount: async (_ctx, id) => ({
    accountId: id,
    async claims() {
      return { sub: id };
    },
  }),
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: Boolean(BROKER_CLIENT_ID) },
    introspection: { enabled: Boolean(RS_CLIENT_ID) },
    ciba: {
      enabled: true,
      deliveryModes: ['poll', 'ping'],
      async processLoginHint(_ctx, loginHint) {
        return loginHint;
      },
      async validateBindingMessage(_ctx, message) {
        const ok = STRICT
          ? /^[a-zA-Z0-9-._+/!?#]{1,20}$/.test(message ?? '')
          : /^[\x20-\x7e]{1,128}$/.test(message ?? '');
        if (!ok) throw new errors.InvalidBindingMessage('binding_message not acceptable');
      },
      async validateRequestContext() {},
      async verifyUserCode() {},
      async triggerAuthenticationDevice(ctx, request, account) {
        requests.set(request.jti, {
          request,
          id: request.jti,
          login_hint: ctx.oidc.params.login_hint,
          binding_message: ctx.oidc.params.binding_message,
          requested_expiry: ctx.oidc.params.requested_expiry,
          account: account.accountId,
          done: false,
        });
      },
    },
  },
  enabledJWA: { idTokenSigningAlgValues: ['RS256', 'ES256', 'EdDSA'] },
  // The test provider and kya both live on loopback: skip oidc-provider's
  // SSRF guard (which refuses special-use addresses) for the ping callback.
  fetch: (url, options) => {
    delete options.dispatcher;
    return globalThis.fetch(url, options);
  },
});
provider.proxy = false;

// RFC 8693 token exchange for kya: both tokens must be EdDSA JWTs kya signed,
// addressed to this token endpoint and unexpired.
if (BROKER_CLIENT_ID && KYA_PUBLIC_KEY) {
  const { readFileSync } = await import('node:fs');
  const kyaKey = crypto.createPublicKey(readFileSync(KYA_PUBLIC_KEY));
  const verify = async (jwt, what) => {
    try {
      const { payload } = await jose.jwtVerify(jwt, kyaKey, {
        algorithms: ['EdDSA'],
        audience: `${ISSUER}/token`,
      });
      if (typeof payload.sub !== 'string' || !payload.sub) throw new Error('no sub');
      return payload;
    } catch (e) {
      throw new errors.InvalidGrant(`${what}: ${e.message}`);
    }
  };
  provider.registerGrantType(
    TOKEN_EXCHANGE,
    async (ctx) => {
      const { client, params } = ctx.oidc;
      if (params.subject_token_type !== JWT_TOKEN_TYPE || params.actor_token_type !== JWT_TOKEN_TYPE) {
        throw new errors.InvalidRequest('subject_token_type and actor_token_type must be JWTs');
      }
      if (params.requested_token_type && params.requested_token_type !== ACCESS_TOKEN_TYPE) {
        throw new errors.InvalidRequest('only access tokens are issued');
      }
      const subject = await verify(params.subject_token, 'subject_token');
      const actor = await verify(params.actor_token, 'actor_token');
      const token = new provider.ClientCredentials({ client, scope: params.scope || undefined });
      token.kyaClaims = { sub: subject.sub, act: { sub: actor.sub, kya_uid: actor.kya_uid } };
      const value = await token.save();
      issued.push({ grant: 'token_exchange', client_id: client.clientId, ...token.kyaClaims });
      ctx.body = {
        access_token: value,
        issued_token_type: ACCESS_TOKEN_TYPE,
        token_type: 'Bearer',
        expires_in: token.expiration,
        scope: token.scope || undefined,
      };
    },
    ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type',
      'requested_token_type', 'scope', 'audience'],
  );
}

// Tell the client the poll interval (CIBA Core 7.3), and rewrite ID tokens in
// tamper mode.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/backchannel' && ctx.status === 200 && ctx.body && INTERVAL) {
    ctx.body = { ...ctx.body, interval: INTERVAL };
  }
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body?.id_token && tamper !== 'none') {
    const claims = jose.decodeJwt(ctx.body.id_token);
    const header = jose.decodeProtectedHeader(ctx.body.id_token);
    let key = realKeys[ALG];
    let kid = header.kid;
    if (tamper === 'evil_key') key = evilKeys[ALG];
    if (tamper === 'unknown_kid') { key = evilKeys[ALG]; kid = 'not-in-jwks'; }
    if (tamper === 'wrong_aud') claims.aud = 'someone-else';
    if (tamper === 'wrong_sub') claims.sub = 'mallory';
    const priv = await jose.importJWK(key, ALG);
    ctx.body = {
      ...ctx.body,
      id_token: await new jose.SignJWT(claims).setProtectedHeader({ alg: ALG, kid }).sign(priv),
    };
  }
  if (ctx.path === '/token' && ctx.status === 200 && ctx.oidc?.params?.grant_type === 'client_credentials') {
    issued.push({ grant: 'client_credentials', client_id: ctx.oidc.client?.clientId });
  }
  // Remember the digest of the ID token the client really got (what kya's
  // audit log must name for an approval).
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body?.id_token) {
    const entry = requests.get(ctx.oidc?.params?.auth_req_id);
    if (entry) {
      entry.id_token_sha256 = crypto.createHash('sha256').update(ctx.body.id_token).digest('hex');
    }
  }
});

provider.on('server_error', (_ctx, err) => console.error('server_error', err));
provider.on('backchannel.error', (_ctx, err) => console.error('backchannel.error', err));
// Why a client was refused (oidc-provider keeps the detail out of the response).
for (const ev of ['backchannel_authentication.error', 'grant.error']) {
  provider.on(ev, (_ctx, err) => {
    if (err?.error === 'invalid_client') console.error(ev, err.error_detail || err.message);
  });
}

function send(res, status, value) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(value));
}

const control = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, 'http://control');
    const m = url.pathname.match(/^\/requests\/([^/]+)\/(approve|deny)$/);
    if (req.method === 'GET' && url.pathname === '/health') {
      return send(res, 200, { issuer: ISSUER, mode: MODE, alg: ALG });
    }
    if (req.method === 'GET' && url.pathname === '/tokens') {
      return send(res, 200, issued);
    }
    if (req.method === 'GET' && url.pathname === '/requests') {
      return send(res, 200, [...requests.values()].map(({ request, ...r }) => r));
    }
    if (req.method === 'POST' && url.pathname === '/tamper') {
      tamper = url.searchParams.get('mode') || 'none';
      return send(res, 200, { tamper });
    }
    if (req.method === 'POST' && m) {
      const entry = requests.get(decodeURIComponent(m[1]));
      if (!entry) return send(res, 404, { error: 'no such request' });
      if (entry.done) return send(res, 409, { error: 'already answered' });
      entry.done = true;
      if (m[2] === 'approve') {
        const grant = new provider.Grant({ clientId: CLIENT_ID, accountId: entry.account });
        grant.addOIDCScope('openid');
        await grant.save();
        await provider.backchannelResult(entry.request, grant);
      } else {
        await provider.backchannelResult(entry.request, new errors.AccessDenied('the owner said no'));
      }
      return send(res, 200, { ok: true });
    }
    return send(res, 404, { error: 'not found' });
  } catch (e) {
    console.error('control error', e);
    return send(res, 500, { error: String(e?.message || e) });
  }
});

provider.listen(OP_PORT, '127.0.0.1', () => {
  control.listen(CONTROL_PORT, '127.0.0.1', () => {
    console.log(JSON.stringify({ ready: true, issuer: ISSUER, control: `http://127.0.0.1:${CONTROL_PORT}`, mode: MODE, alg: ALG }));
  });
});
