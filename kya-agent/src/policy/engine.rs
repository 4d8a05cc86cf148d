//! Deciding: precedence among matching rules and exceeded budgets, fail-closed
//! evaluation errors, credential release of holds; and the live
//! [`PolicyEngine`] the daemon shares between connections.

use super::budget::{window_key, BudgetError, BudgetGuard, BudgetItem, BudgetState, ReservationId};

/// The pseudo-rule of a call refused because budgets could not reserve for it.
pub(crate) const BUDGET_UNAVAILABLE_RULE: &str = "kya:budget-unavailable";
use super::cel::{Activation, VarMask, ALL_VARS};
use super::diag::Diagnostics;
use super::glob::Glob;
use super::model::{Budget, GroupBy, Limit, Policy, Rule};
use super::registry::Registry;
use super::{AgentInfo, CallContext, Decide, Decision, Explanation, ToolPin};
use kya_common::{ProcessIdentity, Verdict};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// The pseudo-rule of a call decided by `tool_drift`.
pub(crate) const TOOL_DRIFT_RULE: &str = "kya:tool-drift";

/// The pseudo-rule id reported when an orphaned agent's call is decided by
/// `[defaults] orphaned`.
pub(crate) const ORPHANED_RULE: &str = "kya:orphaned-agent";

/// Lowercase, port stripped (`Host: MCP.example.com:8443` → `mcp.example.com`,
/// `[::1]:443` → `::1`).
pub(crate) fn normalize_server(server: &str) -> String {
    let s = server.trim().trim_end_matches('.');
    let host = if let Some(rest) = s.strip_prefix('[') {
        rest.split_once(']').map(|(h, _)| h).unwrap_or(rest)
    } else if s.matches(':').count() == 1 {
        s.split_once(':').map(|(h, _)| h).unwrap_or(s)
    } else {
        s
    };
    host.to_ascii_lowercase()
}

struct Match {
    id: String,
    verdict: Verdict,
    reason: Option<String>,
    rule: Option<usize>,
}

fn glob_ok(g: &Option<Glob>, text: Option<&str>) -> bool {
    match (g, text) {
        (None, _) => true,
        (Some(g), Some(t)) => g.matches(t),
        (Some(_), None) => false,
    }
}

impl Policy {
    /// Static part of a rule match (everything but `when`).
    fn rule_static_match(rule: &Rule, call: &CallContext, server: &str) -> Result<(), String> {
        if !rule.method.matches(&call.method) {
            return Err(format!(
                "method {:?} does not match {}",
                call.method, rule.method
            ));
        }
        if !glob_ok(&rule.tool, call.tool.as_deref()) {
            return Err(format!(
                "tool {:?} does not match {}",
                call.tool,
                display(&rule.tool)
            ));
        }
        if !glob_ok(&rule.server, Some(server)) {
            return Err(format!(
                "server {server:?} does not match {}",
                display(&rule.server)
            ));
        }
        if !glob_ok(&rule.agent, Some(&call.agent.name)) {
            return Err(format!(
                "agent {:?} does not match {}",
                call.agent.name,
                display(&rule.agent)
            ));
        }
        if !glob_ok(&rule.owner, call.agent.owner.as_deref()) {
            return Err(format!(
                "owner {:?} does not match {}",
                call.agent.owner,
                display(&rule.owner)
            ));
        }
        Ok(())
    }

    fn budget_applies(b: &Budget, call: &CallContext, server: &str) -> bool {
        call.method == "tools/call"
            && glob_ok(&b.tool, call.tool.as_deref())
            && glob_ok(&b.server, Some(server))
            && glob_ok(&b.agent, Some(&call.agent.name))
    }

    fn budget_key(b: &Budget, call: &CallContext) -> String {
        let tool = match b.group_by {
            GroupBy::Agent => None,
            GroupBy::AgentTool => Some(call.tool.as_deref().unwrap_or("")),
        };
        window_key(&b.id, &call.agent.name, tool)
    }

