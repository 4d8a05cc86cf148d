//! Plaintext HTTP/2 detection: a prior-knowledge h2 client opens with a fixed
//! preface, so the first 24 bytes tell the versions apart. The bytes read are
//! replayed to hyper through [`Prefixed`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::HttpVersion;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream with some already-read bytes put back in front.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Read until the bytes either diverge from the h2 preface or complete it (at most
/// 24 bytes, within `deadline`).
pub(crate) async fn sniff<S: AsyncRead + Unpin>(
    mut io: S,
    deadline: Duration,
) -> io::Result<(HttpVersion, Prefixed<S>)> {
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let read = async {
        let mut chunk = [0u8; 24];
        while buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) {
            let want = H2_PREFACE.len() - buf.len();
            let n = io.read(&mut chunk[..want]).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, io::Error>(())
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request within the deadline"))??;
    let version = if buf == H2_PREFACE {
        HttpVersion::H2
    } else {
        HttpVersion::H1
    };
    Ok((version, Prefixed::new(buf, io)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn detects_h2_and_replays() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(H2_PREFACE).await.unwrap();
        a.write_all(b"rest").await.unwrap();
        let (v, mut p) = sniff(b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(v, HttpVersion::H2);
        let mut got = vec![0u8; 28];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..24], H2_PREFACE);
        assert_eq!(&got[24..], b"rest");
    }

    #[tokio::test]
    async fn h1_after_first_divergent_byte() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        let (v, mut p) = sniff(b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(v, HttpVersion::H1);
        let mut got = vec![0u8; 4];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"POST");
    }

    #[tokio::test]
    async fn a_prefix_of_the_preface_then_eof_is_h1() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"PRI * HT").await.unwrap();
        drop(a);
        let (v, _) = sniff(b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(v, HttpVersion::H1);
    }

    #[tokio::test]
    async fn silence_times_out() {
        let (_a, b) = tokio::io::duplex(64);
        assert!(sniff(b, Duration::from_millis(30)).await.is_err());
    }
}
