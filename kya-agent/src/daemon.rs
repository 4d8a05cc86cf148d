//! `kya run`: wire the redirect, the interceptor and the decision path together.
//!
//! Order matters: the listener is bound before the redirect is attached (so the
//! first redirected connection finds it), and on shutdown the interceptor stops
//! before the redirect is detached and unpinned.

use crate::agents::{AgentsHandler, Suspensions};
use crate::approvals::ciba::CibaChannel;
use crate::approvals::local::LocalChannel;
use crate::approvals::persist::Persist;
use crate::approvals::webhook::WebhookChannel;
use crate::approvals::Approvals;
use crate::audit::writer::{AuditConfig, AuditLog};
use crate::bpf::{RedirectConfig, Redirector};
use crate::cli::RunArgs;
use crate::config::Config;
use crate::control::guard::{Gate, Recorder, SelectionOracle, SelectionUnknown};
use crate::control::server::{ControlServer, Router};
use crate::credential::service::CredentialService;
use crate::credential::store::CredentialStore;
use crate::decision::events::{EventHub, EventsHandler};
use crate::decision::DecisionPath;
use crate::intercept::dispatch::Inspection;
use crate::intercept::http::{Governor, Limits};
use crate::intercept::listener::InterceptStats;
use crate::intercept::{Interceptor, InterceptorConfig, OriginSource};
use crate::metrics::{Metrics, ReloadLabels, Sample, SampleKind, Source};
use crate::policy::{PolicyEngine, Registry};
use crate::status::StatusHandler;
use crate::tls::TlsContext;
use anyhow::Context;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Run the daemon until SIGINT/SIGTERM.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.overrides()).context("loading configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kya")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    prepare_state_dir(&config.state_dir)?;
    let control = ControlServer::bind(&config.state_dir).context("binding the control socket")?;
    let interceptor = Interceptor::bind(InterceptorConfig {
        listen_port: config.listen_port,
        ..Default::default()
    })
    .context("binding the interceptor")?;

    let engine = Arc::new(
        PolicyEngine::new(
            config.policy_paths.clone(),
            config.agents.clone(),
            Some(&config.state_dir),
        )
        .context("loading the policy")?,
    );
    let wanted = redirect_config(&config, &engine.registry(), true)
        .context("resolving the --container selectors")?;
    let mut redirector =
        Redirector::start(&wanted).context("loading and attaching the eBPF redirect")?;
    redirector
        .spawn_event_reader()
        .context("reading the kernel side's events")?;
    let origins: Arc<dyn OriginSource> = Arc::new(
        crate::intercept::kernel_origin::KernelOrigins::new(redirector.origins()),
    );
    let netns_wake = redirector.netns_wake();
    let redirector = Arc::new(Mutex::new(Some(redirector)));
    // Other network namespaces (containers): a listener inside each one
    // that holds selected processes.
    let netns = crate::netns::NetnsServer::new(
        config.listen_port,
        interceptor.acceptor(),
        redirector.clone(),
    );
    let served_netns = netns.clone();
    let status = StatusHandler::new(config.clone(), redirector.clone(), interceptor.stats());
    let status = status.section("namespaces", {
        let n = netns.clone();
        Arc::new(move || serde_json::json!(n.status()))
    });
    let suspensions = Arc::new(
        Suspensions::open(&config.state_dir).context("reading the agent suspension list")?,
    );
    let key = Arc::new(
        crate::keys::load_or_create(&config.state_dir).context("loading kya's signing key")?,
    );
    let audit = Arc::new(
        AuditLog::open(AuditConfig::new(&config.audit_path), (*key).clone())
            .with_context(|| format!("opening the audit log {}", config.audit_path.display()))?,
    );
    let credentials =
        Arc::new(CredentialStore::open(&config.state_dir).context("opening the credential store")?);
    let host = crate::host::host_name();
    let approvals = open_approvals(&config.state_dir, &audit, &config.audit_path, &host).await?;
    let tls = TlsContext::from_config(&config).context("setting up TLS interception")?;
    let events = EventHub::new();
    let status = status.section("audit", {
        let a = audit.clone();
        Arc::new(move || serde_json::json!(a.health()))
    });
    let sinks = crate::audit::export::spawn(|| events.subscribe(), &config.sinks);
    let status = status.section("sinks", {
        Arc::new(move || serde_json::json!(sinks.iter().map(|s| s.snapshot()).collect::<Vec<_>>()))
    });
    let status = status.section("events", {
        let e = events.clone();
        Arc::new(move || serde_json::json!({"published": e.published(), "dropped_by_slow_followers": e.dropped()}))
    });
    let status = status.section("ca", {
        let fp = tls.ca.fingerprint().to_string();
        let path = tls.ca.cert_path().display().to_string();
        Arc::new(move || serde_json::json!({"fingerprint": fp, "cert": path}))
    });
    let status = status.section("policy", {
        let e = engine.clone();
        Arc::new(move || policy_status(&e))
    });
    let status = status.section("approvals", {
        let a = approvals.clone();
        Arc::new(move || serde_json::json!({ "pending": a.len(), "channels": a.channel_names() }))
    });
    // CIBA: local problems (secret file, ping port) stop the start; an
    // unreachable provider does not (discovery retries in the background and
    // the local channel answers meanwhile).
    let status = match &config.ciba {
        Some(ciba) => {
            let channel = CibaChannel::start(ciba.clone(), tls.ca.clone())
                .await
                .context("starting the CIBA approval channel")?;
            approvals.add_channel(channel.clone());
            status.section("ciba", Arc::new(move || channel.status()))
        }
        None => status,
    };
    let status = match &config.webhook {
        Some(hook) => {
            let channel = WebhookChannel::new(hook.clone(), key.clone(), host.clone())
                .context("starting the approval webhook")?;
            approvals.add_channel(channel.clone());
            status.section("webhook", Arc::new(move || channel.status()))
        }
        None => status,
    };
    let gate = Gate::new(Arc::new(KernelSelection(redirector.clone()))).with_recorder(
        refusal_recorder(audit.clone(), events.clone()),
        control.path(),
    );
    let router = Router::new(Arc::new(gate))
        .route("status", Arc::new(status))
        .route(
            "approvals",
            Arc::new(LocalChannel::new(approvals.clone(), config.separate_duties)),
        )
        .route("events", Arc::new(EventsHandler::new(events.clone())))
        .route(
            "credential",
            Arc::new(
                CredentialService::new(
                    engine.clone(),
                    key.clone(),
                    credentials.clone(),
                    approvals.clone(),
                    host.clone(),
                )
                .with_separate_duties(config.separate_duties),
            ),
        )
        .route(
            "agents",
            Arc::new(AgentsHandler::new(
                engine.clone(),
                suspensions.clone(),
                approvals.clone(),
            )),
        );

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Metrics::new();
    let decisions = Arc::new(DecisionPath::new(
        engine.clone(),
        approvals.clone(),
        credentials,
        key,
        audit.clone(),
        events,
        metrics.clone(),
        suspensions,
    ));
    let decision_path: Arc<dyn Governor> = decisions.clone();
    metrics.add_source(kernel_samples(redirector.clone()));
    metrics.add_source(intercept_samples(interceptor.stats()));
    metrics.add_source(budget_samples(engine.clone()));
    metrics.add_source(netns_samples(served_netns));
    let metrics_task = config.metrics.map(|addr| {
        tokio::spawn(crate::metrics::serve(
            addr,
            metrics.clone(),
            stop_rx.clone(),
        ))
    });
    let reloader = crate::policy::reload::spawn_watcher(
        engine.clone(),
        std::time::Duration::from_secs(1),
        on_reload(config.clone(), redirector.clone(), metrics.clone()),
    )
    .context("installing the policy reload watcher")?;
    let inspection = Arc::new(Inspection::new(
        tls,
        decision_path,
        Limits::from_config(&config),
        crate::intercept::dispatch::Unclassified::from_config(&config),
        Arc::new(crate::intercept::names::NameResolver::new()),
    ));
    let server = tokio::spawn(interceptor.serve(origins, Some(inspection), stop_rx.clone()));
    let netns_task = netns.spawn(netns_wake, stop_rx.clone());
    let control_task = tokio::spawn(control.serve(router, stop_rx));

    if config.selection.is_empty() && engine.registry().agents().is_empty() {
        tracing::warn!("nothing is selected: add --cgroup, --uid, --exe or --pid (or [select] in the config) to intercept agents");
    }
    tracing::info!(
        listen_port = config.listen_port,
        pin_dir = %config.pin_dir.display(),
        fail_open = config.fail_open,
        ports = ?config.ports,
        cgroups = ?config.selection.cgroups,
        containers = ?config.selection.containers,
        uids = ?config.selection.uids,
        exes = ?config.selection.exes,
        pids = ?config.selection.pids,
        agents = engine.registry().agents().len(),
        policy_version = %engine.policy().version,
        "kya is running"
    );

    let why = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal = why, "shutting down");
    // Held calls are denied now ("kya is stopping") and recorded as
    // interrupted; the interceptor then stops accepting, lets open
    // connections deliver those answers (up to its drain deadline) and
    // aborts the rest, whose decisions record themselves as interrupted.
    let ended = decisions.stop();
    if ended > 0 {
        tracing::info!(held = ended, "held calls denied: kya is stopping");
    }
    let _ = stop_tx.send(true);
    reloader.abort();
    if let Err(e) = server.await {
        tracing::error!(error = %e, "interceptor task failed");
    }
    if let Err(e) = netns_task.await {
        tracing::error!(error = %e, "network namespace task failed");
    }
    if let Err(e) = control_task.await {
        tracing::error!(error = %e, "control socket task failed");
    }
    if let Some(task) = metrics_task {
        match task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "metrics endpoint failed"),
            Err(e) => tracing::error!(error = %e, "metrics task failed"),
            Ok(Ok(())) => {}
        }
    }
    // Budgets are written by a background flusher; write the last changes now.
    engine.flush_budgets();
    // Commit what is queued and sign the final checkpoint.
    let closing = audit.clone();
    match tokio::task::spawn_blocking(move || closing.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "closing the audit log failed"),
        Err(e) => tracing::error!(error = %e, "audit close task failed"),
    }
    let taken = redirector.lock().ok().and_then(|mut r| r.take());
    if let Some(r) = taken {
        if let Ok(stats) = r.stats() {
            tracing::info!(?stats, "kernel side counters at shutdown");
        }
        r.shutdown().context("detaching the eBPF redirect")?;
    }
    tracing::info!("kya stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// The control gate's view of the selection: the loaded BPF maps. Once the
/// redirect is stopped (shutdown) nothing can be checked, so nothing passes.
struct KernelSelection(Arc<Mutex<Option<Redirector>>>);

impl SelectionOracle for KernelSelection {
    fn is_selected(&self, tgid: u32) -> Result<bool, SelectionUnknown> {
        let guard = self
            .0
            .lock()
            .map_err(|_| SelectionUnknown("the redirect's lock is poisoned".into()))?;
        let redirector = guard
            .as_ref()
            .ok_or_else(|| SelectionUnknown("the redirect is stopped".into()))?;
        redirector
            .is_selected(tgid)
            .map_err(|e| SelectionUnknown(e.to_string()))
    }
}

/// Refused control operations go to the audit log (durably, before the
/// refusal is answered) and then to the live event stream.
fn refusal_recorder(audit: Arc<AuditLog>, events: Arc<EventHub>) -> Recorder {
    Arc::new(move |event| {
        let audit = audit.clone();
        let events = events.clone();
        Box::pin(async move {
            match audit.append(&event, event.required_durability()).await {
                Ok(_) => events.publish(event),
                Err(e) => tracing::error!(error = %e, decision = %event.decision_id,
                    "audit append of a refused control operation failed"),
            }
        })
    })
}

/// After a policy reload: widen or narrow the eBPF selection to the new
/// registry, and count the reload.
fn on_reload(
    config: Config,
    redirector: Arc<Mutex<Option<Redirector>>>,
    metrics: Arc<Metrics>,
) -> crate::policy::reload::OnReload {
    Box::new(move |engine, result| {
        let outcome = if result.is_ok() { "ok" } else { "rejected" };
        metrics
            .policy_reloads
            .get_or_create(&ReloadLabels {
                result: outcome.into(),
            })
            .inc();
        if result.is_err() {
            return;
        }
        let wanted = match redirect_config(&config, &engine.registry(), false) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot resolve a --container selector; the previous selection stays");
                return;
            }
        };
        if let Ok(mut guard) = redirector.lock() {
            if let Some(r) = guard.as_mut() {
                if let Err(e) = r.update_selection(&wanted) {
                    tracing::error!(error = %e, "cannot apply the new registry's selection; the previous selection stays");
                }
            }
        }
    })
}

