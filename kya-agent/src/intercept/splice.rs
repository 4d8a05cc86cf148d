//! Copy bytes both ways between the agent and the upstream, unchanged.

use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes moved in each direction by a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Spliced {
    pub to_upstream: u64,
    pub to_agent: u64,
}

/// The copy buffer each way. Tokio's default (8 KiB) costs a read and a
/// write per 8 KiB: a bulk download through kya then runs at well under half
/// the speed of a direct one. 64 KiB is what a loopback or LAN segment
/// train delivers per read.
const BUFFER: usize = 64 * 1024;

/// Copy until both sides have closed; half-closes are propagated
/// (`copy_bidirectional` shuts down the write side when the read side ends).
pub(crate) async fn splice<A, U>(agent: &mut A, upstream: &mut U) -> std::io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (to_upstream, to_agent) =
        tokio::io::copy_bidirectional_with_sizes(agent, upstream, BUFFER, BUFFER).await?;
    Ok(Spliced {
        to_upstream,
        to_agent,
    })
}
