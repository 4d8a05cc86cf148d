use super::*;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

fn verifier(ca: &LocalCa) -> Arc<WebPkiServerVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap()
}

fn verify(ca: &LocalCa, leaf: &MintedLeaf, name: &str) -> Result<(), rustls::Error> {
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    verifier(ca)
        .verify_server_cert(
            &leaf.certified.cert[0],
            &[],
            &server_name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_private_key_and_public_cert_then_loads_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ca = LocalCa::init(&state, false).unwrap();
    assert_eq!(mode(&state.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&state.join(CA_CERT_FILE)), 0o644);
    assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(ca.fingerprint().len(), 16);
    let again = LocalCa::load_or_init(&state).unwrap();
    assert_eq!(again.cert_der(), ca.cert_der());
    assert_eq!(LocalCa::load(&state).unwrap().cert_pem(), ca.cert_pem());
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn init_refuses_to_overwrite_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let first = LocalCa::init(dir.path(), false).unwrap();
    assert!(matches!(
        LocalCa::init(dir.path(), false),
        Err(CaError::AlreadyExists { .. })
    ));
    assert_eq!(
        LocalCa::load(dir.path()).unwrap().cert_der(),
        first.cert_der()
    );
    let second = LocalCa::init(dir.path(), true).unwrap();
    assert_ne!(second.cert_der(), first.cert_der());
    assert_ne!(second.fingerprint(), first.fingerprint());
    assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
    // Half a CA also blocks a non-forced init.
    std::fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
    assert!(matches!(
        LocalCa::init(dir.path(), false),
        Err(CaError::AlreadyExists { .. })
    ));
}

#[test]
fn load_reports_missing_and_incomplete_and_never_recreates_half_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        LocalCa::load(dir.path()),
        Err(CaError::Missing { .. })
    ));
    LocalCa::init(dir.path(), false).unwrap();
    let key = std::fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
    std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
    assert!(matches!(
        LocalCa::load_or_init(dir.path()),
        Err(CaError::Incomplete {
            absent: CA_KEY_FILE,
            ..
        })
    ));
    assert!(!dir.path().join(CA_KEY_FILE).exists());
    std::fs::write(dir.path().join(CA_KEY_FILE), key).unwrap();
    std::fs::set_permissions(
        dir.path().join(CA_KEY_FILE),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    LocalCa::load(dir.path()).unwrap();
}

#[test]
fn load_refuses_a_readable_key_garbage_and_a_mismatched_pair() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    LocalCa::init(a.path(), false).unwrap();
    LocalCa::init(b.path(), false).unwrap();
    let key = a.path().join(CA_KEY_FILE);

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        LocalCa::load(a.path()),
        Err(CaError::Permissions { mode: 0o640, .. })
    ));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // b's certificate with a's key.
    std::fs::copy(b.path().join(CA_CERT_FILE), a.path().join(CA_CERT_FILE)).unwrap();
    assert!(matches!(
        LocalCa::load(a.path()),
        Err(CaError::Mismatch { .. })
    ));

    let cert = a.path().join(CA_CERT_FILE);
    for garbage in [
        "",
        "not pem at all",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
    ] {
        std::fs::write(&cert, garbage).unwrap();
        let err = LocalCa::load(a.path()).unwrap_err();
        assert!(
            matches!(err, CaError::CertFormat { .. } | CaError::Mismatch { .. }),
            "{garbage:?}: {err:?}"
        );
    }
    // Two certificates, or a certificate plus a key, is ambiguous: refused.
    let b_pem = std::fs::read_to_string(b.path().join(CA_CERT_FILE)).unwrap();
    std::fs::write(&cert, format!("{b_pem}{b_pem}")).unwrap();
    assert!(matches!(
        LocalCa::load(a.path()),
        Err(CaError::CertFormat { .. })
    ));

    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    assert!(matches!(
        LocalCa::load(a.path()),
        Err(CaError::KeyFormat { .. })
    ));
    std::fs::write(&key, vec![0xffu8; 100_000]).unwrap();
    assert!(LocalCa::load(a.path()).is_err());
}