/// The `policy` section of `kya status`.
fn policy_status(engine: &PolicyEngine) -> serde_json::Value {
    let policy = engine.policy();
    let (ok, rejected) = engine.reload_counts();
    serde_json::json!({
        "version": policy.version,
        "files": policy.files,
        "rules": policy.rules.len(),
        "budgets": policy.budgets.len(),
        "agents": engine.registry().agents().len(),
        "reloads_ok": ok,
        "reloads_rejected": rejected,
    })
}

/// Kernel counters, read at scrape time.
fn kernel_samples(redirector: Arc<Mutex<Option<Redirector>>>) -> Source {
    Box::new(move || {
        let stats = match redirector.lock() {
            Ok(g) => g.as_ref().and_then(|r| r.stats().ok()),
            Err(_) => None,
        };
        let Some(s) = stats else { return Vec::new() };
        let c = |name: &str, help: &str, value: u64| Sample {
            name: format!("kernel_{name}"),
            help: help.to_string(),
            kind: SampleKind::Counter,
            value,
        };
        vec![
            c(
                "redirected",
                "TCP connects redirected to the interceptor",
                s.redirected4 + s.redirected6 + s.redirected_v4mapped,
            ),
            c(
                "refused_dgram",
                "UDP sends/connects to guarded ports refused",
                s.refused_dgram,
            ),
            c(
                "refused_netns",
                "TCP connects refused in network namespaces kya does not serve (yet)",
                s.refused_netns,
            ),
            c(
                "established",
                "Redirected connections established",
                s.established,
            ),
            c(
                "selected_exec",
                "Processes selected at exec",
                s.selected_exec,
            ),
            c(
                "selected_fork",
                "Processes selected at fork",
                s.selected_fork,
            ),
            c(
                "selected_sticky",
                "Processes recorded as selected when seen with a selected uid or cgroup",
                s.selected_sticky,
            ),
            c(
                "selected_script",
                "Processes selected when they opened a selected script",
                s.selected_script,
            ),
            c(
                "map_full",
                "BPF map updates that failed (map pressure)",
                s.map_full,
            ),
            c(
                "events_lost",
                "Kernel events lost (ring buffer full)",
                s.events_lost,
            ),
        ]
    })
}

