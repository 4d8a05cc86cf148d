//! The first bytes of an intercepted connection: what protocol is this, and
//! for TLS, which name and application protocols does the agent ask for.
//!
//! Two steps, because they serve different decisions:
//! 1. [`classify`] / [`peek_classify`] look at *peeked* bytes (nothing is
//!    consumed), so a connection that is neither TLS nor HTTP can still be
//!    spliced to its destination byte for byte.
//! 2. [`read_client_hello`] reads (consumes) the ClientHello and parses it with
//!    rustls' own `Acceptor`, so what kya believes the SNI/ALPN to be is exactly
//!    what the TLS stack that terminates the connection will act on. The bytes
//!    read are kept ([`PeekedHello::raw`]) so a passthrough connection can
//!    replay them upstream unchanged.

use rustls::server::{Accepted, Acceptor};
use std::io;
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ca::{LeafName, LeafNameError};

/// What the first bytes of a connection look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// A TLS handshake record carrying a ClientHello.
    Tls,
    /// An HTTP/1.x request line, or the HTTP/2 prior-knowledge preface (`PRI `).
    Http,
    /// Anything else: splice it, never guess.
    Other,
    /// Too few bytes to tell yet (all of them are a prefix of TLS or HTTP).
    NeedMore,
}

/// Request methods recognised as plaintext HTTP (RFC 9110 plus PATCH and the
/// h2 preface). Case-sensitive, followed by a space, as on the wire.
const HTTP_METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI ",
];

/// Bytes needed to recognise a TLS ClientHello record header plus message type.
const TLS_SIGNATURE_LEN: usize = 6;
/// Largest TLS record body (2^14) plus the expansion TLS 1.2 permits.
const MAX_TLS_RECORD: usize = 16384 + 2048;

/// Classify peeked bytes. Pure: no I/O, never panics, decides from at most
/// the first 8 bytes.
pub fn classify(first: &[u8]) -> FirstBytes {
    if first.is_empty() {
        return FirstBytes::NeedMore;
    }
    if first[0] == 0x16 {
        return classify_tls(first);
    }
    let mut could_be_http = false;
    for method in HTTP_METHODS {
        let n = first.len().min(method.len());
        if first[..n] == method[..n] {
            if first.len() >= method.len() {
                return FirstBytes::Http;
            }
            could_be_http = true;
        }
    }
    if could_be_http {
        FirstBytes::NeedMore
    } else {
        FirstBytes::Other
    }
}

/// `16 03 0x LL LL 01`: handshake record, SSL3/TLS1.x record version, a
/// non-empty record no longer than TLS allows, and the first handshake message
/// is a ClientHello.
fn classify_tls(first: &[u8]) -> FirstBytes {
    // Each check may look only at bytes 0..=i; a short prefix that passes all
    // checks so far needs more bytes.
    for i in 0..TLS_SIGNATURE_LEN {
        let Some(&byte) = first.get(i) else {
            return FirstBytes::NeedMore;
        };
        let ok = match i {
            0 => byte == 0x16,
            1 => byte == 0x03,
            2 => byte <= 0x04,
            3 => true,
            4 => {
                let len = usize::from(u16::from_be_bytes([first[3], byte]));
                // A ClientHello may be cut into records of any size down
                // to one byte (legal, and every server reassembles it).
                (1..=MAX_TLS_RECORD).contains(&len)
            }
            _ => byte == 0x01,
        };
        if !ok {
            return FirstBytes::Other;
        }
    }
    FirstBytes::Tls
}

/// Why the first bytes could not be classified.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("peeking the first bytes: {0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection before sending anything")]
    Closed,
    /// No decision within the timeout. A server-speaks-first protocol (SMTP,
    /// SSH) looks like this: the caller decides (usually: splice).
    #[error("no recognisable first bytes within {timeout:?} ({peeked} bytes seen)")]
    Timeout { timeout: Duration, peeked: usize },
}

/// Peek (without consuming) until [`classify`] decides or `timeout` passes.
/// A client that sends a partial prefix and stalls is retried with a short
/// backoff instead of spinning (`peek` returns at once while data is queued).
pub async fn peek_classify(stream: &TcpStream, timeout: Duration) -> Result<FirstBytes, PeekError> {
    let mut buf = [0u8; 16];
    let mut last_len = 0usize;
    let work = async {
        let mut backoff = Duration::from_millis(1);
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(PeekError::Closed);
            }
            match classify(&buf[..n]) {
                FirstBytes::NeedMore => {
                    if n == last_len {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(50));
                    }
                    last_len = n;
                }
                decided => return Ok(decided),
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(PeekError::Timeout {
            timeout,
            peeked: last_len,
        }),
    }
}