    /// Decide `call` against this policy and (optionally) budget state.
    /// With `explain`, every rule and budget is examined and reported.
    /// Nothing is reserved: see [`Policy::decide_reserving`].
    pub fn decide_with(
        &self,
        call: &CallContext,
        budgets: Option<&BudgetState>,
        explain: bool,
    ) -> Decision {
        self.decide_inner(call, budgets, explain, false).0
    }

    /// Decide `call` for forwarding: when it is allowed under budgets, its
    /// amounts are reserved in the same critical section that checked them,
    /// so concurrent calls cannot together overshoot a budget. The caller must
    /// [`BudgetState::commit`] the reservation once the call is forwarded, or
    /// [`BudgetState::release`] it.
    pub fn decide_reserving(
        &self,
        call: &CallContext,
        budgets: &BudgetState,
    ) -> (Decision, Option<ReservationId>) {
        self.decide_inner(call, Some(budgets), false, true)
    }

    fn decide_inner(
        &self,
        call: &CallContext,
        budgets: Option<&BudgetState>,
        explain: bool,
        reserve: bool,
    ) -> (Decision, Option<ReservationId>) {
        let server = normalize_server(&call.server);
        let mut matches: Vec<Match> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let mut explanation: Vec<Explanation> = Vec::new();
        let mut act: Option<Activation> = None;
        let offset = self.defaults.offset;

        if call.agent.orphaned && self.defaults.orphaned != Verdict::Allow {
            matches.push(Match {
                id: ORPHANED_RULE.to_string(),
                verdict: self.defaults.orphaned,
                reason: Some(format!(
                    "agent {:?} is orphaned (its owner is gone or it has expired)",
                    call.agent.name
                )),
                rule: None,
            });
        }

        let candidates: Vec<u32> = if explain {
            (0..self.rules.len() as u32).collect()
        } else {
            self.index
                .candidates(&call.method, call.tool.as_deref(), &server)
        };
        // Phase 1: patterns only; collect the variables the surviving conditions read.
        let mut survivors: Vec<(usize, &Rule)> = Vec::with_capacity(candidates.len());
        let mut mask: VarMask = 0;
        for i in candidates {
            let Some(rule) = self.rules.get(i as usize) else {
                continue;
            };
            match Self::rule_static_match(rule, call, &server) {
                Ok(()) => {
                    if let Some(w) = &rule.when {
                        mask |= w.vars();
                    }
                    survivors.push((i as usize, rule));
                }
                Err(why) if explain => explanation.push(explain_line(rule, false, why)),
                Err(_) => {}
            }
        }
        let applying: Vec<&Budget> = match budgets {
            Some(_) => self
                .budgets
                .iter()
                .filter(|b| Self::budget_applies(b, call, &server))
                .collect(),
            None => Vec::new(),
        };
        for b in &applying {
            if let Limit::Sum { expr, .. } = &b.limit {
                mask |= expr.vars();
            }
        }
        // Phase 2: conditions, with one activation holding just those variables.
        for (i, rule) in survivors {
            let (matched, why) = match &rule.when {
                None => (true, "all patterns match".to_string()),
                Some(cond) => {
                    let result = match cond.fast_bool(call, offset) {
                        Some(b) => Ok(b),
                        None => {
                            let a = act
                                .get_or_insert_with(|| Activation::with_vars(call, offset, mask));
                            cond.eval_bool(a)
                        }
                    };
                    match result {
                        Ok(b) => (b, format!("when {:?} is {b}", cond.source())),
                        Err(e) => {
                            // Fail closed: an error matches deny/hold, never allow.
                            let m = rule.verdict != Verdict::Allow;
                            errors.push(format!("rule {}: when {:?}: {e}", rule.id, cond.source()));
                            (
                                m,
                                format!(
                                    "when {:?} failed ({e}); counts as {}",
                                    cond.source(),
                                    if m {
                                        "matched (fail closed)"
                                    } else {
                                        "not matched (fail closed)"
                                    }
                                ),
                            )
                        }
                    }
                }
            };
            if explain {
                explanation.push(explain_line(rule, matched, why));
            }
            if matched {
                matches.push(Match {
                    id: rule.id.clone(),
                    verdict: rule.verdict,
                    reason: rule.reason.clone(),
                    rule: Some(i),
                });
            }
        }

        // Held from the budget check to the reservation (see decide_reserving).
        let mut guard: Option<BudgetGuard<'_>> = None;
        let mut items: Vec<BudgetItem> = Vec::new();
        let now_ms = unix_ms(call.time);
        if let Some(state) = budgets {
            if !applying.is_empty() {
                guard = state.begin();
                if guard.is_none() {
                    errors.push(
                        "budget state unusable (a panic elsewhere); budgets count as exhausted"
                            .into(),
                    );
                }
            }
            for b in &self.budgets {
                if !applying.iter().any(|a| std::ptr::eq(*a, b)) {
                    if explain {
                        explanation.push(Explanation {
                            id: b.id.clone(),
                            kind: "budget",
                            at: b.origin.to_string(),
                            matched: false,
                            why: "does not apply to this call".into(),
                        });
                    }
                    continue;
                }
                let key = Self::budget_key(b, call);
                let used = guard
                    .as_ref()
                    .map_or(f64::INFINITY, |g| g.used(&key, now_ms, b.per));
                let max = match &b.limit {
                    Limit::Calls(n) => *n as f64,
                    Limit::Sum { max, .. } => *max,
                };
                let amount = self.budget_amount(b, call, &mut act, mask);
                if let Ok(amount) = &amount {
                    items.push(BudgetItem {
                        key: key.clone(),
                        amount: *amount,
                        per: b.per,
                    });
                }
                let (exceeded, why) = match amount {
                    Ok(amount) => (
                        used + amount > max,
                        format!(
                            "used {used} + this call {amount} against max {max} per {}",
                            humantime::format_duration(b.per)
                        ),
                    ),
                    Err(e) => {
                        errors.push(format!("budget {}: {e}", b.id));
                        (
                            true,
                            format!(
                                "amount cannot be computed ({e}); counts as exceeded (fail closed)"
                            ),
                        )
                    }
                };
                if explain {
                    explanation.push(Explanation {
                        id: b.id.clone(),
                        kind: "budget",
                        at: b.origin.to_string(),
                        matched: exceeded,
                        why: why.clone(),
                    });
                }
                if exceeded {
                    matches.push(Match {
                        id: b.id.clone(),
                        verdict: b.verdict,
                        reason: Some(
                            b.reason
                                .clone()
                                .unwrap_or_else(|| format!("budget {} exceeded: {why}", b.id)),
                        ),
                        rule: None,
                    });
                }
            }
        }

        // Precedence deny > hold > allow; the first of the winning verdict reports.
        let best = matches.iter().map(|m| m.verdict).max();
        let mut rule_drift: Option<Verdict> = None;
        let mut decision = match best {
            None => {
                let tools_call = call.method == "tools/call";
                let verdict = if tools_call {
                    self.defaults.verdict
                } else {
                    self.defaults.methods
                };
                Decision {
                    verdict,
                    rule: None,
                    reason: format!(
                        "no rule matched {}: default verdict {verdict}",
                        if tools_call {
                            format!("tool {:?}", call.tool.as_deref().unwrap_or(""))
                        } else {
                            format!("method {:?}", call.method)
                        }
                    ),
                    matched: Vec::new(),
                    policy_version: self.version.clone(),
                    errors: Vec::new(),
                    hold_timeout: self.defaults.hold_timeout,
                    approvers: Vec::new(),
                    agent: call.agent.name.clone(),
                    released_by_credential: false,
                    explain: None,
                }
            }
            Some(v) => {
                let mut ordered: Vec<&Match> = matches.iter().filter(|m| m.verdict == v).collect();
                ordered.extend(matches.iter().filter(|m| m.verdict != v));
                let win = ordered[0];
                let rule = win.rule.and_then(|i| self.rules.get(i));
                rule_drift = rule.and_then(|r| r.tool_drift);
                Decision {
                    verdict: v,
                    rule: Some(win.id.clone()),
                    reason: win
                        .reason
                        .clone()
                        .unwrap_or_else(|| format!("matched rule {}", win.id)),
                    matched: ordered.iter().map(|m| m.id.clone()).collect(),
                    policy_version: self.version.clone(),
                    errors: Vec::new(),
                    hold_timeout: rule
                        .and_then(|r| r.hold_timeout)
                        .unwrap_or(self.defaults.hold_timeout),
                    approvers: rule.map(|r| r.approvers.clone()).unwrap_or_default(),
                    agent: call.agent.name.clone(),
                    released_by_credential: false,
                    explain: None,
                }
            }
        };
        if decision.approvers.is_empty() {
            if let Some(o) = &call.agent.owner {
                if !call.agent.orphaned {
                    decision.approvers.push(o.clone());
                }
            }
        }
        let drift = self.apply_tool_drift(call, &server, rule_drift, &mut decision);
        if decision.verdict == Verdict::Hold && call.credential.is_some() && drift == Verdict::Allow
        {
            decision.verdict = Verdict::Allow;
            decision.released_by_credential = true;
            decision.reason = format!(
                "{}; hold released by a credential covering this call",
                decision.reason
            );
        }
        let mut reservation = None;
        if reserve && decision.verdict == Verdict::Allow && !items.is_empty() {
            reservation = guard.and_then(|g| g.reserve(now_ms, items));
            if reservation.is_none() {
                decision.verdict = Verdict::Deny;
                decision.rule = Some(BUDGET_UNAVAILABLE_RULE.into());
                decision.reason =
                    "budgets cannot take this call now (too many calls in flight); try again"
                        .into();
                errors.push("no budget reservation".into());
            }
        }
        decision.errors = errors;
        if explain {
            decision.explain = Some(explanation);
        }
        (decision, reservation)
    }

