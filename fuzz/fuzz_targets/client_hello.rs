//! The first bytes of a redirected connection: the classifier decides from a
//! prefix consistently (extending a decided prefix never changes the decision),
//! and reading a ClientHello, whole or re-cut into tiny TLS records, never
//! panics or hangs; a hello that parses whole parses the same when re-cut.
#![no_main]

use kya_agent::tls::client_hello::{classify, read_client_hello, FirstBytes, HelloLimits};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Re-cut the handshake payload of the records in `bytes` into records of `size`.
fn recut(bytes: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= bytes.len() {
        let len = usize::from(u16::from_be_bytes([bytes[pos + 3], bytes[pos + 4]]));
        let end = (pos + 5 + len).min(bytes.len());
        for piece in bytes[pos + 5..end].chunks(size.max(1)) {
            out.extend_from_slice(&bytes[pos..pos + 3]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        pos = end;
    }
    out
}

fn read(rt: &tokio::runtime::Runtime, bytes: Vec<u8>) -> Option<(Option<String>, Vec<Vec<u8>>)> {
    rt.block_on(async move {
        let (mut client, mut server) = tokio::io::duplex(1 << 17);
        client.write_all(&bytes).await.ok()?;
        client.shutdown().await.ok()?;
        let limits = HelloLimits {
            timeout: Duration::from_secs(2),
            ..HelloLimits::default()
        };
        let got = read_client_hello(&mut server, limits).await.ok()?;
        Some((got.info.sni.clone(), got.info.alpn.clone()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&size, bytes)) = data.split_first() else {
        return;
    };
    let decided = classify(bytes);
    for cut in 0..bytes.len().min(16) {
        let prefix = classify(&bytes[..cut]);
        if prefix != FirstBytes::NeedMore {
            assert_eq!(prefix, decided, "a decided prefix changed its mind");
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let whole = read(&rt, bytes.to_vec());
    let cut = recut(bytes, usize::from(size % 16) + 1);
    if let Some(w) = whole {
        if !cut.is_empty() && cut.len() <= 60 * 1024 {
            if let Some(c) = read(&rt, cut) {
                assert_eq!(w, c, "re-cut records must parse the same");
            }
        }
    }
});
