//! The CIBA channel against a real OpenID Provider (npm `oidc-provider`,
//! `tests/peers/oidc_provider.mjs`) on loopback. The test plays the human
//! through the provider's control API: approve, deny, say nothing, or let a
//! man-in-the-middle rewrite the ID token.
//!
//! Needs node and the test peers (`tests/peers/setup.sh`, run here); a
//! missing peer fails the test (never a silent skip).

use kya_agent::approvals::ciba::CibaChannel;
use kya_agent::approvals::http::HttpClient;
use kya_agent::approvals::{ActionRequest, Approvals, Outcome};
use kya_agent::ca::LocalCa;
use kya_agent::config::{CibaClientAuth, CibaConfig, CibaMode, CibaPing};
use kya_common::ProcessIdentity;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

const SECRET: &str = "kya-test-secret";

fn peers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/peers")
}

fn ensure_peers() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let r = DONE.get_or_init(|| {
        let out = std::process::Command::new("sh")
            .arg(peers().join("setup.sh"))
            .output()
            .map_err(|e| format!("cannot run tests/peers/setup.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    if let Err(e) = r {
        panic!("the CIBA test needs node and tests/peers (oidc-provider): {e}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running provider; the node process is killed on drop.
struct Op {
    _child: tokio::process::Child,
    issuer: String,
    control: String,
    http: HttpClient,
}

impl Op {
    async fn start(port: u16, env: &[(&str, String)]) -> Op {
        ensure_peers();
        let control_port = free_port();
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(peers().join("oidc_provider.mjs"))
            .current_dir(peers())
            .env("OP_PORT", port.to_string())
            .env("CONTROL_PORT", control_port.to_string())
            .env("CLIENT_SECRET", SECRET)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start node oidc_provider.mjs");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["ready"] == true {
                        return Some(v);
                    }
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("the provider did not report ready");
        // Keep draining stdout so node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Op {
            _child: child,
            issuer: ready["issuer"].as_str().expect("issuer").to_string(),
            control: ready["control"].as_str().expect("control").to_string(),
            http: HttpClient::new(None, Duration::from_secs(10)).expect("client"),
        }
    }

    async fn requests(&self) -> Vec<Value> {
        let r = self
            .http
            .get(&format!("{}/requests", self.control))
            .await
            .expect("control API");
        serde_json::from_slice(&r.body).expect("JSON")
    }

    /// The next unanswered authentication request the provider received.
    async fn next_request(&self) -> Value {
        for _ in 0..300 {
            if let Some(r) = self
                .requests()
                .await
                .into_iter()
                .find(|r| r["done"] == false)
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("kya never sent a backchannel authentication request");
    }

    async fn post(&self, path: &str) {
        let r = self
            .http
            .post_form(&format!("{}{path}", self.control), &[], None)
            .await
            .expect("control API");
        assert!(
            r.status.is_success(),
            "{path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }

    async fn answer(&self, id: &str, verb: &str) {
        self.post(&format!("/requests/{id}/{verb}")).await;
    }
}

fn config(issuer: &str, mode: CibaMode, ping: Option<CibaPing>) -> CibaConfig {
    CibaConfig {
        issuer: issuer.to_string(),
        client_id: "kya".into(),
        client_auth: CibaClientAuth::SecretInline(SECRET.into()),
        mode,
        ping,
        ca_file: None,
    }
}

fn action(owner: &str) -> ActionRequest {
    ActionRequest {
        agent: "billing-bot".into(),
        owner: owner.into(),
        approvers: vec![],
        process: ProcessIdentity {
            pid: 42,
            ..Default::default()
        },
        server: "mcp.test".into(),
        tool: "transfer".into(),
        args: serde_json::json!({"amount": 5000}),
        args_digest: "ab".repeat(32),
        policy_version: "v1".into(),
        rule: Some("large-transfer".into()),
        reason: "large transfer".into(),
        decision_id: "dec_1".into(),
        tool_change: None,
    }
}

struct Kya {
    _dir: tempfile::TempDir,
    ca_pem: PathBuf,
    channel: Arc<CibaChannel>,
    approvals: Arc<Approvals>,
}

async fn kya(cfg: CibaConfig) -> Kya {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Arc::new(LocalCa::load_or_init(dir.path()).expect("CA"));
    let ca_pem = ca.cert_path();
    let channel = CibaChannel::start(cfg, ca).await.expect("CIBA channel");
    let approvals = Approvals::new(16, None);
    approvals.add_channel(channel.clone());
    Kya {
        _dir: dir,
        ca_pem,
        channel,
        approvals,
    }
}

/// Hold a call of `owner`'s agent for a minute; the request the provider got.
async fn ask(k: &Kya, op: &Op, owner: &str) -> (kya_agent::approvals::ApprovalHandle, Value) {
    let h = k
        .approvals
        .submit(action(owner), Duration::from_secs(60))
        .expect("submit");
    let req = op.next_request().await;
    assert_eq!(req["login_hint"], owner);
    (h, req)
}

fn approved(outcome: Outcome, owner: &str) {
    match outcome {
        Outcome::Approved(a) => {
            assert_eq!(a.approver, owner);
            assert_eq!(a.channel, "ciba");
            let ev = a.evidence.expect("evidence");
            let digest = ev["id_token_sha256"].as_str().expect("digest");
            assert_eq!(digest.len(), 64);
            assert!(digest.chars().all(|c| c.is_ascii_hexdigit()));
            assert!(ev["iss"]
                .as_str()
                .is_some_and(|i| i.starts_with("http://127.0.0.1:")));
            assert!(ev["auth_req_id"].as_str().is_some());
        }
        other => panic!("expected an approval, got {other:?}"),
    }
}

#[tokio::test]
async fn poll_mode_approve_carries_the_verified_owner_and_token_digest() {
    let op = Op::start(free_port(), &[]).await;
    let k = kya(config(&op.issuer, CibaMode::Poll, None)).await;
    let (h, req) = ask(&k, &op, "alice").await;
    assert_eq!(req["binding_message"], h.binding_message.as_str());
    let expiry: u64 = req["requested_expiry"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("requested_expiry");
    assert!((50..=60).contains(&expiry), "{expiry}");
    op.answer(req["id"].as_str().expect("id"), "approve").await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), h.wait())
        .await
        .expect("answered in time");
    approved(outcome, "alice");
    let status = k.channel.status();
    assert_eq!(status["approved"], 1, "{status}");
    assert_eq!(status["discovered"], true);
}

/// An Ed25519 key as `openssl genpkey -algorithm ed25519` writes it, in a
/// file; returns the file and the public JWK as the provider registers it
/// (the one `kya status` shows: kid = its RFC 7638 thumbprint).
fn client_key(dir: &std::path::Path, seed: u8) -> (PathBuf, Value) {
    use base64::Engine;
    use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, EncodePrivateKey};
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let pem = key.to_pkcs8_pem(LineEnding::LF).expect("PEM");
    let path = dir.join(format!("client-{seed}.pem"));
    std::fs::write(&path, pem.as_bytes()).expect("write key");
    // kya refuses a client key others may read.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod key");
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
    let kid = kya_agent::approvals::ciba::client::jwk_thumbprint(&key.verifying_key());
    (
        path,
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid}),
    )
}

#[tokio::test]
async fn private_key_jwt_authenticates_kya_and_another_key_is_refused() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (registered, jwk) = client_key(keys.path(), 1);
    let (stranger, _) = client_key(keys.path(), 2);
    let op = Op::start(free_port(), &[("CLIENT_JWK", jwk.to_string())]).await;

    // kya signs with the registered key: the owner is asked and approves.
    let mut cfg = config(&op.issuer, CibaMode::Poll, None);
    cfg.client_auth = CibaClientAuth::PrivateKeyFile(registered);
    let k = kya(cfg).await;
    let status = k.channel.status();
    assert_eq!(status["client_auth"], "private_key_jwt");
    for member in ["kty", "crv", "x", "kid"] {
        assert_eq!(status["client_jwk"][member], jwk[member], "{status}");
    }
    let (h, req) = ask(&k, &op, "alice").await;
    op.answer(req["id"].as_str().expect("id"), "approve").await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), h.wait())
        .await
        .expect("answered in time");
    approved(outcome, "alice");

    // The client secret no longer works for this client, and a key the
    // provider does not know is refused: nobody is asked, the hold expires.
    for auth in [
        CibaClientAuth::PrivateKeyFile(stranger),
        CibaClientAuth::SecretInline(SECRET.into()),
    ] {
        let mut cfg = config(&op.issuer, CibaMode::Poll, None);
        cfg.client_auth = auth.clone();
        let k = kya(cfg).await;
        let before = op.requests().await.len();
        let h = k
            .approvals
            .submit(action("alice"), Duration::from_secs(3))
            .expect("submit");
        assert_eq!(h.wait().await, Outcome::Expired, "{auth:?}");
        assert_eq!(
            op.requests().await.len(),
            before,
            "{auth:?}: nobody was asked"
        );
        let status = k.channel.status();
        assert!(
            status["errors"].as_u64().is_some_and(|n| n >= 1),
            "{status}"
        );
        assert!(
            status["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("invalid_client")),
            "{status}"
        );
    }
}

