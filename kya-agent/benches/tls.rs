//! Leaf minting vs a leaf-cache hit, and the agent-side TLS handshake through
//! kya's terminate path with a cold vs a warm cache (the first-connection
//! overhead the cache exists to remove).
//!
//! Run: `cargo bench -p kya-agent --bench tls`

use criterion::{criterion_group, criterion_main, Criterion};
use kya_agent::ca::{LeafName, LocalCa};
use kya_agent::tls::client_hello::{read_client_hello, HelloLimits};
use kya_agent::tls::leaf_cache::LeafCache;
use kya_agent::tls::terminate::Terminator;
use rustls::pki_types::ServerName;
use std::num::NonZeroUsize;
use std::sync::Arc;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(LocalCa::init(dir.path(), false).unwrap());
    let name = LeafName::parse("mcp.example.com").unwrap();

    c.bench_function("leaf/mint (cache miss)", |b| {
        b.iter(|| ca.mint_leaf(&name).unwrap())
    });
    let cache = LeafCache::new(ca.clone(), NonZeroUsize::new(1024).unwrap());
    cache.get_or_mint(&name).unwrap();
    c.bench_function("leaf/cache hit", |b| {
        b.iter(|| cache.get_or_mint(&name).unwrap())
    });

    // Full handshakes over an in-memory pipe: agent (rustls client trusting
    // kya's CA) ↔ read_client_hello + Terminator::terminate.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No resumption: every handshake is a first connection.
    client_config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));

    let handshake = |terminator: Terminator, sni: String| {
        let connector = connector.clone();
        async move {
            let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
            let server_name = ServerName::try_from(sni).unwrap();
            let client =
                tokio::spawn(
                    async move { connector.connect(server_name, client_io).await.unwrap() },
                );
            let hello = read_client_hello(&mut server_io, HelloLimits::default())
                .await
                .unwrap();
            let leaf = hello.info.leaf_name([127, 0, 0, 1].into()).unwrap();
            let tls = terminator
                .terminate(server_io, hello, &leaf, Some(b"h2"))
                .await
                .unwrap();
            let client = client.await.unwrap();
            (tls, client)
        }
    };

    let warm = Terminator::new(LeafCache::new(ca.clone(), NonZeroUsize::new(1024).unwrap()));
    c.bench_function("handshake/leaf cached", |b| {
        b.iter(|| rt.block_on(handshake(warm.clone(), "mcp.example.com".into())))
    });
    let cold = Terminator::new(LeafCache::new(ca.clone(), NonZeroUsize::MIN));
    let mut n = 0u64;
    c.bench_function("handshake/leaf minted", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(handshake(cold.clone(), format!("n{n}.example.com")))
        })
    });
    // The two handshake benches must differ only in minting.
    let (w, c) = (warm.cache().stats(), cold.cache().stats());
    eprintln!("cache stats: cached {w:?}; minted {c:?}");
    assert!(w.misses <= 1 && c.hits == 0 && c.misses > 0);
}

criterion_group!(benches, bench);
criterion_main!(benches);
