//! Connecting to the original destination.
//!
//! The interceptor's own sockets must never be redirected back to itself, even
//! when the daemon runs inside a selected cgroup: each upstream socket carries
//! `SO_MARK` = [`kya_common::maps::KYA_SKIP_MARK`], which the kernel programs skip.

use crate::netns::Namespace;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};

/// How long to wait for the original destination to accept.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors connecting upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("cannot create socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot mark socket (SO_MARK needs CAP_NET_ADMIN): {0}")]
    Mark(std::io::Error),
    #[error("connect to {dst} failed: {source}")]
    Connect {
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
}

/// Connect to `dst` from network namespace `netns` (`None`: the host's),
/// with its routes and addresses, as the agent there would have.
pub(crate) async fn connect_from(
    dst: SocketAddr,
    netns: Option<&Namespace>,
) -> Result<TcpStream, UpstreamError> {
    let socket = match netns {
        None if dst.is_ipv4() => TcpSocket::new_v4(),
        None => TcpSocket::new_v6(),
        Some(ns) => ns
            .socket(dst.is_ipv6())
            .await
            .map(|fd| TcpSocket::from_std_stream(std::net::TcpStream::from(fd))),
    }
    .map_err(UpstreamError::Socket)?;
    crate::bpf::mark_socket(&socket).map_err(UpstreamError::Mark)?;
    socket.set_nodelay(true).map_err(UpstreamError::Socket)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(UpstreamError::Connect { dst, source }),
        Err(_) => Err(UpstreamError::Timeout(dst)),
    }
}