    /// A call of a tool whose definition is not the pinned one: the deciding
    /// rule's `tool_drift`, else `[defaults] tool_drift`, when stricter than
    /// the decision (a removed tool is denied unless drift is allowed).
    /// Returns the drift verdict (`Allow` when the tool did not drift): a
    /// standing credential never releases a hold of a drifted tool.
    fn apply_tool_drift(
        &self,
        call: &CallContext,
        server: &str,
        rule_drift: Option<Verdict>,
        decision: &mut Decision,
    ) -> Verdict {
        if call.method != "tools/call" || !call.tool_pin.drifted() {
            return Verdict::Allow;
        }
        let mut drift = rule_drift.unwrap_or(self.defaults.tool_drift);
        if call.tool_pin == ToolPin::Removed && drift != Verdict::Allow {
            drift = Verdict::Deny;
        }
        if drift > decision.verdict {
            let tool = call.tool.as_deref().unwrap_or("");
            let what = match call.tool_pin {
                ToolPin::New => "was added after the server's tools were pinned",
                ToolPin::Removed => "is no longer announced by the server",
                _ => "changed since its definition was pinned",
            };
            decision.verdict = drift;
            decision.matched.insert(0, TOOL_DRIFT_RULE.to_string());
            decision.rule = Some(TOOL_DRIFT_RULE.to_string());
            decision.reason = format!(
                "tool {tool:?} of server {server:?} {what} (tool_drift = {drift}); \
                 see `kya tools diff --server {server} {tool}`, accept with `kya tools accept`"
            );
        }
        drift
    }