#[test]
fn a_non_p256_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    LocalCa::init(dir.path(), false).unwrap();
    let other = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let key = dir.path().join(CA_KEY_FILE);
    std::fs::write(&key, other.serialize_pem()).unwrap();
    assert!(matches!(
        LocalCa::load(dir.path()),
        Err(CaError::KeyFormat { .. })
    ));
}

#[test]
fn concurrent_load_or_init_yields_one_ca() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let p = path.clone();
            std::thread::spawn(move || LocalCa::load_or_init(&p).unwrap().cert_der().clone())
        })
        .collect();
    let certs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(certs.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn minted_leaves_verify_for_dns_and_ip_names_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::init(dir.path(), false).unwrap();

    let dns = ca
        .mint_leaf(&LeafName::parse("MCP.Example.com.").unwrap())
        .unwrap();
    verify(&ca, &dns, "mcp.example.com").unwrap();
    assert!(verify(&ca, &dns, "other.example.com").is_err());

    for ip in ["127.0.0.2", "::1"] {
        let leaf = ca.mint_leaf(&LeafName::parse(ip).unwrap()).unwrap();
        verify(&ca, &leaf, ip).unwrap();
        assert!(verify(&ca, &leaf, "127.0.0.3").is_err());
    }

    // Another CA's verifier refuses our leaves.
    let other_dir = tempfile::tempdir().unwrap();
    let other = LocalCa::init(other_dir.path(), false).unwrap();
    let server_name = ServerName::try_from("mcp.example.com").unwrap();
    assert!(verifier(&other)
        .verify_server_cert(
            &dns.certified.cert[0],
            &[],
            &server_name,
            &[],
            UnixTime::now()
        )
        .is_err());

    // Validity: 24h ahead, and expired leaves are refused once the clock passes not_after.
    let now = OffsetDateTime::now_utc();
    let ahead = dns.not_after - now;
    assert!(ahead > LEAF_VALIDITY - Duration::minutes(1) && ahead <= LEAF_VALIDITY);
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        (dns.not_after + Duration::hours(1)).unix_timestamp() as u64,
    ));
    assert!(verifier(&ca)
        .verify_server_cert(&dns.certified.cert[0], &[], &server_name, &[], later)
        .is_err());
    // Back-dated for clock skew: valid 30 minutes in the past.
    let earlier = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        (now - Duration::minutes(30)).unix_timestamp() as u64,
    ));
    verifier(&ca)
        .verify_server_cert(&dns.certified.cert[0], &[], &server_name, &[], earlier)
        .unwrap();
}

#[test]
fn leaves_get_distinct_serials_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::init(dir.path(), false).unwrap();
    let name = LeafName::parse("a.test").unwrap();
    let a = ca.mint_leaf(&name).unwrap();
    let b = ca.mint_leaf(&name).unwrap();
    assert_ne!(a.certified.cert[0], b.certified.cert[0]);
    assert_ne!(
        a.certified.key.public_key().map(|k| k.to_vec()),
        b.certified.key.public_key().map(|k| k.to_vec())
    );
}

#[test]
fn the_reloaded_ca_still_signs_verifiable_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::init(dir.path(), false).unwrap();
    drop(ca);
    let loaded = LocalCa::load(dir.path()).unwrap();
    let leaf = loaded
        .mint_leaf(&LeafName::parse("x.test").unwrap())
        .unwrap();
    verify(&loaded, &leaf, "x.test").unwrap();
}

