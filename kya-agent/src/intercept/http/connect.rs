//! HTTP `CONNECT` on an intercepted connection: an agent honouring
//! `HTTPS_PROXY` asks the proxy it connected to for a tunnel.
//!
//! kya forwards the request to that proxy (the connection's real destination)
//! and relays its answer. On a 2xx both sides of the tunnel are handed to a
//! [`Tunnels`] follower, which treats the tunnel as a new connection to the
//! CONNECT authority: its bytes are classified and inspected like a direct
//! connection's, never carried unread. Refused (405, audited): CONNECT inside
//! a followed tunnel, over HTTP/2, or where no follower is wired.

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;

use crate::mcp::headers::normalize_host;

use super::body::{self, ProxyBody};
use super::exchange::Exchange;
use super::governor::{BoxFuture, TunnelTarget};

/// Follows a tunnel once the proxy opened it.
pub trait Tunnels: Send + Sync {
    /// The tunnel as a connection of its own, once both sides hand over
    /// their sockets: `agent` is the agent's side, `server` the proxy's,
    /// `target` the CONNECT authority.
    fn follow(
        &self,
        agent: OnUpgrade,
        server: OnUpgrade,
        target: TunnelTarget,
    ) -> BoxFuture<'static, ()>;

    /// Run `task` (a tunnel opening, then followed) beside the HTTP
    /// connection it came from, which hands over its socket and ends; the
    /// implementation keeps it accounted to that connection.
    fn run(&self, task: BoxFuture<'static, ()>);
}

/// Headers forwarded to the proxy and back: the end-to-end ones, without a
/// length (a CONNECT and its answer carry no body kya forwards), and never a
/// proof of decision (only kya writes one, and only to a server).
fn end_to_end(h: &HeaderMap) -> HeaderMap {
    super::exchange::end_to_end(
        h,
        &["content-length", crate::credential::header::HEADER_NAME],
    )
}

/// A `host[:port]` header value: the host normalized, the port if written.
fn host_and_port(h: &str) -> Option<(String, Option<u16>)> {
    let host = normalize_host(h).ok()?;
    let t = h.trim();
    let port = match t.strip_prefix('[') {
        Some(rest) => rest.split_once("]:").map(|(_, p)| p),
        None => t
            .rsplit_once(':')
            .filter(|(n, _)| !n.contains(':'))
            .map(|(_, p)| p),
    };
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    Some((host, port))
}

/// The CONNECT authority (`host:port`, the port required and not 0). A
/// `Host` header, when present, must name the same host (and port, if it
/// names one).
pub(crate) fn target_of<B>(req: &Request<B>) -> Result<TunnelTarget, String> {
    let uri = req.uri();
    let authority = match (uri.scheme(), uri.authority(), uri.path_and_query()) {
        (None, Some(a), None) => a,
        (None, Some(a), Some(pq)) if pq.as_str().is_empty() || pq.as_str() == "/" => a,
        _ => return Err(format!("CONNECT target {uri} is not host:port")),
    };
    let port = match authority.port_u16() {
        Some(p) if p != 0 => p,
        _ => return Err(format!("CONNECT target {authority} has no usable port")),
    };
    let host = normalize_host(authority.as_str())
        .map_err(|e| format!("CONNECT target {authority}: {e}"))?;
    let target = TunnelTarget { host, port };
    let hosts: Vec<_> = req.headers().get_all(header::HOST).iter().collect();
    let agrees = match hosts.as_slice() {
        [] => true,
        [h] => h
            .to_str()
            .ok()
            .and_then(host_and_port)
            .is_some_and(|(host, p)| host == target.host && p.is_none_or(|p| p == target.port)),
        _ => false,
    };
    if !agrees {
        return Err(format!("CONNECT Host header does not name {target}"));
    }
    Ok(target)
}

/// Answer one `CONNECT` on `ex`'s connection.
pub(super) async fn connect(ex: &Exchange, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let v = req.version();
    let conn = &ex.conn;
    if let Some(outer) = &conn.tunnel {
        return ex.refuse_http(
            StatusCode::METHOD_NOT_ALLOWED,
            v,
            &format!("CONNECT inside the CONNECT tunnel to {outer}: nested tunnels are refused"),
        );
    }
    let Some(tunnels) = ex.tunnels.clone() else {
        return ex.refuse_http(
            StatusCode::METHOD_NOT_ALLOWED,
            v,
            "CONNECT tunnels are not followed on this connection: the tunnel's traffic could not be inspected",
        );
    };
    if v != Version::HTTP_11 || ex.upstream.is_h2() {
        return ex.refuse_http(
            StatusCode::METHOD_NOT_ALLOWED,
            v,
            "CONNECT is followed over HTTP/1.1 only",
        );
    }
    let target = match target_of(&req) {
        Ok(t) => t,
        Err(reason) => return ex.refuse_http(StatusCode::BAD_REQUEST, v, &reason),
    };
    if !req.body().is_end_stream() {
        return ex.refuse_http(
            StatusCode::BAD_REQUEST,
            v,
            "CONNECT with a request body: bytes before the tunnel could not be judged",
        );
    }
    let agent_side = hyper::upgrade::on(&mut req);
    let mut forward = Request::new(body::empty());
    *forward.method_mut() = Method::CONNECT;
    *forward.uri_mut() = req.uri().clone();
    *forward.version_mut() = Version::HTTP_11;
    *forward.headers_mut() = end_to_end(req.headers());
    let mut answer = match ex.upstream.send(forward).await {
        Ok(r) => r,
        Err(e) => {
            return ex.refuse_http(
                StatusCode::BAD_GATEWAY,
                v,
                &format!(
                    "CONNECT {target} through the proxy {} failed: {e}",
                    conn.dst
                ),
            )
        }
    };
    let status = answer.status();
    let headers = end_to_end(answer.headers());
    if !status.is_success() {
        tracing::info!(conn = conn.conn_id, proxy = %conn.dst, %target, %status, "the proxy did not open the tunnel");
        let raw = match body::read_bounded(
            answer.into_body(),
            ex.limits.max_body,
            ex.limits.body_timeout,
        )
        .await
        {
            Ok(b) => b,
            Err(e) => {
                return ex.refuse_http(
                    StatusCode::BAD_GATEWAY,
                    v,
                    &format!("the proxy's answer to CONNECT {target} is unreadable: {e}"),
                )
            }
        };
        let mut r = Response::new(body::full(raw));
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        return r;
    }
    let server_side = hyper::upgrade::on(&mut answer);
    tracing::info!(conn = conn.conn_id, pid = conn.process.pid, proxy = %conn.dst, %target, "following a CONNECT tunnel");
    tunnels.run(tunnels.follow(agent_side, server_side, target));
    let mut r = Response::new(body::empty());
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, host: &[&str]) -> Request<()> {
        let mut b = Request::builder().method(Method::CONNECT).uri(target);
        for h in host {
            b = b.header("host", *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_target_is_the_authority_and_host_must_agree() {
        let t = target_of(&req("MCP.Example.com.:8443", &["mcp.example.com:8443"])).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("mcp.example.com", 8443));
        assert_eq!(t.to_string(), "mcp.example.com:8443");
        let t = target_of(&req("[::1]:443", &[])).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 443));
        assert_eq!(t.to_string(), "[::1]:443");
        assert!(target_of(&req("127.0.0.1:443", &["127.0.0.1"])).is_ok());
        for (bad, host) in [
            ("mcp.example.com:0", &[][..]),
            ("mcp.example.com:8443", &["evil.example.com:8443"][..]),
            ("mcp.example.com:8443", &["mcp.example.com:443"][..]),
            (
                "mcp.example.com:8443",
                &["mcp.example.com:8443", "mcp.example.com:8443"][..],
            ),
            ("mcp.example.com:8443", &["mcp.example.com:x"][..]),
            ("http://mcp.example.com:8443/", &[][..]),
            ("/mcp", &[][..]),
        ] {
            assert!(target_of(&req(bad, host)).is_err(), "{bad} {host:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut h = HeaderMap::new();
        h.insert("proxy-authorization", "Basic eDp5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("connection", "x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("content-length", "5".parse().unwrap());
        h.insert("kya-decision", "forged".parse().unwrap());
        let out = end_to_end(&h);
        assert!(out.contains_key("proxy-authorization"));
        for gone in [
            "proxy-connection",
            "connection",
            "x-secret",
            "content-length",
            "kya-decision",
        ] {
            assert!(!out.contains_key(gone), "{gone}");
        }
    }
}