    /// What `call` counts toward budget `b`: 1 for a call budget, the `sum`
    /// expression otherwise (`act` holds the variables in `mask`, built on
    /// first need). Never negative: an agent cannot earn budget back.
    fn budget_amount<'c>(
        &self,
        b: &Budget,
        call: &'c CallContext,
        act: &mut Option<Activation<'c>>,
        mask: VarMask,
    ) -> Result<f64, String> {
        let expr = match &b.limit {
            Limit::Calls(_) => return Ok(1.0),
            Limit::Sum { expr, .. } => expr,
        };
        let offset = self.defaults.offset;
        let amount = match expr.fast_number(call, offset) {
            Some(n) => Ok(n),
            None => {
                let a = act.get_or_insert_with(|| Activation::with_vars(call, offset, mask));
                expr.eval_number(a)
            }
        };
        amount.map(|n| n.max(0.0))
    }

    /// Count a forwarded call toward every budget it falls under.
    pub fn record_forwarded(&self, call: &CallContext, state: &BudgetState) {
        let server = normalize_server(&call.server);
        let now_ms = unix_ms(call.time);
        let mut act: Option<Activation> = None;
        for b in &self.budgets {
            if !Self::budget_applies(b, call, &server) {
                continue;
            }
            let amount = match self.budget_amount(b, call, &mut act, ALL_VARS) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(budget = %b.id, error = %e, "forwarded call has no amount; counted as 0");
                    0.0
                }
            };
            state.record(&Self::budget_key(b, call), now_ms, amount, b.per);
        }
    }
}

