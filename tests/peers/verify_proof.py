"""Verify kya's proof of decision (the `Kya-Decision` header) in an ASGI server.

    app = VerifyKyaProof(app, public_key="did:key:z6Mk..." or "/var/lib/kya/signing-key.pub.pem")

Every HTTP request must carry exactly one `Kya-Decision` header: the base64url
(no padding) of the JCS bytes of a decision receipt signed by kya's key with
an `eddsa-jcs-2022` Data Integrity proof. The middleware checks, offline:
the proof and the key, the window (`validFrom` - 5 s <= now < `validUntil`),
that the receipt is for this HTTP method, path and exact body (SHA-256), that
it was not used before (its `id`, until it expires), and that each credential
embedded for an approved call is kya's too and names the call's tool and
arguments (and the receipt's server, agent and uid), valid when the receipt was
issued. Anything else is answered 401 and never reaches the app.

Uses `cryptography` (Ed25519) and the standard library only.
"""

import base64
import hashlib
import json
import time
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

HEADER = b"kya-decision"
MAX_HEADER = 64 * 1024
MAX_BODY = 4 * 1024 * 1024
CLOCK_SKEW = 5
MAX_TTL = 600
PROOF_MEMBERS = {"type", "cryptosuite", "created", "verificationMethod", "proofPurpose", "@context", "proofValue"}
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
B64URL = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class ProofError(Exception):
    """Why a request carries no valid proof of decision."""


def b58decode(text: str) -> bytes:
    if len(text) > 256:
        raise ProofError("base58 value too long")
    n = 0
    for c in text:
        i = B58.find(c)
        if i < 0:
            raise ProofError("invalid base58")
        n = n * 58 + i
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\0" * (len(text) - len(text.lstrip("1"))) + raw


def did_key_public(did: str) -> bytes:
    """The 32 key bytes of `did:key:z6Mk...` (with or without a fragment)."""
    mb = did.removeprefix("did:key:").split("#")[0]
    if not mb.startswith("z"):
        raise ProofError("not a base58btc did:key")
    raw = b58decode(mb[1:])
    if len(raw) != 34 or raw[:2] != b"\xed\x01":
        raise ProofError("not an Ed25519 did:key")
    return raw[2:]


