//! The bounds and settings of the HTTP proxy.

use std::sync::Arc;
use std::time::Duration;

use super::load::{HeldByProcess, LimitRefusals};

use crate::config::DenyShape;
use crate::mcp::json::JsonLimits;
use crate::mcp::sse::SseLimits;

/// Every bound the proxy enforces, plus the denial shape.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (after decoding), in bytes (`intercept.max_body`).
    pub max_body: u64,
    /// Largest inspected response body, raw and after decoding, in bytes
    /// (`intercept.max_response_body`). A response over it is answered with a
    /// JSON-RPC error for each request it answers, and audited.
    pub max_response_body: u64,
    /// Time allowed to receive a whole request body (slow-drip bodies get 408).
    pub body_timeout: Duration,
    /// Most header fields on a request (hyper enforces it on HTTP/1.1 too).
    pub max_headers: usize,
    /// Largest total header size in bytes (HTTP/2 header list, HTTP/1.1 read buffer).
    pub max_header_bytes: usize,
    /// Most HTTP/2 streams an agent may have open at once on one connection
    /// (advertised; a stream past it is reset with `REFUSED_STREAM`).
    pub max_h2_streams: u32,
    /// How denials are shown to the agent.
    pub deny_shape: DenyShape,
    /// Largest single SSE event in bytes.
    pub max_sse_event: usize,
    /// Most calls held for approval at once on one connection.
    pub max_held_per_conn: usize,
    /// Most calls held for approval at once for one process, across its
    /// connections (`intercept.max_held_per_process`).
    pub max_held_per_process: usize,
    /// How often a held call with a progress token gets `notifications/progress`.
    pub progress_interval: Duration,
    /// Most messages in one JSON-RPC batch.
    pub max_batch: usize,
    /// Deepest JSON nesting.
    pub max_json_depth: usize,
    /// Time allowed for the server's answer head, and then for its whole
    /// JSON body (`intercept.response_timeout`).
    pub response_timeout: Duration,
    /// Calls held per process now, shared by every connection served
    /// under these limits.
    pub held_by_process: Arc<HeldByProcess>,
    /// How often each limit refused something, shared the same way.
    pub refusals: Arc<LimitRefusals>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: crate::config::DEFAULT_MAX_BODY,
            max_response_body: crate::config::DEFAULT_MAX_RESPONSE_BODY,
            body_timeout: Duration::from_secs(30),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_h2_streams: 100,
            deny_shape: DenyShape::ToolError,
            max_sse_event: usize::try_from(crate::config::DEFAULT_MAX_RESPONSE_BODY)
                .unwrap_or(usize::MAX),
            max_held_per_conn: 16,
            max_held_per_process: crate::config::DEFAULT_MAX_HELD_PER_PROCESS,
            progress_interval: Duration::from_secs(5),
            max_batch: 64,
            max_json_depth: 64,
            response_timeout: crate::config::DEFAULT_RESPONSE_TIMEOUT,
            held_by_process: Arc::default(),
            refusals: Arc::default(),
        }
    }
}

impl Limits {
    /// The defaults with the configured `intercept.max_body`,
    /// `max_response_body` (also the largest SSE event), `deny_shape`,
    /// `max_held_per_process` and `response_timeout`.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            max_body: cfg.max_body,
            max_response_body: cfg.max_response_body,
            max_sse_event: usize::try_from(cfg.max_response_body).unwrap_or(usize::MAX),
            deny_shape: cfg.deny_shape,
            max_held_per_process: cfg.max_held_per_process,
            response_timeout: cfg.response_timeout,
            ..Self::default()
        }
    }

    /// The strict JSON parser's bounds.
    pub fn json(&self) -> JsonLimits {
        JsonLimits {
            max_bytes: usize::try_from(self.max_body).unwrap_or(usize::MAX),
            max_depth: self.max_json_depth,
        }
    }

    /// The strict JSON parser's bounds for what the server sends.
    pub fn response_json(&self) -> JsonLimits {
        JsonLimits {
            max_bytes: usize::try_from(self.max_response_body).unwrap_or(usize::MAX),
            max_depth: self.max_json_depth,
        }
    }

    /// The SSE parser's bounds.
    pub fn sse(&self) -> SseLimits {
        SseLimits {
            max_event_bytes: self.max_sse_event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_file, Config};

    #[test]
    fn config_sets_body_limit_and_shape() {
        let file = parse_file(
            std::path::Path::new("k.toml"),
            "[intercept]\nmax_body = \"1KiB\"\nmax_response_body = \"2KiB\"\ndeny_shape = \"jsonrpc_error\"\nresponse_timeout = \"90s\"\n",
        )
        .unwrap();
        let cfg = Config::merge(file, &Default::default()).unwrap();
        let l = Limits::from_config(&cfg);
        assert_eq!(l.max_body, 1024);
        assert_eq!(l.deny_shape, DenyShape::JsonrpcError);
        assert_eq!(l.json().max_bytes, 1024);
        assert_eq!(l.max_response_body, 2048);
        assert_eq!(l.response_json().max_bytes, 2048);
        assert_eq!(l.max_sse_event, 2048);
        assert_eq!(l.response_timeout, Duration::from_secs(90));
        assert_eq!(l.max_batch, Limits::default().max_batch);
        // Real tool results are large: responses get at least 64 MiB by default.
        assert!(Limits::default().max_response_body >= 64 << 20);
        assert!(Limits::default().max_sse_event >= 64 << 20);
    }

    #[test]
    fn bad_response_limits_are_config_errors() {
        for bad in ["\"lots\"", "\"-1MiB\"", "\"1XB\"", "[1]", "\"\""] {
            let text = format!("[intercept]\nmax_response_body = {bad}\n");
            let parsed = parse_file(std::path::Path::new("k.toml"), &text)
                .map_err(|e| e.to_string())
                .and_then(|f| Config::merge(f, &Default::default()).map_err(|e| e.to_string()));
            assert!(parsed.is_err(), "{bad}");
        }
    }
}