impl Decide for Policy {
    /// A bare policy has no budget state: budgets are not enforced.
    fn decide(&self, call: &CallContext) -> Decision {
        self.decide_with(call, None, false)
    }
}

fn display(g: &Option<Glob>) -> String {
    g.as_ref()
        .map(|g| format!("{:?}", g.as_str()))
        .unwrap_or_else(|| "*".into())
}

fn explain_line(rule: &Rule, matched: bool, why: String) -> Explanation {
    Explanation {
        id: rule.id.clone(),
        kind: "rule",
        at: rule.origin.to_string(),
        matched,
        why: format!("{} ({})", why, rule.verdict),
    }
}

fn unix_ms(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A policy or registry file is invalid.
    #[error("invalid policy:\n{0}")]
    Invalid(Diagnostics),
    /// Budget state cannot be used.
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

/// The live engine: current policy and registry (swapped atomically on
/// reload), and budget state. Shared by all connections behind an `Arc`.
pub struct PolicyEngine {
    policy: RwLock<Arc<Policy>>,
    registry: RwLock<Arc<Registry>>,
    paths: Vec<PathBuf>,
    agents_path: Option<PathBuf>,
    budgets: Arc<BudgetState>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl Drop for PolicyEngine {
    fn drop(&mut self) {
        // Here, not later in the flusher thread: whoever drops the engine
        // finds its budgets on disk.
        self.budgets.flush();
    }
}

impl PolicyEngine {
    /// Load the policy at `paths` (the embedded default when empty), the
    /// registry at `agents`, and budget state from `state_dir` (in memory when None).
    pub fn new(
        paths: Vec<PathBuf>,
        agents: Option<PathBuf>,
        state_dir: Option<&Path>,
    ) -> Result<PolicyEngine, EngineError> {
        let policy = Self::load_policy(&paths).map_err(EngineError::Invalid)?;
        let registry = Self::load_registry(agents.as_deref()).map_err(EngineError::Invalid)?;
        let budgets = match state_dir {
            Some(d) => BudgetState::open(d)?,
            None => Arc::new(BudgetState::in_memory()),
        };
        Ok(PolicyEngine::from_parts(
            policy, registry, paths, agents, budgets,
        ))
    }

    /// Write budget state that changed since its last write (shutdown).
    pub fn flush_budgets(&self) {
        self.budgets.flush();
    }

    /// Assemble an engine from already-loaded parts (tests, benchmarks).
    pub fn from_parts(
        policy: Policy,
        registry: Registry,
        paths: Vec<PathBuf>,
        agents: Option<PathBuf>,
        budgets: impl Into<Arc<BudgetState>>,
    ) -> PolicyEngine {
        PolicyEngine {
            policy: RwLock::new(Arc::new(policy)),
            registry: RwLock::new(Arc::new(registry)),
            paths,
            agents_path: agents,
            budgets: budgets.into(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }
    }

    fn load_policy(paths: &[PathBuf]) -> Result<Policy, Diagnostics> {
        if paths.is_empty() {
            Ok(Policy::embedded_default())
        } else {
            Policy::load(paths)
        }
    }

    fn load_registry(path: Option<&Path>) -> Result<Registry, Diagnostics> {
        match path {
            Some(p) => {
                let (r, warnings) = Registry::load_with_warnings(p)?;
                for w in &warnings.0 {
                    tracing::warn!("{w}");
                }
                Ok(r)
            }
            None => Ok(Registry::empty()),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The registry in force.
    pub fn registry(&self) -> Arc<Registry> {
        match self.registry.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Resolve a process to its agent with the current registry.
    pub fn resolve(&self, p: &ProcessIdentity, now: time::OffsetDateTime) -> AgentInfo {
        self.registry().resolve(p, now)
    }

    /// Reload policy and registry from their files. On any error both old
    /// ones stay in force (logged and counted); on success returns the new version.
    pub fn reload(&self) -> Result<String, Diagnostics> {
        let result = Self::load_policy(&self.paths)
            .and_then(|p| Self::load_registry(self.agents_path.as_deref()).map(|r| (p, r)));
        match result {
            Ok((policy, registry)) => {
                let version = policy.version.clone();
                let old = self.policy().version.clone();
                if let Ok(mut slot) = self.policy.write() {
                    *slot = Arc::new(policy);
                }
                if let Ok(mut slot) = self.registry.write() {
                    *slot = Arc::new(registry);
                }
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(old = %old, new = %version, "policy reloaded");
                Ok(version)
            }
            Err(d) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(errors = %d, version = %self.policy().version, "policy reload rejected; keeping the running policy");
                Err(d)
            }
        }
    }

    /// (successful, rejected) reload counts, for metrics.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// Files whose changes should trigger a reload.
    pub fn watched_paths(&self) -> Vec<PathBuf> {
        let mut v = self.paths.clone();
        v.extend(self.agents_path.clone());
        v
    }

    /// Count a forwarded call toward budgets (call only after forwarding).
    pub fn record_forwarded(&self, call: &CallContext) {
        self.policy().record_forwarded(call, &self.budgets);
    }

    /// Decide for forwarding, reserving budget for an allowed call (see
    /// [`Policy::decide_reserving`]).
    pub fn decide_reserving(&self, call: &CallContext) -> (Decision, Option<ReservationId>) {
        self.policy().decide_reserving(call, &self.budgets)
    }

    /// The reserved call `call` was forwarded: count it. A reservation that
    /// expired meanwhile is counted afresh.
    pub fn commit_forwarded(&self, reservation: ReservationId, call: &CallContext) {
        if !self.budgets.commit(reservation) {
            self.record_forwarded(call);
        }
    }

    /// The reserved call was not forwarded.
    pub fn release(&self, reservation: ReservationId) {
        self.budgets.release(reservation);
    }

    /// Budget reservations outstanding (calls allowed, not yet forwarded).
    pub fn budget_reservations(&self) -> usize {
        self.budgets.reservations()
    }

    /// Decide with `--explain`-style detail.
    pub fn decide_explained(&self, call: &CallContext) -> Decision {
        self.policy().decide_with(call, Some(&self.budgets), true)
    }
}

impl Decide for PolicyEngine {
    fn decide(&self, call: &CallContext) -> Decision {
        self.policy().decide_with(call, Some(&self.budgets), false)
    }
}
