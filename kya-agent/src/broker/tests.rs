use super::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn secret(dir: &Path, name: &str, value: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, value).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn section(server: &str, token_file: PathBuf) -> BrokerSection {
    BrokerSection {
        server: server.into(),
        port: None,
        paths: Vec::new(),
        header: None,
        agents: Vec::new(),
        placeholder: None,
        plaintext: false,
        token_file: Some(token_file),
        oauth: None,
    }
}

fn actor(name: &str) -> Actor {
    Actor {
        agent: name.into(),
        owner: None,
        uid: 1000,
        exe_sha256: None,
    }
}

fn target<'a>(server: &'a str, method: &'a Method, path: &'a str, decided: bool) -> Target<'a> {
    Target {
        server,
        port: 443,
        method,
        path,
        tls: true,
        decided,
        bodyless: false,
    }
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn agent_headers(auth: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(auth).unwrap(),
    );
    h.insert("x-other", HeaderValue::from_static("kept"));
    h
}

#[test]
fn decided_requests_get_the_credential_and_the_agents_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::new(
        &[section(
            "api.example.com",
            secret(dir.path(), "t", "s3cret-token"),
        )],
        None,
    )
    .unwrap()
    .unwrap();
    let post = Method::POST;
    let mut h = agent_headers("Bearer agents-own-key");
    let r = run(b.apply(
        &target("api.example.com", &post, "/mcp", true),
        &actor("a"),
        &mut h,
    ))
    .unwrap();
    assert!(matches!(r, Applied::Attached { .. }));
    assert_eq!(h.get_all(http::header::AUTHORIZATION).iter().count(), 1);
    assert_eq!(h[http::header::AUTHORIZATION], "Bearer s3cret-token");
    assert!(h[http::header::AUTHORIZATION].is_sensitive());
    assert_eq!(h["x-other"], "kept");

    // Not decided (opaque traffic, a GET without configured paths): the
    // agent's header is removed and nothing is attached.
    let mut h = agent_headers("Bearer agents-own-key");
    let r = run(b.apply(
        &target("api.example.com", &post, "/admin", false),
        &actor("a"),
        &mut h,
    ))
    .unwrap();
    assert_eq!(r, Applied::Withheld);
    assert!(h.get(http::header::AUTHORIZATION).is_none());
    let get = Method::GET;
    let mut t = target("api.example.com", &get, "/mcp", false);
    t.bodyless = true;
    let mut h = agent_headers("Bearer x");
    assert_eq!(
        run(b.apply(&t, &actor("a"), &mut h)).unwrap(),
        Applied::Withheld
    );
    assert!(h.get(http::header::AUTHORIZATION).is_none());

    // Another server: untouched.
    let mut h = agent_headers("Bearer agents-own-key");
    let r = run(b.apply(
        &target("other.example.com", &post, "/mcp", true),
        &actor("a"),
        &mut h,
    ))
    .unwrap();
    assert_eq!(r, Applied::NotBrokered);
    assert_eq!(h[http::header::AUTHORIZATION], "Bearer agents-own-key");
}

#[test]
fn paths_ports_and_agents_narrow_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = section("api.example.com", secret(dir.path(), "t", "tok"));
    s.paths = vec!["/mcp".into()];
    s.port = Some(443);
    s.agents = vec!["billing-bot".into()];
    let b = Broker::new(&[s], None).unwrap().unwrap();
    let (post, get, delete, put) = (Method::POST, Method::GET, Method::DELETE, Method::PUT);
    let attached = |t: &Target, who: &str| {
        let mut h = HeaderMap::new();
        matches!(
            run(b.apply(t, &actor(who), &mut h)).unwrap(),
            Applied::Attached { .. }
        )
    };
    assert!(attached(
        &target("api.example.com", &post, "/mcp", true),
        "billing-bot"
    ));
    assert!(!attached(
        &target("api.example.com", &post, "/mcp", true),
        "other-bot"
    ));
    assert!(!attached(
        &target("api.example.com", &post, "/mcp/x", true),
        "billing-bot"
    ));
    let mut other_port = target("api.example.com", &post, "/mcp", true);
    other_port.port = 8443;
    assert!(!attached(&other_port, "billing-bot"));
    // The session's stream and its end, on a listed path, without a body.
    for m in [&get, &delete] {
        let mut t = target("api.example.com", m, "/mcp", false);
        t.bodyless = true;
        assert!(attached(&t, "billing-bot"), "{m}");
        t.bodyless = false;
        assert!(!attached(&t, "billing-bot"), "{m} with a body");
    }
    let mut t = target("api.example.com", &put, "/mcp", false);
    t.bodyless = true;
    assert!(!attached(&t, "billing-bot"));
}

#[test]
fn plaintext_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::new(&[section("10.0.0.1", secret(dir.path(), "t", "tok"))], None)
        .unwrap()
        .unwrap();
    let post = Method::POST;
    let mut t = target("10.0.0.1", &post, "/mcp", true);
    t.tls = false;
    let e = run(b.apply(&t, &actor("a"), &mut HeaderMap::new())).unwrap_err();
    assert!(matches!(e, BrokerError::Plaintext { .. }), "{e}");
    let mut s = section("10.0.0.1", secret(dir.path(), "t", "tok"));
    s.plaintext = true;
    let b = Broker::new(&[s], None).unwrap().unwrap();
    assert!(run(b.apply(&t, &actor("a"), &mut HeaderMap::new())).is_ok());
}