def load_key(spec: str) -> bytes:
    """kya's public key from a did:key or an SPKI PEM file: its 32 raw bytes."""
    if spec.startswith("did:key:"):
        return did_key_public(spec)
    with open(spec, "rb") as f:
        key = load_pem_public_key(f.read())
    if not isinstance(key, Ed25519PublicKey):
        raise ProofError("not an Ed25519 public key")
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def did_key_of(raw: bytes) -> str:
    n = int.from_bytes(b"\xed\x01" + raw, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "did:key:z" + out


def jcs(v) -> bytes:
    """RFC 8785 for what kya signs (no floats): sorted keys (UTF-16 order),
    no whitespace, JSON string escaping as ECMAScript writes it."""
    if isinstance(v, dict):
        items = sorted(v.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return b"{" + b",".join(jcs(k) + b":" + jcs(x) for k, x in items) + b"}"
    if isinstance(v, list):
        return b"[" + b",".join(jcs(x) for x in v) + b"]"
    if isinstance(v, float):
        raise ProofError("non-integer numbers are not in kya's receipts")
    try:
        return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        raise ProofError("lone surrogate in a string") from None


def strict_json(raw: bytes):
    def no_duplicates(pairs):
        d = {}
        for k, x in pairs:
            if k in d:
                raise ProofError("duplicate JSON member")
            d[k] = x
        return d
    try:
        return json.loads(raw, object_pairs_hook=no_duplicates, parse_constant=lambda c: float("nan"))
    except (ValueError, RecursionError) as e:
        raise ProofError(f"not JSON: {e}") from None


def verify_signed(doc, key: bytes):
    """Verify the `eddsa-jcs-2022` proof of `doc` (kya's key) and return it without the proof."""
    if not isinstance(doc, dict) or not isinstance(doc.get("proof"), dict):
        raise ProofError("no proof")
    doc = dict(doc)
    proof = dict(doc.pop("proof"))
    if set(proof) - PROOF_MEMBERS:
        raise ProofError("unexpected proof member")
    value = proof.pop("proofValue", None)
    want = {"type": "DataIntegrityProof", "cryptosuite": "eddsa-jcs-2022", "proofPurpose": "assertionMethod"}
    if any(proof.get(k) != v for k, v in want.items()) or proof.get("@context") != doc.get("@context"):
        raise ProofError("not an eddsa-jcs-2022 assertion proof")
    did = did_key_of(key)
    if proof.get("verificationMethod") != f"{did}#{did[8:]}" or doc.get("issuer") != did:
        raise ProofError("not signed by kya's key")
    if not isinstance(value, str) or not value.startswith("z"):
        raise ProofError("bad proofValue")
    signed = hashlib.sha256(jcs(proof)).digest() + hashlib.sha256(jcs(doc)).digest()
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(b58decode(value[1:]), signed)
    except (InvalidSignature, ValueError):
        raise ProofError("bad signature") from None
    return doc


def seconds(text) -> float:
    if not isinstance(text, str):
        raise ProofError("bad time")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ProofError("bad time") from None


def verify_receipt(value: bytes, key: bytes, method: str, path: str, body: bytes, now: float) -> dict:
    """Check one header value for this request; return the receipt."""
    if not value or len(value) > MAX_HEADER or not set(value) <= B64URL:
        raise ProofError("malformed header")
    try:
        raw = base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        raise ProofError("malformed header") from None
    doc = strict_json(raw)
    if jcs(doc) != raw:
        raise ProofError("receipt not in canonical form")
    r = verify_signed(doc, key)
    if r.get("type") != ["VerifiableCredential", "KyaDecisionReceipt"]:
        raise ProofError("not a decision receipt")
    start, end = seconds(r.get("validFrom")), seconds(r.get("validUntil"))
    if not (0 < end - start <= MAX_TTL):
        raise ProofError("bad window")
    if now + CLOCK_SKEW < start:
        raise ProofError("not yet valid")
    if now >= end:
        raise ProofError("expired")
    s = r.get("credentialSubject") or {}
    req = s.get("request") or {}
    if req.get("method") != method or req.get("path") != path:
        raise ProofError("receipt is for another request")
    if req.get("bodySha256") != hashlib.sha256(body).hexdigest():
        raise ProofError("body does not match the receipt")
    agent = s.get("agent") or {}
    for call in s.get("calls") or []:
        if "credential" in call:
            cred = verify_signed(call["credential"], key)
            subject = cred.get("credentialSubject") or {}
            scope = subject.get("scope") or {}
            if (
                cred.get("type") != ["VerifiableCredential", "KyaActionCredential"]
                or call.get("method") != "tools/call"
                or scope.get("tool") != call.get("tool")
                or ("server" in scope and str(scope["server"]).lower() != str(s.get("server")).lower())
                or ("argsSha256" in scope and scope["argsSha256"] != call.get("argsSha256"))
                or subject.get("agent") != agent.get("name")
                or ("uid" in subject and subject["uid"] != agent.get("uid"))
                or not seconds(cred.get("validFrom")) <= start < seconds(cred.get("validUntil"))
            ):
                raise ProofError("credential is for another call")
    return r


class VerifyKyaProof:
    """ASGI middleware: only requests with a valid proof of decision reach `app`."""

    def __init__(self, app, public_key: str, on_result=None, max_body: int = MAX_BODY):
        self.app = app
        self.key = load_key(public_key)
        self.on_result = on_result or (lambda ok, detail: None)
        self.max_body = max_body
        self.seen: dict = {}  # receipt id -> validUntil (replays refused until then)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await self.refuse(send, "body too large")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        values = [v for k, v in scope["headers"] if k.lower() == HEADER]
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        now = time.time()
        try:
            if len(values) != 1:
                raise ProofError("missing Kya-Decision header" if not values else "more than one Kya-Decision header")
            receipt = verify_receipt(values[0], self.key, scope["method"], path.decode("latin-1"), body, now)
            self.seen = {i: t for i, t in self.seen.items() if t > now}
            rid = receipt.get("id")
            if not isinstance(rid, str):
                raise ProofError("receipt has no id")
            if rid in self.seen:
                raise ProofError("receipt already used")
            self.seen[rid] = seconds(receipt["validUntil"])
        except ProofError as e:
            return await self.refuse(send, str(e))
        except (RecursionError, TypeError, ValueError, KeyError, AttributeError) as e:
            # Hostile shapes the checks above did not name: refused all the same.
            return await self.refuse(send, f"malformed receipt ({type(e).__name__})")
        calls = receipt["credentialSubject"].get("calls", [])
        self.on_result(True, {
            "receipt": receipt["id"],
            "method": scope["method"],
            "decisions": [c.get("decision") for c in calls],
            "tools": [c.get("tool") for c in calls if "tool" in c],
            "credentials": [c["credential"].get("id") for c in calls if "credential" in c],
        })
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def refuse(self, send, reason: str):
        self.on_result(False, {"reason": reason})
        payload = json.dumps({"error": "kya_proof_required", "reason": reason}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def main() -> None:
    """`verify_proof.py check KEY < cases.json`: verify each case
    ({"value", "body" (base64), "method", "path"}) as the middleware would
    (no replay check); print [{"ok": bool, "reason": str}]."""
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "check":
        sys.exit("usage: verify_proof.py check KEY < cases.json")
    key = load_key(sys.argv[2])
    out = []
    for case in json.load(sys.stdin):
        try:
            verify_receipt(
                case["value"].encode("latin-1", "replace"), key, case["method"], case["path"],
                base64.b64decode(case["body"]), time.time(),
            )
            out.append({"ok": True, "reason": ""})
        except ProofError as e:
            out.append({"ok": False, "reason": str(e)})
        except (RecursionError, TypeError, ValueError, KeyError, AttributeError) as e:
            out.append({"ok": False, "reason": f"malformed receipt ({type(e).__name__})"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