#[test]
fn leaf_names_reject_hostile_input() {
    for bad in [
        "",
        ".",
        "*.example.com",
        "exa mple.com",
        "a..b",
        "-",
        "例え.jp",
        "a\0b",
        "999.1.1.1.1",
        &"a".repeat(300),
        &format!("{}.com", "a".repeat(64)),
    ] {
        assert!(LeafName::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        LeafName::parse("Example.COM.").unwrap(),
        LeafName::Dns("example.com".into())
    );
    assert_eq!(
        LeafName::parse("::ffff:127.0.0.1").unwrap(),
        LeafName::Ip("::ffff:127.0.0.1".parse().unwrap())
    );
    assert!(LeafName::Dns("not a name".into()).to_server_name().is_err());
    let sn = ServerName::try_from("UPPER.test").unwrap();
    assert_eq!(LeafName::from(&sn), LeafName::Dns("upper.test".into()));
}

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// pathLenConstraint 0 on the CA: a sub-CA made with the CA key is refused by
/// verifiers that honour the anchor's basic constraints (OpenSSL: curl, Python,
/// Node). webpki (rustls) treats a trust anchor as a bare name and key and does
/// not; that limit is documented in the module docs, and asserted here so a
/// change in either behaviour is noticed.
#[test]
fn path_length_zero_stops_sub_cas_for_openssl_not_for_webpki() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::init(dir.path(), false).unwrap();
    let sub_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut sub_params = CertificateParams::default();
    sub_params
        .distinguished_name
        .push(DnType::CommonName, "sub CA");
    sub_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let sub = sub_params.signed_by(&sub_key, &ca.issuer, &ca.key).unwrap();
    let leaf = mint::mint(
        &sub,
        &sub_key,
        &LeafName::parse("x.test").unwrap(),
        OffsetDateTime::now_utc(),
        None,
    )
    .unwrap();

    let name = ServerName::try_from("x.test").unwrap();
    let webpki = verifier(&ca).verify_server_cert(
        &leaf.certified.cert[0],
        &[sub.der().clone()],
        &name,
        &[],
        UnixTime::now(),
    );
    assert!(
        webpki.is_ok(),
        "webpki now enforces anchor pathLen: update the docs"
    );

    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs openssl"
        );
        return;
    }
    let ca_file = dir.path().join("ca-check.pem");
    let sub_file = dir.path().join("sub.pem");
    let leaf_file = dir.path().join("leaf.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    std::fs::write(&sub_file, sub.pem()).unwrap();
    std::fs::write(&leaf_file, pem(&leaf.certified.cert[0])).unwrap();
    let run = |untrusted: Option<&Path>| {
        let mut cmd = std::process::Command::new("openssl");
        cmd.arg("verify").arg("-CAfile").arg(&ca_file);
        if let Some(u) = untrusted {
            cmd.arg("-untrusted").arg(u);
        }
        cmd.arg(&leaf_file).output().unwrap()
    };
    let refused = run(Some(&sub_file));
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("path length"), "{why}");
    // Control: a leaf minted directly by the CA verifies with OpenSSL.
    let direct = ca.mint_leaf(&LeafName::parse("x.test").unwrap()).unwrap();
    std::fs::write(&leaf_file, pem(&direct.certified.cert[0])).unwrap();
    let ok = run(None);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// Write a CA pair with the given validity, as `create_unlocked` would.
fn write_ca_with_validity(dir: &Path, not_before: OffsetDateTime, not_after: OffsetDateTime) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = issuer_params(&key);
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.self_signed(&key).unwrap();
    files::write_pair(
        dir,
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        false,
    )
    .unwrap();
}

#[test]
fn an_expired_ca_is_refused_and_leaves_never_outlive_the_ca() {
    let now = OffsetDateTime::now_utc();
    let expired = tempfile::tempdir().unwrap();
    write_ca_with_validity(
        expired.path(),
        now - Duration::days(10),
        now - Duration::days(1),
    );
    match LocalCa::load(expired.path()) {
        Err(CaError::Expired { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        LocalCa::load_or_init(expired.path()),
        Err(CaError::Expired { .. })
    ));

    let ending = tempfile::tempdir().unwrap();
    write_ca_with_validity(
        ending.path(),
        now - Duration::days(1),
        now + Duration::hours(2),
    );
    let ca = LocalCa::load(ending.path()).unwrap();
    assert!((ca.not_after() - (now + Duration::hours(2))).abs() < Duration::seconds(2));
    let leaf = ca.mint_leaf(&LeafName::parse("a.test").unwrap()).unwrap();
    assert_eq!(leaf.not_after, ca.not_after());

    // A new CA's validity counts from its creation (certificate times are
    // whole seconds), however long the steps above took.
    let fresh = tempfile::tempdir().unwrap();
    let before = OffsetDateTime::now_utc();
    let ca = LocalCa::init(fresh.path(), false).unwrap();
    let after = OffsetDateTime::now_utc();
    assert!(ca.not_after() >= before + CA_VALIDITY - Duration::seconds(1));
    assert!(ca.not_after() <= after + CA_VALIDITY);
}