/// Budget state, read at scrape time.
fn budget_samples(engine: Arc<PolicyEngine>) -> Source {
    Box::new(move || {
        vec![Sample {
            name: "budget_reservations".into(),
            help: "Calls allowed under a budget and not yet forwarded (amounts reserved)".into(),
            kind: SampleKind::Gauge,
            value: engine.budget_reservations() as u64,
        }]
    })
}

/// Network namespaces served with a ready listener, and those kya could not
/// serve (their selected processes' connections are refused).
fn netns_samples(netns: Arc<crate::netns::NetnsServer>) -> Source {
    Box::new(move || {
        let all = netns.status();
        let ready = all.iter().filter(|n| n.state == "ready").count();
        let g = |name: &str, help: &str, value: usize| Sample {
            name: name.into(),
            help: help.into(),
            kind: SampleKind::Gauge,
            value: value as u64,
        };
        vec![
            g(
                "netns_served",
                "Network namespaces other than the host's with a ready kya listener",
                ready,
            ),
            g(
                "netns_failed",
                "Network namespaces holding selected processes where kya could not open a listener",
                all.len() - ready,
            ),
        ]
    })
}

/// Interceptor counters, read at scrape time.
fn intercept_samples(stats: Arc<InterceptStats>) -> Source {
    use std::sync::atomic::Ordering::Relaxed;
    Box::new(move || {
        let c = |name: &str, help: &str, value: u64| Sample {
            name: format!("intercept_{name}"),
            help: help.to_string(),
            kind: SampleKind::Counter,
            value,
        };
        vec![
            c(
                "accepted",
                "Connections accepted by the interceptor",
                stats.accepted.load(Relaxed),
            ),
            c(
                "unknown_refused",
                "Connections refused: not redirected by kya",
                stats.unknown.load(Relaxed),
            ),
            c(
                "upstream_failed",
                "Connections whose original destination was unreachable",
                stats.upstream_failed.load(Relaxed),
            ),
        ]
    })
}

