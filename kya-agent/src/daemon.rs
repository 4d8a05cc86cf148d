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
use crate::container_select::{resolve_containers, ContainerCgroups};
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
    crate::fsutil::prepare_state_dir(&config.state_dir)?;
    let control = ControlServer::bind(&config.state_dir, config.control_group.as_deref())
        .context("binding the control socket")?;
    let max_connections = fit_connections(config.max_connections, raise_nofile_limit());
    let interceptor = Interceptor::bind(InterceptorConfig {
        listen_port: config.listen_port,
        max_connections,
        max_connections_per_process: config.max_connections_per_process,
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
    let globs = crate::cgroup_glob::CgroupGlobs::new(&config.selection.cgroup_globs)
        .context("compiling the cgroup globs")?;
    let images = crate::image_select::ImageSelectors::new(&config.selection.images)
        .context("parsing the --image references")?;
    // at start, an image no container runs yet is fine: they may start later
    let image_matches = {
        let i = images.clone();
        tokio::task::spawn_blocking(move || crate::image_select::resolve(&i))
            .await
            .unwrap_or_default()
    };
    let container_cgroups = Arc::new(Mutex::new(ContainerCgroups {
        containers: resolve_containers(&config, true)
            .context("resolving the --container selectors")?,
        globbed: crate::container_select::scan_globs(&globs),
        pods: Vec::new(),
        imaged: crate::image_select::cgroups_of(&image_matches),
        stale: false,
    }));
    let wanted = {
        let cur = container_cgroups
            .lock()
            .map_err(|_| anyhow::anyhow!("container selection lock poisoned"))?;
        redirect_config(&config, &engine.registry(), &cur)
    };
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
    let image_matches = Arc::new(Mutex::new(image_matches));
    let status = status.section("images", {
        let (i, m) = (images.clone(), image_matches.clone());
        Arc::new(move || crate::image_select::status(&i, &m))
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
    let pins = Arc::new(
        crate::pins::PinStore::open(&config.state_dir)
            .context("reading the pinned tool definitions")?,
    );
    let host = crate::host::host_name();
    let approvals = open_approvals(
        &config.state_dir,
        &audit,
        &config.audit_path,
        &host,
        config.max_pending,
    )
    .await?;
    let tls = TlsContext::from_config(&config).context("setting up TLS interception")?;
    let events = EventHub::new();
    let status = status.section("audit", {
        let a = audit.clone();
        Arc::new(move || serde_json::json!(a.health()))
    });
    // The public half of the key, for servers verifying receipts (and
    // anyone verifying credentials and the audit log); the secret stays.
    let public_key =
        crate::keys::export_public(&config.state_dir, &key).context("writing kya's public key")?;
    let status = status.section("proof", {
        let mut servers: Vec<String> = config.proof.servers.iter().cloned().collect();
        servers.sort();
        let doc = serde_json::json!({
            "header": "Kya-Decision",
            "servers": servers,
            "ttl_seconds": config.proof.ttl.as_secs(),
            "public_key": crate::credential::multikey::did_key(&key.verifying_key()),
            "public_key_file": public_key,
        });
        Arc::new(move || doc.clone())
    });
    let sinks = crate::audit::export::spawn(|| events.subscribe(), &config.sinks);
    let status = status.section("sinks", {
        Arc::new(move || serde_json::json!(sinks.iter().map(|s| s.snapshot()).collect::<Vec<_>>()))
    });
    let status = status.section("events", {
        let e = events.clone();
        Arc::new(move || serde_json::json!({"published": e.published(), "dropped_by_slow_followers": e.dropped()}))
    });
    // Read at each request: what the daemon may do now (its uid, capabilities).
    let status = status.section("privileges", Arc::new(crate::privileges::own));
    let status = status.section("control", {
        let socket = control.path().display().to_string();
        let group = config.control_group.clone();
        Arc::new(move || {
            serde_json::json!({
                "socket": socket,
                "mode": format!("{:04o}", crate::control::server::SOCKET_MODE),
                // null: the daemon's own group (only root may connect)
                "group": group,
            })
        })
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
    let status = status.section("tools", {
        let p = pins.clone();
        Arc::new(move || p.summary())
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
    // Credentials held for servers: files read now, so a bad one stops the start.
    let broker =
        crate::broker::Broker::new(&config.broker, Some((key.clone(), format!("kya:{host}"))))
            .context("credential brokering")?
            .map(Arc::new);
    if let Some(b) = &broker {
        for (server, source) in b.servers() {
            tracing::info!(%server, %source, "credentials brokered");
        }
    }
    let status = match &broker {
        Some(b) => {
            let servers: Vec<serde_json::Value> = b
                .servers()
                .into_iter()
                .map(|(server, source)| serde_json::json!({"server": server, "source": source}))
                .collect();
            status.section("broker", Arc::new(move || serde_json::json!(servers)))
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
            "tools",
            Arc::new(crate::pins::handler::ToolsHandler::new(pins.clone())),
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
    let decisions = Arc::new(
        DecisionPath::new(
            engine.clone(),
            approvals.clone(),
            credentials,
            key,
            audit.clone(),
            events,
            metrics.clone(),
            suspensions,
        )
        .with_args_record(crate::decision::ArgsRecord {
            include: config.audit_args,
            redact: config.audit_redact.clone(),
        })
        .with_broker(broker)
        .with_proofs(config.proof.clone())
        .with_pins(pins),
    );
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
        on_reload(
            config.clone(),
            redirector.clone(),
            container_cgroups.clone(),
            metrics.clone(),
        ),
    )
    .context("installing the policy reload watcher")?;
    let build: crate::container_select::BuildSelection = {
        let (config, engine) = (config.clone(), engine.clone());
        Arc::new(move |cgroups: &ContainerCgroups| {
            redirect_config(&config, &engine.registry(), cgroups)
        })
    };
    let glob_task = crate::container_select::spawn_watcher(
        globs,
        container_cgroups.clone(),
        redirector.clone(),
        build.clone(),
        stop_rx.clone(),
    );
    let image_task = crate::image_select::spawn_watcher(
        images,
        image_matches,
        container_cgroups.clone(),
        redirector.clone(),
        build.clone(),
        stop_rx.clone(),
    );
    let pod_task = match &config.kubernetes {
        Some(k) => Some(crate::container_select::spawn_pod_watcher(
            crate::kube::client::KubeClient::new(k.clone())
                .context("setting up the Kubernetes API client")?,
            container_cgroups.clone(),
            redirector.clone(),
            build,
            stop_rx.clone(),
        )),
        None => None,
    };
    let limits = Limits::from_config(&config);
    metrics.add_source(limit_samples(limits.refusals.clone()));
    let inspection = Arc::new(Inspection::new(
        tls,
        decision_path,
        limits,
        crate::intercept::dispatch::Unclassified::from_config(&config),
        Arc::new(crate::intercept::names::NameResolver::new()),
    ));
    let server = tokio::spawn(interceptor.serve(origins, Some(inspection), stop_rx.clone()));
    let netns_task = netns.spawn(netns_wake, stop_rx.clone());
    let control_task = tokio::spawn(control.serve(router, stop_rx));

    // Everything that needed more is done (programs loaded and attached,
    // sockets bound, state opened): every thread keeps only what running
    // needs. A daemon that cannot drop does not run.
    let signalled = crate::capdrop::drop_to_kept()
        .context("dropping the capabilities kya does not need once started")?;
    tracing::debug!(threads_signalled = signalled, "capabilities dropped");

    if config.selection.is_empty()
        && config
            .kubernetes
            .as_ref()
            .is_none_or(|k| k.selector.is_none())
        && engine.registry().agents().is_empty()
    {
        tracing::warn!("nothing is selected: add --cgroup, --uid, --exe or --pid (or [select] in the config) to intercept agents");
    }
    tracing::info!(
        listen_port = config.listen_port,
        pin_dir = %config.pin_dir.display(),
        fail_open = config.fail_open,
        ports = ?config.ports,
        cgroups = ?config.selection.cgroups,
        containers = ?config.selection.containers,
        cgroup_globs = ?config.selection.cgroup_globs,
        images = ?config.selection.images,
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
    if let Err(e) = glob_task.await {
        tracing::error!(error = %e, "cgroup glob task failed");
    }
    if let Err(e) = image_task.await {
        tracing::error!(error = %e, "image selection task failed");
    }
    if let Some(task) = pod_task {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "Kubernetes pod task failed");
        }
    }
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
    container_cgroups: Arc<Mutex<ContainerCgroups>>,
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
        // never fails: a selector that names no running container is skipped
        let containers = resolve_containers(&config, false).unwrap_or_default();
        let Ok(mut cur) = container_cgroups.lock() else {
            return;
        };
        cur.containers = containers;
        let wanted = redirect_config(&config, &engine.registry(), &cur);
        if let Ok(mut guard) = redirector.lock() {
            if let Some(r) = guard.as_mut() {
                if let Err(e) = r.update_selection(&wanted) {
                    cur.stale = true;
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
/// Raise the open-files soft limit to the hard limit (each agent connection
/// costs two descriptors); the resulting soft limit, logged.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: a valid rlimit struct; failure is only logged.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_NOFILE");
        }
    }
    tracing::info!(soft = lim.rlim_cur, hard = lim.rlim_max, "open-files limit");
    lim.rlim_cur
}

/// Descriptors kept aside for everything but agent connections (listeners,
/// audit, state, namespaces, BPF).
const RESERVED_FDS: u64 = 512;

/// The total connection limit that fits the open-files limit `nofile`
/// (two descriptors a connection), warning when `wanted` does not.
fn fit_connections(wanted: usize, nofile: u64) -> usize {
    let fits = usize::try_from(nofile.saturating_sub(RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if wanted > fits {
        tracing::warn!(
            configured = wanted,
            used = fits,
            nofile,
            "intercept.max_connections does not fit the open-files limit; using what fits"
        );
        return fits;
    }
    tracing::info!(max_connections = wanted, "connection limit");
    wanted
}

/// The HTTP proxy's limit refusals, as `kya_limit_refused_<limit>_total`.
fn limit_samples(refusals: Arc<crate::intercept::http::load::LimitRefusals>) -> Source {
    use std::sync::atomic::Ordering::Relaxed;
    Box::new(move || {
        let r = &refusals;
        [
            (
                "headers",
                "Requests refused: more header fields than allowed",
                &r.headers,
            ),
            (
                "slow_headers",
                "Agent connections closed: no complete request headers in time (slow or idle)",
                &r.slow_headers,
            ),
            (
                "no_answer",
                "Requests whose server sent no answer in time (the agent's connection closed)",
                &r.no_answer,
            ),
            (
                "body",
                "Requests refused: body over intercept.max_body",
                &r.body,
            ),
            (
                "slow_body",
                "Requests refused: body not received in time",
                &r.slow_body,
            ),
            (
                "response",
                "Server answers refused: over intercept.max_response_body or not received in time",
                &r.response,
            ),
            (
                "sse_event",
                "Server event streams ended at an event over intercept.max_response_body",
                &r.sse_event,
            ),
            (
                "held_per_conn",
                "Holds denied: too many calls held on one connection",
                &r.held_per_conn,
            ),
            (
                "held_per_process",
                "Holds denied: intercept.max_held_per_process calls held for the process",
                &r.held_per_process,
            ),
        ]
        .into_iter()
        .map(|(name, help, value)| Sample {
            name: format!("limit_refused_{name}"),
            help: help.to_string(),
            kind: SampleKind::Counter,
            value: value.load(Relaxed),
        })
        .collect()
    })
}

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
            c(
                "refused_total_limit",
                "Connections refused: intercept.max_connections were open",
                stats.refused_total_limit.load(Relaxed),
            ),
            c(
                "refused_process_limit",
                "Connections refused: their process had intercept.max_connections_per_process open",
                stats.refused_process_limit.load(Relaxed),
            ),
            c(
                "refused_unrecorded",
                "Connection-limit refusals reset without an audit record (too many being recorded)",
                stats.refused_unrecorded.load(Relaxed),
            ),
            Sample {
                name: "intercept_open_connections".into(),
                help: "Connections the interceptor handles now".into(),
                kind: SampleKind::Gauge,
                value: stats.open.load(Relaxed),
            },
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
    max_pending: usize,
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
    Ok(Approvals::new(max_pending, Some(persist)))
}

/// What the kernel must redirect: the configured selection plus every
/// registered agent's selectors (any match; a process matching a selector but
/// no agent is intercepted as the agent `unregistered`). systemd units are
/// selected through their cgroup; containers through the cgroups their
/// selectors stand for now.
fn redirect_config(
    config: &Config,
    registry: &Registry,
    container_cgroups: &ContainerCgroups,
) -> RedirectConfig {
    let sel = registry.selectors();
    let mut cgroups = config.selection.cgroups.clone();
    cgroups.extend(sel.cgroups);
    cgroups.extend(container_cgroups.all().cloned());
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
    RedirectConfig {
        cgroups,
        uids,
        exes,
        pids: config.selection.pids.clone(),
        ports: config.ports.clone(),
        all_tcp_ports: config.all_ports,
        listen_port: config.listen_port,
        pin_dir: config.pin_dir.clone(),
        fail_open: config.fail_open,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::budget::BudgetState;
    use crate::policy::diag::Source as PolicySource;
    use crate::policy::{AgentInfo, CallContext, Policy};

    #[test]
    fn the_connection_limit_fits_the_open_files_limit() {
        // Two descriptors a connection, 512 kept aside.
        assert_eq!(fit_connections(10_000, 1_048_576), 10_000);
        assert_eq!(fit_connections(10_000, 20_512), 10_000);
        assert_eq!(fit_connections(10_000, 20_511), 9_999);
        assert_eq!(fit_connections(16_384, 1024), 256);
        assert_eq!(fit_connections(16_384, 100), 1);
    }

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
            tool_pin: Default::default(),
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
