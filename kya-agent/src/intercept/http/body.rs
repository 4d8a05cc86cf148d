//! Bodies: the one body type the proxy hands to hyper, and bounded reading of the
//! agent's and the server's bodies.
//!
//! Every body kya inspects is read whole before anything is decided, so reading is
//! bounded in size (an oversize body is refused, not truncated) and, for agent
//! bodies, in time: a body dripped a byte at a time would otherwise pin a task and
//! a held connection forever.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::mpsc;

/// A body error: whatever failed below (hyper, a closed channel).
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the proxy produces.
pub(crate) type ProxyBody = BoxBody<Bytes, BodyError>;

/// A complete body.
pub(crate) fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// No body.
pub(crate) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The agent's or server's body passed through unchanged, streaming.
pub(crate) fn stream(incoming: Incoming) -> ProxyBody {
    incoming.map_err(|e| Box::new(e) as BodyError).boxed()
}

/// A body fed by a task: the proxy writes SSE events (inspected, injected, progress)
/// into the sender. When the client goes away hyper drops the body, the receiver
/// closes, and the writer sees [`BodyTx::closed`]: that is how a hold learns of a
/// disconnect.
pub(crate) fn channel(capacity: usize) -> (BodyTx, ProxyBody) {
    let (tx, rx) = mpsc::channel(capacity);
    (BodyTx(tx), ChannelBody { rx, ended: false }.boxed())
}

/// One piece of a channel body; `last`: the body ends with it.
struct Piece {
    data: Bytes,
    last: bool,
}

/// The writing end of a [`channel`] body.
#[derive(Clone)]
pub(crate) struct BodyTx(mpsc::Sender<Piece>);

impl BodyTx {
    /// Queue `data`; false when the agent has gone.
    pub(crate) async fn send(&self, data: Bytes) -> bool {
        self.0.send(Piece { data, last: false }).await.is_ok()
    }

    /// Queue `data` as the body's last piece: the agent gets it and the end
    /// of the response in one write, as a server's last event and end sent
    /// together arrive directly (a client that has read the answer it waited
    /// for may drop a connection whose end is still to come, and lose it
    /// for its next request).
    pub(crate) async fn finish(self, data: Bytes) -> bool {
        self.0.send(Piece { data, last: true }).await.is_ok()
    }

    /// Resolves when the agent has gone (the body was dropped).
    pub(crate) async fn closed(&self) {
        self.0.closed().await;
    }
}

struct ChannelBody {
    rx: mpsc::Receiver<Piece>,
    /// The last piece was handed to hyper.
    ended: bool,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    /// One frame of everything queued: pieces written together go out in one
    /// write.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let first = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(p)) => p,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if first.last {
            self.ended = true;
            return Poll::Ready(Some(Ok(Frame::data(first.data))));
        }
        let Ok(more) = self.rx.try_recv() else {
            return Poll::Ready(Some(Ok(Frame::data(first.data))));
        };
        let mut joined = BytesMut::from(&first.data[..]);
        joined.extend_from_slice(&more.data);
        let mut last = more.last;
        while !last {
            let Ok(more) = self.rx.try_recv() else {
                break;
            };
            joined.extend_from_slice(&more.data);
            last = more.last;
        }
        self.ended = last;
        Poll::Ready(Some(Ok(Frame::data(joined.freeze()))))
    }

    /// Ended once the last piece was handed over, or the writer is gone and
    /// nothing is left: hyper then ends the response in the same write as
    /// the last frame.
    fn is_end_stream(&self) -> bool {
        self.ended || (self.rx.is_closed() && self.rx.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Why a body was not read whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("body not received within {0:?}")]
    TimedOut(Duration),
    #[error("body read failed: {0}")]
    Transport(BodyError),
}

/// Read a whole body of at most `limit` bytes within `deadline`.
pub(crate) async fn read_bounded<B>(
    body: B,
    limit: u64,
    deadline: Duration,
) -> Result<Bytes, ReadError>
where
    B: Body + Unpin,
    B::Data: bytes::Buf,
    B::Error: Into<BodyError>,
{
    // A declared length over the limit is refused before a byte is read.
    if body.size_hint().lower() > limit {
        return Err(ReadError::TooLarge(limit));
    }
    match tokio::time::timeout(deadline, read_all(body, limit)).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::TimedOut(deadline)),
    }
}

async fn read_all<B>(mut body: B, limit: u64) -> Result<Bytes, ReadError>
where
    B: Body + Unpin,
    B::Data: bytes::Buf,
    B::Error: Into<BodyError>,
{
    use bytes::Buf;
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Transport(e.into()))?;
        if let Ok(mut data) = frame.into_data() {
            if out.len() as u64 + data.remaining() as u64 > limit {
                return Err(ReadError::TooLarge(limit));
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                out.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_within_limit() {
        let b = Full::new(Bytes::from_static(b"hello"));
        let got = read_bounded(b, 5, Duration::from_secs(1)).await.unwrap();
        assert_eq!(&got[..], b"hello");
    }

    #[tokio::test]
    async fn refuses_oversize() {
        let b = Full::new(Bytes::from_static(b"hello!"));
        assert!(matches!(
            read_bounded(b, 5, Duration::from_secs(1)).await,
            Err(ReadError::TooLarge(5))
        ));
    }

    #[tokio::test]
    async fn refuses_a_slow_body() {
        let (tx, body) = channel(1);
        assert!(tx.send(Bytes::from_static(b"{")).await);
        // The sender stays open and never finishes the body.
        let r = read_bounded(body, 100, Duration::from_millis(50)).await;
        assert!(matches!(r, Err(ReadError::TimedOut(_))));
        drop(tx);
    }

    /// Pieces queued together come out as one frame, and a body whose writer
    /// is gone with nothing left says it has ended, so hyper writes the last
    /// frame and the end of the response together.
    #[tokio::test]
    async fn a_channel_body_joins_what_is_queued_and_knows_its_end() {
        let (tx, mut body) = channel(8);
        assert!(!body.is_end_stream());
        assert!(tx.send(Bytes::from_static(b"event: a\n\n")).await);
        assert!(tx.send(Bytes::from_static(b"event: b\n\n")).await);
        drop(tx);
        assert!(!body.is_end_stream(), "two pieces still queued");
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "event: a\n\nevent: b\n\n");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
        // An open writer with nothing queued: not ended.
        let (tx, body) = channel(1);
        assert!(!body.is_end_stream());
        drop(tx);
        assert!(body.is_end_stream());
    }

    /// A piece sent as the last one ends the body with it, whether or not the
    /// writer is still there (and what a clone sends after it is not read).
    #[tokio::test]
    async fn the_last_piece_ends_the_body_at_once() {
        let (tx, mut body) = channel(8);
        let other = tx.clone();
        assert!(tx.send(Bytes::from_static(b"event: a\n\n")).await);
        assert!(tx.finish(Bytes::from_static(b"event: b\n\n")).await);
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "event: a\n\nevent: b\n\n");
        assert!(
            body.is_end_stream(),
            "ended with the last piece, a writer still open"
        );
        let _ = other.send(Bytes::from_static(b"event: late\n\n")).await;
        assert!(body.frame().await.is_none());
    }
}