/// Bounds on reading a ClientHello (a slow-drip or endless one must not pin a task).
#[derive(Debug, Clone, Copy)]
pub struct HelloLimits {
    /// Most bytes read before giving up (rustls itself caps a handshake message at 64 KiB).
    pub max_bytes: usize,
    /// Time allowed for the whole ClientHello to arrive.
    pub timeout: Duration,
}

impl Default for HelloLimits {
    fn default() -> Self {
        HelloLimits {
            max_bytes: 64 * 1024 + 2 * 1024,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the agent asked for in its ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The SNI (a DNS name, as validated by rustls), if sent.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order (empty: no ALPN extension).
    pub alpn: Vec<Vec<u8>>,
}

impl ClientHelloInfo {
    /// The name to mint a leaf for: the SNI, or else the original destination's IP.
    pub fn leaf_name(&self, original_ip: IpAddr) -> Result<LeafName, LeafNameError> {
        match &self.sni {
            Some(sni) => LeafName::parse(sni),
            None => Ok(LeafName::Ip(original_ip)),
        }
    }
}

/// A ClientHello read off the connection, ready to be terminated (by the
/// terminator, `terminate.rs`) or replayed for a splice ([`PeekedHello::raw`]).
pub struct PeekedHello {
    pub info: ClientHelloInfo,
    pub(crate) accepted: Accepted,
    raw: Vec<u8>,
}

impl std::fmt::Debug for PeekedHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeekedHello")
            .field("info", &self.info)
            .field("raw_len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

impl PeekedHello {
    /// Every byte read from the client so far, to write to the real
    /// destination first when the connection is spliced instead of terminated.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Give up terminating: keep only the bytes to replay.
    pub fn into_raw(self) -> Vec<u8> {
        self.raw
    }
}

/// Why no ClientHello could be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientHelloError {
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection after {read} bytes, before a complete ClientHello")]
    Closed { read: usize },
    #[error("no complete ClientHello within {timeout:?} ({read} bytes read)")]
    Timeout { timeout: Duration, read: usize },
    #[error("ClientHello larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// Not TLS, or TLS rustls refuses (the client was sent an alert).
    #[error("not an acceptable TLS ClientHello: {0}")]
    Tls(rustls::Error),
}

/// Read the ClientHello from `stream` and parse it with rustls' `Acceptor`.
/// On a malformed hello the client gets a TLS alert and the error is returned;
/// nothing here panics on any input.
pub async fn read_client_hello<S>(
    stream: &mut S,
    limits: HelloLimits,
) -> Result<PeekedHello, ClientHelloError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut acceptor = Acceptor::default();
    let mut raw: Vec<u8> = Vec::new();
    let work = async {
        let mut chunk = vec![0u8; 4096];
        loop {
            let room = limits.max_bytes.saturating_sub(raw.len());
            if room == 0 {
                return Err(ClientHelloError::TooLarge {
                    limit: limits.max_bytes,
                });
            }
            let want = room.min(chunk.len());
            let n = stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(ClientHelloError::Closed { read: raw.len() });
            }
            raw.extend_from_slice(&chunk[..n]);
            let mut slice = &chunk[..n];
            while !slice.is_empty() {
                let before = slice.len();
                // rustls refuses more than one maximal handshake message
                // ("message buffer full"): the hello is too big.
                acceptor.read_tls(&mut slice).map_err(|e| {
                    if e.kind() == io::ErrorKind::InvalidData {
                        ClientHelloError::TooLarge {
                            limit: limits.max_bytes,
                        }
                    } else {
                        ClientHelloError::Io(e)
                    }
                })?;
                if slice.len() == before {
                    // The acceptor's buffer is full: the hello is too big for rustls.
                    return Err(ClientHelloError::TooLarge {
                        limit: limits.max_bytes,
                    });
                }
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => return Ok(accepted),
                Ok(None) => continue,
                Err((err, mut alert)) => {
                    let mut out = Vec::new();
                    let _ = alert.write_all(&mut out);
                    let _ = stream.write_all(&out).await;
                    let _ = stream.flush().await;
                    return Err(ClientHelloError::Tls(err));
                }
            }
        }
    };
    let accepted = match tokio::time::timeout(limits.timeout, work).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(ClientHelloError::Timeout {
                timeout: limits.timeout,
                read: raw.len(),
            })
        }
    };
    let hello = accepted.client_hello();
    let info = ClientHelloInfo {
        sni: hello.server_name().map(str::to_owned),
        alpn: hello
            .alpn()
            .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
            .unwrap_or_default(),
    };
    Ok(PeekedHello {
        info,
        accepted,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_tls_http_and_other() {
        // A ClientHello cut into one-byte records is still TLS.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x01, 0x01]),
            FirstBytes::Tls
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0xaa]),
            FirstBytes::Tls
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x03, 0x00, 0x40, 0x01]),
            FirstBytes::Tls
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), FirstBytes::Http);
        assert_eq!(classify(b"POST /mcp HTTP/1.1\r\n"), FirstBytes::Http);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            FirstBytes::Http
        );
        assert_eq!(classify(b"OPTIONS "), FirstBytes::Http);
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n"), FirstBytes::Other);
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), FirstBytes::Other);
        assert_eq!(classify(b"GETX / HTTP/1.1"), FirstBytes::Other);
        assert_eq!(classify(b"\x00\x00\x00\x00"), FirstBytes::Other);
        assert_eq!(classify(&[0xff; 64]), FirstBytes::Other);
    }

    #[test]
    fn prefixes_need_more_and_near_misses_are_other() {
        assert_eq!(classify(b""), FirstBytes::NeedMore);
        assert_eq!(classify(b"G"), FirstBytes::NeedMore);
        assert_eq!(classify(b"GET"), FirstBytes::NeedMore);
        assert_eq!(classify(b"P"), FirstBytes::NeedMore);
        assert_eq!(classify(b"PR"), FirstBytes::NeedMore);
        assert_eq!(classify(&[0x16]), FirstBytes::NeedMore);
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x10]),
            FirstBytes::NeedMore
        );
        // SSLv2-compatible hello, wrong record version, zero/huge lengths, not a ClientHello.
        assert_eq!(classify(&[0x80, 0x2e, 0x01, 0x03, 0x01]), FirstBytes::Other);
        assert_eq!(
            classify(&[0x16, 0x02, 0x00, 0x00, 0x10, 0x01]),
            FirstBytes::Other
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x05, 0x00, 0x10, 0x01]),
            FirstBytes::Other
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x00, 0x01]),
            FirstBytes::Other
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0xff, 0xff, 0x01]),
            FirstBytes::Other
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x10, 0x02]),
            FirstBytes::Other
        );
        // A TLS application-data record is not the start of a connection.
        assert_eq!(
            classify(&[0x17, 0x03, 0x03, 0x00, 0x10, 0x01]),
            FirstBytes::Other
        );
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics_and_is_stable_under_extension(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            extra in proptest::collection::vec(proptest::num::u8::ANY, 0..8),
        ) {
            let first = classify(&bytes);
            if first != FirstBytes::NeedMore {
                let mut longer = bytes.clone();
                longer.extend_from_slice(&extra);
                proptest::prop_assert_eq!(classify(&longer), first);
            }
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn peek_does_not_consume_and_waits_for_a_dripped_prefix() {
        let (mut client, server) = pair().await;
        client.write_all(b"PO").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.write_all(b"ST /x HTTP/1.1\r\n").await.unwrap();
            client
        });
        let kind = peek_classify(&server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(kind, FirstBytes::Http);
        let _client = writer.await.unwrap();
        let mut buf = [0u8; 4];
        let mut server = server;
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"POST");
    }

    #[tokio::test]
    async fn peek_times_out_on_silence_and_reports_close() {
        let (client, server) = pair().await;
        match peek_classify(&server, Duration::from_millis(50)).await {
            Err(PeekError::Timeout { peeked: 0, .. }) => {}
            other => panic!("{other:?}"),
        }
        drop(client);
        assert!(matches!(
            peek_classify(&server, Duration::from_secs(5)).await,
            Err(PeekError::Closed)
        ));
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_is_a_clean_error() {
        for garbage in [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            vec![0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0xff, 0xff, 0xff, 0xff],
            vec![0x16, 0x03, 0x03, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00],
            vec![0u8; 100],
        ] {
            let (mut client, mut server) = pair().await;
            client.write_all(&garbage).await.unwrap();
            let got = read_client_hello(&mut server, HelloLimits::default()).await;
            assert!(
                matches!(got, Err(ClientHelloError::Tls(_))),
                "{garbage:?}: {got:?}"
            );
            drop(server);
            // The client sees at most an alert record (content type 21), then the close.
            let mut reply = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut reply))
                .await
                .unwrap()
                .unwrap();
            assert!(reply.is_empty() || reply[0] == 0x15, "{reply:?}");
        }
    }

    #[tokio::test]
    async fn truncated_slow_and_oversized_hellos_are_bounded() {
        // Truncated: a valid header promising more than is sent, then close.
        let (mut client, mut server) = pair().await;
        client
            .write_all(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00])
            .await
            .unwrap();
        drop(client);
        assert!(matches!(
            read_client_hello(&mut server, HelloLimits::default()).await,
            Err(ClientHelloError::Closed { read: 7 })
        ));
        // Slow drip: never completes within the timeout.
        let (mut client, mut server) = pair().await;
        client
            .write_all(&[0x16, 0x03, 0x01, 0x01, 0x00])
            .await
            .unwrap();
        let limits = HelloLimits {
            timeout: Duration::from_millis(100),
            ..HelloLimits::default()
        };
        assert!(matches!(
            read_client_hello(&mut server, limits).await,
            Err(ClientHelloError::Timeout { read: 5, .. })
        ));
        drop(client);
        // Endless: many handshake records continuing one huge message.
        let (mut client, mut server) = pair().await;
        let writer = tokio::spawn(async move {
            // ClientHello header claiming a 16 MiB body, then fragments.
            let mut first = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
            first.resize(5 + 0x4000, 0);
            let _ = client.write_all(&first).await;
            let mut more = vec![0x16, 0x03, 0x01, 0x40, 0x00];
            more.resize(5 + 0x4000, 0);
            for _ in 0..8 {
                if client.write_all(&more).await.is_err() {
                    break;
                }
            }
        });
        let limits = HelloLimits {
            max_bytes: 32 * 1024,
            timeout: Duration::from_secs(5),
        };
        let got = read_client_hello(&mut server, limits).await;
        assert!(
            matches!(
                got,
                Err(ClientHelloError::TooLarge { .. }) | Err(ClientHelloError::Tls(_))
            ),
            "{got:?}"
        );
        drop(server);
        let _ = writer.await;
    }

    /// The bytes a real rustls client sends first for `name` offering `alpn`.
    fn real_client_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::LocalCa::init(dir.path(), false).unwrap();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    async fn read_from(bytes: Vec<u8>) -> Result<PeekedHello, ClientHelloError> {
        let (mut client, mut server) = tokio::io::duplex(256 * 1024);
        client.write_all(&bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let limits = HelloLimits {
            timeout: Duration::from_secs(5),
            ..HelloLimits::default()
        };
        let got = read_client_hello(&mut server, limits).await;
        drop(client);
        got
    }

    #[tokio::test]
    async fn a_real_client_hello_yields_sni_alpn_and_the_exact_raw_bytes() {
        let hello = real_client_hello("MCP.example.com", &[b"h2", b"http/1.1"]);
        assert_eq!(classify(&hello), FirstBytes::Tls);
        let got = read_from(hello.clone()).await.unwrap();
        assert_eq!(
            got.info.sni.as_deref(),
            Some("mcp.example.com").or(got.info.sni.as_deref())
        );
        assert_eq!(
            got.info
                .sni
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("mcp.example.com")
        );
        assert_eq!(got.info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(got.raw(), &hello[..]);
        let none = read_from(real_client_hello("a.test", &[])).await.unwrap();
        assert!(none.info.alpn.is_empty());
        assert_eq!(
            none.info.leaf_name("127.0.0.9".parse().unwrap()).unwrap(),
            LeafName::Dns("a.test".into())
        );
    }

    /// Re-cut the handshake bytes of `hello` (one record) into records of at
    /// most `size` bytes each: legal TLS that every server reassembles.
    pub(crate) fn fragment_records(hello: &[u8], size: usize) -> Vec<u8> {
        let body = &hello[5..];
        let mut out = Vec::new();
        for chunk in body.chunks(size) {
            out.extend_from_slice(&[0x16, hello[1], hello[2]]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[tokio::test]
    async fn a_client_hello_cut_into_tiny_records_is_tls_and_reassembled() {
        let hello = real_client_hello("mcp.example.com", &[b"http/1.1"]);
        for size in [1, 2, 3, 7, 64] {
            let cut = fragment_records(&hello, size);
            assert_eq!(classify(&cut), FirstBytes::Tls, "records of {size}");
            let got = read_from(cut.clone()).await.unwrap();
            assert_eq!(got.info.sni.as_deref(), Some("mcp.example.com"));
            assert_eq!(got.info.alpn, vec![b"http/1.1".to_vec()]);
            assert_eq!(got.raw(), &cut[..]);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(200))]
        /// Random bytes and a real ClientHello with random corruption: an
        /// error or a parsed hello, never a panic or a hang.
        #[test]
        fn hostile_hellos_never_panic(
            random in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..8),
            cut in 0usize..4096,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _ = rt.block_on(read_from(random));
            let mut hello = real_client_hello("x.test", &[b"h2"]);
            for (at, byte) in flips {
                let at = at % hello.len();
                hello[at] = byte;
            }
            hello.truncate(cut.max(1).min(hello.len()));
            if let Ok(got) = rt.block_on(read_from(hello.clone())) {
                proptest::prop_assert!(got.raw().len() <= hello.len());
                proptest::prop_assert!(got.info.alpn.iter().all(|p| !p.is_empty()));
            }
        }
    }
}
