//! Action-scoped verifiable credentials: what lets a held call through.
//!
//! When a human approves a held tool call (or issues a standing permission ahead
//! of time), kya mints a W3C Verifiable Credential (Data Model 2.0) secured with
//! a Data Integrity proof (`eddsa-jcs-2022`). Before a call is forwarded on the
//! strength of a credential, kya verifies it against that exact call.
//!
//! * [`jcs`]: RFC 8785 canonical JSON and the strict JSON reader;
//! * [`multikey`]: base58btc multibase, Ed25519 Multikey, did:key;
//! * [`proof`]: the `eddsa-jcs-2022` Data Integrity proof (create, verify);
//! * [`action`]: the kya action credential (subject, scope, evidence) and issuing;
//! * [`verify`]: verifying a credential for a concrete call, one error per reason;
//! * [`receipt`]: the decision receipt a server that opted in gets with each request;
//! * [`header`]: the `Kya-Decision` header that carries it, and its offline verification;
//! * [`store`]: persisted revocations, spent single-use ids, standing credentials;
//! * [`service`]: the daemon's `credential.issue|revoke|list` over the control socket
//!   (owners issue for their own agents, authorised by `SO_PEERCRED`);
//! * [`command`]: `kya credential issue|verify|revoke|list`.
//!
//! # How the decision path uses it
//!
//! ```text
//! approval granted      ──► action::issue(kya_key, subject{agent, exe, uid, env, scope}, from, until, evidence)
//!                           (exact call: scope.args_sha256 = action::args_digest(args), single_use = true)
//!                      ──► verify::verify_for_call(doc, kya_pub, call, now, store)   // proof, window, binding,
//!                           scope, not revoked, spent now ──► forward; audit the credential id
//! a later held call    ──► verify::find_covering(store, call, now, kya_pub)
//!                           Some(c) ──► CEL `credential` = c.credential.scope_json()
//!                                    ──► released? verify::redeem(&c.credential, now, store)
//! kya credential revoke ──► store.revoke(id): the next query (one stat) sees it
//! ```
//!
//! The issuer is kya's key; the human is evidence: see [`action`] for why.

pub mod action;
pub mod command;
pub mod header;
pub mod jcs;
pub(crate) mod multikey;
pub(crate) mod proof;
pub mod receipt;
pub(crate) mod service;
pub mod store;
pub(crate) mod validity;
pub mod verify;