/// The pending-approval set, after recording what a previous run left held:
/// each such hold ends in the audit log as `interrupted` (unless its end is
/// already there), then the journal is cleared.
async fn open_approvals(
    state_dir: &Path,
    audit: &AuditLog,
    audit_path: &Path,
    host: &str,
) -> anyhow::Result<Arc<Approvals>> {
    let persist = Persist::new(state_dir);
    match persist.interrupted() {
        Ok(left) => {
            for r in &left {
                tracing::warn!(
                    id = %r.view.id,
                    agent = %r.view.agent,
                    tool = %r.view.tool,
                    decision = %r.view.decision_id,
                    "call was held when the daemon stopped: denied (recorded as interrupted)"
                );
            }
            match crate::decision::restart::record_interrupted(audit, audit_path, host, &left).await
            {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(records = n, "interrupted holds recorded in the audit log");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the interrupted holds in the audit log")
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the pending-approvals record; starting empty")
        }
    }
    if let Err(e) = persist.take_interrupted() {
        tracing::error!(error = %e, "cannot clear the pending-approvals record");
    }
    Ok(Approvals::new(
        crate::approvals::pending::DEFAULT_MAX_PENDING,
        Some(persist),
    ))
}

/// Create the state directory: mode 0711, so local users can reach the
/// control socket by name (to answer their own approvals) but not list or
/// read what else is there (keys are 0600 besides).
fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("setting mode of {}", dir.display()))?;
    Ok(())
}