#[test]
fn another_header_carries_the_raw_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = section("api.example.com", secret(dir.path(), "t", "raw-key"));
    s.header = Some("X-Api-Key".into());
    let b = Broker::new(&[s], None).unwrap().unwrap();
    let post = Method::POST;
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_static("agent-sent"));
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Bearer stays"),
    );
    run(b.apply(
        &target("api.example.com", &post, "/", true),
        &actor("a"),
        &mut h,
    ))
    .unwrap();
    assert_eq!(h["x-api-key"], "raw-key");
    assert_eq!(h[http::header::AUTHORIZATION], "Bearer stays");
}

#[test]
fn a_placeholder_is_refused_anywhere_but_its_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = section("api.example.com", secret(dir.path(), "t", "tok"));
    s.placeholder = Some("kya-placeholder-api".into());
    let b = Broker::new(&[s], None).unwrap().unwrap();
    let uri: http::Uri = "/mcp".parse().unwrap();
    let h = agent_headers("Bearer kya-placeholder-api");
    assert!(b
        .check_placeholders("api.example.com", 443, &uri, &h)
        .is_ok());
    let e = b
        .check_placeholders("evil.example.com", 443, &uri, &h)
        .unwrap_err();
    assert!(e.to_string().contains("evil.example.com"), "{e}");
    // In any header, or in the target, of a request elsewhere.
    let mut h = HeaderMap::new();
    h.insert(
        "x-forward-me",
        HeaderValue::from_static("xx kya-placeholder-api yy"),
    );
    assert!(b
        .check_placeholders("evil.example.com", 443, &uri, &h)
        .is_err());
    let uri: http::Uri = "/collect?k=kya-placeholder-api".parse().unwrap();
    assert!(b
        .check_placeholders("evil.example.com", 443, &uri, &HeaderMap::new())
        .is_err());
    // The placeholder is replaced on its own server.
    let post = Method::POST;
    let mut h = agent_headers("Bearer kya-placeholder-api");
    run(b.apply(
        &target("api.example.com", &post, "/mcp", true),
        &actor("a"),
        &mut h,
    ))
    .unwrap();
    assert_eq!(h[http::header::AUTHORIZATION], "Bearer tok");
}

#[test]
fn bad_configuration_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let tok = secret(dir.path(), "t", "tok");
    let mut cases = Vec::new();
    let mut s = section("api.example.com", tok.clone());
    s.placeholder = Some("short".into());
    cases.push(s);
    let mut s = section("api.example.com", tok.clone());
    s.header = Some("Connection".into());
    cases.push(s);
    let mut s = section("api.example.com", tok.clone());
    s.header = Some("bad header".into());
    cases.push(s);
    let mut s = section("api.example.com", tok.clone());
    s.paths = vec!["mcp".into()];
    cases.push(s);
    let mut s = section("api.example.com", tok.clone());
    s.token_file = None;
    cases.push(s);
    cases.push(section("*.example.com", tok.clone()));
    let loose = dir.path().join("loose");
    std::fs::write(&loose, "tok").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    cases.push(section("api.example.com", loose));
    for c in cases {
        assert!(
            Broker::new(std::slice::from_ref(&c), None).is_err(),
            "{c:?}"
        );
    }
    // Overlapping placeholders.
    let mut a = section("a.example.com", tok.clone());
    a.placeholder = Some("kya-placeholder-a".into());
    let mut b = section("b.example.com", tok.clone());
    b.placeholder = Some("kya-placeholder-a-longer".into());
    assert!(Broker::new(&[a, b], None).is_err());
    assert!(Broker::new(&[], None).unwrap().is_none());
}

#[test]
fn no_error_or_debug_output_carries_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let p = secret(dir.path(), "t", "super-secret-value");
    let b = Broker::new(&[section("api.example.com", p.clone())], None)
        .unwrap()
        .unwrap();
    assert!(!format!("{b:?}").contains("super-secret"));
    assert!(!format!("{:?}", b.servers()).contains("super-secret"));
    // The file turns unreadable by policy: the error names the file, not the value.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    let post = Method::POST;
    let e = run(b.apply(
        &target("api.example.com", &post, "/", true),
        &actor("a"),
        &mut HeaderMap::new(),
    ))
    .unwrap_err();
    assert!(matches!(e, BrokerError::Unavailable { .. }));
    assert!(!e.to_string().contains("super-secret"), "{e}");
}

#[test]
fn an_answer_carrying_the_token_is_found_however_json_spells_it() {
    let s = Secret("tok/en-1234567".into());
    assert!(s.found_in(b"Bearer tok/en-1234567"));
    assert!(s.found_in(br#"{"result":{"headers":{"authorization":"Bearer tok\/en-1234567"}}}"#));
    assert!(s.found_in(br#"["\u0074ok/en-1234567"]"#));
    // As a member name too.
    assert!(s.found_in(br#"{"tok\/en-1234567": 1}"#));
    assert!(!s.found_in(br#"{"result":"tok/en-123456"}"#));
    assert!(!s.found_in(b""));
    // Not JSON, escapes stay as they are.
    assert!(!s.found_in(br"tok\/en-1234567"));
    // A hostile, deeply nested or broken document is simply not a match.
    let deep = format!("{}\\u0041{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(!s.found_in(deep.as_bytes()));
}

#[test]
fn a_short_token_is_not_looked_for_and_never_printed() {
    let short = Secret("abc".into());
    assert!(!short.found_in(b"abc abc"));
    let s = Secret("kya-secret-value-1".into());
    let shown = format!("{s:?}");
    assert!(!shown.contains("kya-secret"), "{shown}");
}