#[tokio::test]
async fn a_bad_client_key_file_stops_the_channel_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    // A good key others may read: refused before it is used.
    let (open, _) = client_key(dir.path(), 3);
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let missing = dir.path().join("missing.pem");
    let ca = Arc::new(LocalCa::load_or_init(dir.path()).expect("CA"));
    for (path, why) in [
        (bad, "not an Ed25519 PKCS#8 PEM"),
        (open, "chmod 600"),
        (missing, "No such file"),
    ] {
        let mut cfg = config("http://127.0.0.1:9", CibaMode::Poll, None);
        cfg.client_auth = CibaClientAuth::PrivateKeyFile(path.clone());
        let e = match CibaChannel::start(cfg, ca.clone()).await {
            Ok(_) => panic!("{path:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(why) && e.contains(&path.display().to_string()),
            "{e}"
        );
    }
}

#[tokio::test]
async fn poll_mode_access_denied_denies_and_a_strict_provider_gets_the_code_alone() {
    let op = Op::start(free_port(), &[("STRICT_BINDING", "1".into())]).await;
    let k = kya(config(&op.issuer, CibaMode::Poll, None)).await;
    let h = k
        .approvals
        .submit(action("bob"), Duration::from_secs(60))
        .expect("submit");
    let req = op.next_request().await;
    let code = h.binding_message.split(' ').next().expect("code");
    assert_eq!(req["binding_message"], code, "{req}");
    op.answer(req["id"].as_str().expect("id"), "deny").await;
    match tokio::time::timeout(Duration::from_secs(20), h.wait())
        .await
        .expect("answered in time")
    {
        Outcome::Denied(a) => {
            assert_eq!(a.channel, "ciba");
            assert_eq!(a.approver, "bob");
        }
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[tokio::test]
async fn nobody_answers_the_hold_expires() {
    let op = Op::start(free_port(), &[]).await;
    let k = kya(config(&op.issuer, CibaMode::Poll, None)).await;
    let h = k
        .approvals
        .submit(action("carol"), Duration::from_secs(3))
        .expect("submit");
    let req = op.next_request().await;
    assert!(req["requested_expiry"]
        .as_str()
        .is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n <= 3)));
    assert_eq!(h.wait().await, Outcome::Expired);
}

