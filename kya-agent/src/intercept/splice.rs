//! Copy bytes both ways between the agent and the upstream, unchanged.

use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes moved in each direction by a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Spliced {
    pub to_upstream: u64,
    pub to_agent: u64,
}

/// Copy until both sides have closed; half-closes are propagated
/// (`copy_bidirectional` shuts down the write side when the read side ends).
pub(crate) async fn splice<A, U>(agent: &mut A, upstream: &mut U) -> std::io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (to_upstream, to_agent) = tokio::io::copy_bidirectional(agent, upstream).await?;
    Ok(Spliced {
        to_upstream,
        to_agent,
    })
}