/// What the kernel must redirect: the configured selection plus every
/// registered agent's selectors (any match; a process matching a selector but
/// no agent is intercepted as the agent `unregistered`). systemd units are
/// selected through their cgroup.
/// The redirect's selection. `strict`: a `--container` that cannot be
/// resolved is an error (at start); otherwise (a reload, when the container
/// may have stopped since) it is skipped with a warning, and the rest applies.
fn redirect_config(
    config: &Config,
    registry: &Registry,
    strict: bool,
) -> Result<RedirectConfig, crate::container::ContainerError> {
    let sel = registry.selectors();
    let mut cgroups = config.selection.cgroups.clone();
    cgroups.extend(sel.cgroups);
    if !config.selection.containers.is_empty() {
        match crate::bpf::cgroup2_mount() {
            Ok(mount) => {
                for id in &config.selection.containers {
                    match crate::container::cgroup_of_container(&mount, id) {
                        Ok(cg) => {
                            tracing::info!(container = %id, cgroup = %cg, "container selected by its cgroup");
                            cgroups.push(cg);
                        }
                        Err(e) if strict => return Err(e),
                        Err(e) => {
                            tracing::warn!(container = %id, error = %e, "container selector skipped")
                        }
                    }
                }
            }
            // the redirect's own start reports the missing cgroup2 mount
            Err(e) => {
                tracing::error!(error = %e, "no cgroup2 mount: --container cannot be resolved")
            }
        }
    }
    cgroups.extend(sel.units.iter().map(|u| format!("/system.slice/{u}")));
    let mut uids = config.selection.uids.clone();
    uids.extend(sel.uids);
    let mut exes = config.selection.exes.clone();
    exes.extend(sel.exes);
    cgroups.sort();
    cgroups.dedup();
    uids.sort_unstable();
    uids.dedup();
    exes.sort();
    exes.dedup();
    Ok(RedirectConfig {
        cgroups,
        uids,
        exes,
        pids: config.selection.pids.clone(),
        ports: config.ports.clone(),
        all_tcp_ports: config.all_ports,
        listen_port: config.listen_port,
        pin_dir: config.pin_dir.clone(),
        fail_open: config.fail_open,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::budget::BudgetState;
    use crate::policy::diag::Source as PolicySource;
    use crate::policy::{AgentInfo, CallContext, Policy};

    #[test]
    fn the_budget_gauge_counts_calls_in_flight() {
        let policy = Policy::from_sources(&[PolicySource::new(
            "p.toml",
            "[defaults]\nverdict = \"allow\"\n[[budget]]\nid = \"calls\"\nmax_calls = 10\nper = \"1h\"\n"
                .to_string(),
        )])
        .unwrap();
        let engine = Arc::new(PolicyEngine::from_parts(
            policy,
            Registry::empty(),
            Vec::new(),
            None,
            BudgetState::in_memory(),
        ));
        let gauge = budget_samples(engine.clone());
        assert_eq!(gauge()[0].value, 0);
        let call = CallContext {
            agent: AgentInfo {
                name: "bot".into(),
                owner: None,
                orphaned: false,
            },
            process: Default::default(),
            server: "mcp.test".into(),
            destination: None,
            method: "tools/call".into(),
            tool: Some("t".into()),
            args: serde_json::json!({}),
            time: time::OffsetDateTime::now_utc(),
            credential: None,
        };
        let (_, first) = engine.decide_reserving(&call);
        let (_, second) = engine.decide_reserving(&call);
        let s = gauge();
        assert_eq!((s[0].name.as_str(), s[0].value), ("budget_reservations", 2));
        engine.commit_forwarded(first.unwrap(), &call);
        engine.release(second.unwrap());
        assert_eq!(gauge()[0].value, 0);
    }
}
