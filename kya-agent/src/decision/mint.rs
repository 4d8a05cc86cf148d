//! The credential that releases an approved call: minted for exactly that
//! call, verified as any verifier would, and spent.

use crate::approvals::Answer;
use crate::credential::action::{self, AgentSubject, Channel, Environment, Evidence, Scope};
use crate::credential::store::CredentialStore;
use crate::credential::verify::{self, Call as CredCall};
use crate::intercept::http::CallFacts;
use crate::policy::CallContext;
use ed25519_dalek::SigningKey;
use std::time::Duration;
use time::OffsetDateTime;

/// How long a credential minted for one approved call stays valid: long
/// enough to forward the call, short enough to be useless later.
pub const APPROVAL_CREDENTIAL_TTL: Duration = Duration::from_secs(120);

/// Mint the single-use credential for exactly this approved call, verify it as
/// any verifier would, and spend it. Returns its id and the secured document.
#[allow(clippy::too_many_arguments)]
pub(super) fn mint_and_redeem(
    key: &SigningKey,
    store: &CredentialStore,
    host: &str,
    call: &CallFacts,
    ctx: &CallContext,
    answer: &Answer,
    approval_id: &str,
    binding: &str,
) -> Result<(String, serde_json::Value), String> {
    let now = OffsetDateTime::now_utc();
    let tool = call.tool.clone().unwrap_or_default();
    // The approver may have chosen a wider scope: this tool on this server for
    // a while (a standing credential later calls match), else exactly this call.
    let standing_for = answer
        .evidence
        .as_ref()
        .and_then(|e| e.get("standing_for_secs"))
        .and_then(|v| v.as_u64())
        .map(Duration::from_secs)
        .filter(|d| !d.is_zero() && *d <= crate::credential::validity::MAX_VALID_FOR);
    let scope = match standing_for {
        Some(_) => Scope {
            server: Some(call.server.clone()),
            tool: tool.clone(),
            args_sha256: None,
            arg_bounds: Vec::new(),
            single_use: false,
        },
        None => Scope::exact(&call.server, &tool, &call.args).map_err(|e| e.to_string())?,
    };
    let subject = AgentSubject {
        agent: ctx.agent.name.clone(),
        exe_sha256: None,
        uid: Some(ctx.process.uid),
        environment: Environment {
            host: host.to_string(),
            cgroup: (!ctx.process.cgroup.is_empty()).then(|| ctx.process.cgroup.clone()),
        },
        scope,
    };
    let channel = if answer.channel == "ciba" {
        Channel::Ciba
    } else {
        Channel::Local
    };
    let mut evidence =
        Evidence::approval(&answer.approver, channel, now).map_err(|e| e.to_string())?;
    // A CIBA answer carries the digest of the verified ID token that proved it.
    evidence.id_token_sha256 = super::hold::id_token_digest(answer);
    evidence.approval_id = Some(approval_id.to_string());
    evidence.binding_message = Some(binding.to_string());
    let until = now + standing_for.unwrap_or(APPROVAL_CREDENTIAL_TTL);
    let (doc, minted) =
        action::issue(key, subject, now, until, vec![evidence]).map_err(|e| e.to_string())?;
    if standing_for.is_some() {
        store
            .add_standing(&doc, &minted, now)
            .map_err(|e| format!("cannot store the standing credential: {e}"))?;
    }
    let call = CredCall {
        agent: ctx.agent.name.clone(),
        uid: ctx.process.uid,
        cgroup: ctx.process.cgroup.clone(),
        exe_sha256: None,
        host: host.to_string(),
        server: call.server.clone(),
        method: call.method.clone(),
        tool,
        args: call.args.clone(),
    };
    let cred = verify::verify_for_call(&doc, &key.verifying_key(), &call, now, store)
        .map_err(|e| e.to_string())?;
    Ok((cred.id, doc))
}
