//! Prometheus metrics (`kya run --metrics ADDR`, served at `/metrics` in the
//! Prometheus text format).
//!
//! Event-driven values (decisions, approvals, audit writes, reloads) are
//! recorded by the components as they happen; values that live elsewhere
//! (the kernel's per-CPU counters, the interceptor's atomics) are read at
//! scrape time through [`Metrics::add_source`].

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Labels of `kya_decisions_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub verdict: String,
    pub agent: String,
    /// The deciding rule id, or `default`.
    pub rule: String,
}

/// Labels of `kya_approvals_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApprovalLabels {
    pub channel: String,
    /// approved | denied | expired | cancelled
    pub outcome: String,
}

/// Labels of `kya_policy_reloads_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// ok | rejected
    pub result: String,
}

/// Kind of a scrape-time sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    Counter,
    Gauge,
}

/// One value read at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name without the `kya_` prefix (and without `_total` for counters).
    pub name: String,
    pub help: String,
    pub kind: SampleKind,
    pub value: u64,
}

/// Produces samples at scrape time.
pub type Source = Box<dyn Fn() -> Vec<Sample> + Send + Sync>;

/// Every metric kya exports.
pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    /// Seconds from a request's arrival to its verdict (holds: to the hold).
    pub decision_latency: Histogram,
    pub held: Gauge,
    pub approvals: Family<ApprovalLabels, Counter>,
    /// Seconds an audit append took to be durable.
    pub audit_write_latency: Histogram,
    pub audit_write_failures: Counter,
    pub policy_reloads: Family<ReloadLabels, Counter>,
    sources: Arc<Mutex<Vec<Source>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Sources(Arc<Mutex<Vec<Source>>>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sources")
    }
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for source in sources.iter() {
            for s in source() {
                match s.kind {
                    SampleKind::Counter => {
                        let c = ConstCounter::new(s.value);
                        let m =
                            encoder.encode_descriptor(&s.name, &s.help, None, c.metric_type())?;
                        c.encode(m)?;
                    }
                    SampleKind::Gauge => {
                        let g = ConstGauge::new(i64::try_from(s.value).unwrap_or(i64::MAX));
                        let m =
                            encoder.encode_descriptor(&s.name, &s.help, None, g.metric_type())?;
                        g.encode(m)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("kya");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Tool-call decisions by verdict, agent and deciding rule",
            decisions.clone(),
        );
        // 50 µs .. ~13 s: from an in-memory allow to a human's approval.
        let decision_latency = Histogram::new(exponential_buckets(0.00005, 4.0, 10));
        registry.register(
            "decision_latency_seconds",
            "Time from request to verdict",
            decision_latency.clone(),
        );
        let held = Gauge::default();
        registry.register(
            "held_calls",
            "Calls currently held for approval",
            held.clone(),
        );
        let approvals = Family::<ApprovalLabels, Counter>::default();
        registry.register(
            "approvals",
            "Approval outcomes by channel",
            approvals.clone(),
        );
        let audit_write_latency = Histogram::new(exponential_buckets(0.00005, 2.0, 14));
        registry.register(
            "audit_write_latency_seconds",
            "Time for an audit record to become durable",
            audit_write_latency.clone(),
        );
        let audit_write_failures = Counter::default();
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written",
            audit_write_failures.clone(),
        );
        let policy_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads by result",
            policy_reloads.clone(),
        );
        let sources = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(Sources(sources.clone())));
        Arc::new(Self {
            registry,
            decisions,
            decision_latency,
            held,
            approvals,
            audit_write_latency,
            audit_write_failures,
            policy_reloads,
            sources,
        })
    }

    /// Add values read at scrape time.
    pub fn add_source(&self, source: Source) {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(source);
    }

    /// The exposition, Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Errors serving metrics.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct ServeError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Serve `GET /metrics` on `addr` until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ServeError> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    tracing::info!(%addr, "serving metrics at /metrics");
    if !addr.ip().is_loopback() {
        // Only what --metrics names is bound; off unless asked for.
        tracing::warn!(%addr, "the metrics endpoint is reachable beyond this host (no authentication): bind a loopback address unless a scraper elsewhere needs it");
    }
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let resp = if req.method() == hyper::Method::GET
                            && req.uri().path() == "/metrics"
                        {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(metrics.render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(
                                    b"not found; metrics are at /metrics\n",
                                )))
                        };
                        resp.map_err(std::io::Error::other)
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_recorded_and_scrape_time_values() {
        let m = Metrics::new();
        m.decisions
            .get_or_create(&DecisionLabels {
                verdict: "deny".into(),
                agent: "bot".into(),
                rule: "no-delete".into(),
            })
            .inc();
        m.held.set(2);
        m.decision_latency.observe(0.0002);
        m.add_source(Box::new(|| {
            vec![Sample {
                name: "kernel_redirected".into(),
                help: "redirected".into(),
                kind: SampleKind::Counter,
                value: 7,
            }]
        }));
        let text = m.render();
        assert!(
            text.contains(r#"kya_decisions_total{verdict="deny",agent="bot",rule="no-delete"} 1"#),
            "{text}"
        );
        assert!(text.contains("kya_held_calls 2"), "{text}");
        assert!(text.contains("kya_kernel_redirected_total 7"), "{text}");
        assert!(
            text.contains("kya_decision_latency_seconds_count 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn serves_metrics_over_http_and_404s_elsewhere() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let m = Metrics::new();
        m.held.set(3);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve(addr, m, rx));
        let get = |path: &'static str| async move {
            for _ in 0..50 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    s.write_all(
                        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                            .as_bytes(),
                    )
                    .await
                    .unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    return out;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("metrics server did not come up");
        };
        let body = get("/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("kya_held_calls 3"));
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        tx.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
}