#[tokio::test]
async fn ping_mode_the_provider_notifies_kyas_https_endpoint() {
    let op_port = free_port();
    let issuer = format!("http://127.0.0.1:{op_port}");
    let ping = CibaPing {
        listen: "127.0.0.1:0".parse().expect("addr"),
        url: "https://127.0.0.1/ciba/notify".into(),
        host: "127.0.0.1".into(),
        path: "/ciba/notify".into(),
    };
    let k = kya(config(&issuer, CibaMode::Ping, Some(ping))).await;
    let port = k.channel.ping_addr().expect("ping endpoint").port();
    let op = Op::start(
        op_port,
        &[
            ("DELIVERY_MODE", "ping".into()),
            ("PING_URL", format!("https://127.0.0.1:{port}/ciba/notify")),
            ("NODE_EXTRA_CA_CERTS", k.ca_pem.display().to_string()),
            ("ID_TOKEN_ALG", "EdDSA".into()),
            // No poll hint: kya must not need one in ping mode.
            ("INTERVAL", "0".into()),
        ],
    )
    .await;
    // A forged notification (right shape, wrong token) is refused and answers nothing.
    let h = k
        .approvals
        .submit(action("alice"), Duration::from_secs(60))
        .expect("submit");
    let req = op.next_request().await;
    let id = req["id"].as_str().expect("id");
    let forged = forged_ping(port, id).await;
    assert!(forged.starts_with("HTTP/1.1 401"), "{forged}");
    assert!(k.approvals.is_pending(&h.id));
    op.answer(id, "approve").await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), h.wait())
        .await
        .expect("answered in time");
    approved(outcome, "alice");
}

/// POST a notification with a made-up bearer token to kya's endpoint over
/// TLS, trusting anything (this is the attacker's side).
async fn forged_ping(port: u16, auth_req_id: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    #[derive(Debug)]
    struct Any;
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(Any))
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name"),
            tcp,
        )
        .await
        .expect("TLS");
    let body = serde_json::json!({ "auth_req_id": auth_req_id }).to_string();
    let req = format!(
        "POST /ciba/notify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer forged-token\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn forged_or_misaddressed_id_tokens_never_approve() {
    let op = Op::start(free_port(), &[("ID_TOKEN_ALG", "ES256".into())]).await;
    let k = kya(config(&op.issuer, CibaMode::Poll, None)).await;
    let modes = ["evil_key", "unknown_kid", "wrong_aud", "wrong_sub"];
    for mode in modes {
        op.post(&format!("/tamper?mode={mode}")).await;
        let h = k
            .approvals
            .submit(action("alice"), Duration::from_secs(4))
            .expect("submit");
        let req = op.next_request().await;
        op.answer(req["id"].as_str().expect("id"), "approve").await;
        assert_eq!(h.wait().await, Outcome::Expired, "tamper mode {mode}");
    }
    let status = k.channel.status();
    assert_eq!(status["approved"], 0, "{status}");
    assert_eq!(status["refused_id_tokens"], modes.len(), "{status}");
}
