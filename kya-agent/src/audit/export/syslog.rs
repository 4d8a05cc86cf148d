//! The syslog export sink: each decision as one RFC 5424 message whose MSG is
//! the event's OCSF JSON, sent to the local syslog socket (`/dev/log`, a unix
//! datagram socket that journald and rsyslog both serve), or to a collector
//! over UDP (RFC 5426) or TCP with octet-counting framing (RFC 6587 §3.4.1,
//! as RFC 5425 uses over TLS).
//!
//! ```text
//! <PRI>1 2026-11-26T12:00:00.123456Z HOST kya PID MSGID [origin software="kya" swVersion="V"][meta sequenceId="N"] {"class_uid":6003,...}
//! ```
//!
//! * PRI = facility × 8 + severity. Facility `authpriv` (10) by default: the
//!   stream names processes, users and their tool calls, and `authpriv` is
//!   where syslog daemons keep security records readable only by root;
//!   `?facility=NAME` picks another (`local0`..`local7`, `auth`, `daemon`, ...).
//!   Severity from the verdict: deny (including rejected and expired holds) →
//!   4 warning; hold and approved → 5 notice; allow → 6 informational.
//! * MSGID is the event kind (`decision`, `hold`, `approved`, `rejected`,
//!   `expired`). `meta sequenceId` counts this sink's messages (1, 2, ...,
//!   wrapping after 2147483647), so a collector can see what it lost.
//! * Header fields carry only printable US-ASCII (RFC 5424 §6: `%d33-126`),
//!   within their length limits; anything else in the host name becomes `_`.
//!   SD-PARAM values escape `"`, `\` and `]`. The MSG is the OCSF JSON: one
//!   line, UTF-8 (serde escapes control characters), no BOM.
//! * A message longer than [`MAX_MESSAGE`] octets (rsyslog's default
//!   `maxMessageSize`) has its MSG cut at a character boundary and is counted
//!   in the sink's `truncated`; the full event is in the audit log.
//!
//! Like the other sinks this is a follower of the event hub: it never slows a
//! decision, and what it cannot send (no `/dev/log`, collector down) is
//! counted in `failures` with the last error, visible in `kya status`.
//! Connections are retried at most once per [`RETRY`].

use super::health::{fail, SinkHealth};
use crate::audit::event::EventKind;
use crate::audit::ocsf::to_ocsf;
use crate::audit::DecisionEvent;
use kya_common::Verdict;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The local syslog socket.
pub(crate) const DEV_LOG: &str = "/dev/log";
/// Longest message sent, in octets (rsyslog's default; RFC 5424 §6.1 asks
/// receivers to take at least 2048 and allows more).
pub(crate) const MAX_MESSAGE: usize = 8192;
/// Least time between two attempts to (re)connect.
pub(crate) const RETRY: Duration = Duration::from_secs(1);
/// How long one send may block the sink's thread.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Default facility: authpriv.
pub(crate) const DEFAULT_FACILITY: u8 = 10;

/// Where syslog messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A unix datagram socket (`/dev/log` by default).
    Unix(PathBuf),
    /// `host:port` over UDP.
    Udp(String),
    /// `host:port` over TCP, octet-counting framing.
    Tcp(String),
}

/// A syslog sink: transport and facility.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogSpec {
    pub transport: Transport,
    pub facility: u8,
}

const FACILITIES: [(&str, u8); 20] = [
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

fn facility_name(f: u8) -> &'static str {
    FACILITIES
        .iter()
        .find(|(_, n)| *n == f)
        .map(|(s, _)| *s)
        .unwrap_or("?")
}

fn host_port(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(s.to_string())
        }
        _ => Err(format!("expected HOST:PORT, got {s:?}")),
    }
}

impl SyslogSpec {
    /// Parse what follows `syslog` in a sink spec: `""`, `":unix:/path"`,
    /// `":udp://HOST:PORT"`, `":tcp://HOST:PORT"`, each optionally followed by
    /// `?facility=NAME`.
    pub fn parse(rest: &str) -> Result<Self, String> {
        let (target, facility) = match rest.rsplit_once("?facility=") {
            Some((t, f)) => {
                let n = FACILITIES
                    .iter()
                    .find(|(name, _)| *name == f)
                    .map(|(_, n)| *n)
                    .ok_or_else(|| format!("unknown syslog facility {f:?}"))?;
                (t, n)
            }
            None => (rest, DEFAULT_FACILITY),
        };
        let transport = if target.is_empty() {
            Transport::Unix(PathBuf::from(DEV_LOG))
        } else if let Some(p) = target.strip_prefix(":unix:") {
            if !p.starts_with('/') {
                return Err(format!(
                    "syslog unix socket must be an absolute path: {p:?}"
                ));
            }
            Transport::Unix(PathBuf::from(p))
        } else if let Some(a) = target.strip_prefix(":udp://") {
            Transport::Udp(host_port(a)?)
        } else if let Some(a) = target.strip_prefix(":tcp://") {
            Transport::Tcp(host_port(a)?)
        } else {
            return Err(format!(
                "unknown syslog target {target:?} (expected \"syslog\", \"syslog:unix:/path\", \"syslog:udp://HOST:PORT\" or \"syslog:tcp://HOST:PORT\")"
            ));
        };
        Ok(SyslogSpec {
            transport,
            facility,
        })
    }

    /// The sink's name in `kya status`.
    pub fn name(&self) -> String {
        let t = match &self.transport {
            Transport::Unix(p) => format!("unix:{}", p.display()),
            Transport::Udp(a) => format!("udp://{a}"),
            Transport::Tcp(a) => format!("tcp://{a}"),
        };
        format!("syslog:{t}?facility={}", facility_name(self.facility))
    }
}

/// RFC 5424 severity for an event.
pub(crate) fn severity(e: &DecisionEvent) -> u8 {
    match (e.kind, e.verdict) {
        (_, Verdict::Deny) => 4,
        (EventKind::Hold | EventKind::Approved, _) | (_, Verdict::Hold) => 5,
        _ => 6,
    }
}

/// A header field: printable US-ASCII only, at most `max` octets, `-` when empty.
fn header_field(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .map(|c| if ('!'..='~').contains(&c) { c } else { '_' })
        .take(max)
        .collect();
    if out.is_empty() {
        "-".into()
    } else {
        out
    }
}

/// An SD-PARAM value: escape `"`, `\` and `]` (RFC 5424 §6.3.3).
fn sd_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A formatted message and whether its MSG was cut.
pub(crate) struct Formatted {
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

/// Format one event as an RFC 5424 message of at most `max` octets.
pub(crate) fn format(
    e: &DecisionEvent,
    facility: u8,
    procid: u32,
    sequence: u32,
    max: usize,
) -> Formatted {
    let pri = u16::from(facility.min(23)) * 8 + u16::from(severity(e));
    let time = e.time.to_offset(time::UtcOffset::UTC);
    let timestamp = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        time.year().clamp(0, 9999),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        time.microsecond()
    );
    let header = format!(
        "<{pri}>1 {timestamp} {} kya {} {} [origin software=\"kya\" swVersion=\"{}\"][meta sequenceId=\"{}\"] ",
        header_field(&e.host, 255),
        header_field(&procid.to_string(), 128),
        header_field(e.kind.as_str(), 32),
        sd_value(env!("CARGO_PKG_VERSION")),
        sequence,
    );
    let msg = to_ocsf(e).to_string();
    let room = max.saturating_sub(header.len());
    let (msg, truncated) = if msg.len() > room {
        let mut cut = room;
        while cut > 0 && !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        (&msg[..cut], true)
    } else {
        (&msg[..], false)
    };
    let mut bytes = header.into_bytes();
    bytes.extend_from_slice(msg.as_bytes());
    Formatted { bytes, truncated }
}

enum Conn {
    Unix(UnixDatagram),
    Udp(UdpSocket),
    Tcp(TcpStream),
}

fn resolve(addr: &str) -> std::io::Result<std::net::SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr}: no address"))
    })
}

fn connect(t: &Transport) -> std::io::Result<Conn> {
    match t {
        Transport::Unix(p) => {
            let s = UnixDatagram::unbound()?;
            s.connect(p)?;
            s.set_write_timeout(Some(SEND_TIMEOUT))?;
            Ok(Conn::Unix(s))
        }
        Transport::Udp(a) => {
            let to = resolve(a)?;
            let local = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = UdpSocket::bind(local)?;
            s.connect(to)?;
            Ok(Conn::Udp(s))
        }
        Transport::Tcp(a) => {
            let s = TcpStream::connect_timeout(&resolve(a)?, SEND_TIMEOUT)?;
            s.set_write_timeout(Some(SEND_TIMEOUT))?;
            s.set_nodelay(true)?;
            Ok(Conn::Tcp(s))
        }
    }
}

fn send(conn: &mut Conn, msg: &[u8]) -> std::io::Result<()> {
    match conn {
        Conn::Unix(s) => s.send(msg).map(drop),
        Conn::Udp(s) => s.send(msg).map(drop),
        Conn::Tcp(s) => {
            // RFC 6587 octet counting: "LEN SP MSG".
            let mut framed = format!("{} ", msg.len()).into_bytes();
            framed.extend_from_slice(msg);
            s.write_all(&framed)
        }
    }
}

/// The sink's state between events.
pub(crate) struct SyslogSink {
    spec: SyslogSpec,
    conn: Option<Conn>,
    last_attempt: Option<Instant>,
    sequence: u32,
    procid: u32,
    max: usize,
}

impl SyslogSink {
    pub(crate) fn new(spec: SyslogSpec) -> Self {
        SyslogSink {
            spec,
            conn: None,
            last_attempt: None,
            sequence: 0,
            procid: std::process::id(),
            max: MAX_MESSAGE,
        }
    }

    /// Send one event; failures and truncation are counted in `health`.
    pub(crate) fn emit(&mut self, e: &DecisionEvent, health: &SinkHealth) {
        self.sequence = if self.sequence >= i32::MAX as u32 {
            1
        } else {
            self.sequence + 1
        };
        let f = format(e, self.spec.facility, self.procid, self.sequence, self.max);
        if f.truncated {
            health.truncated.fetch_add(1, Ordering::Relaxed);
        }
        if self.conn.is_none() {
            if self.last_attempt.is_some_and(|t| t.elapsed() < RETRY) {
                health.failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.last_attempt = Some(Instant::now());
            match connect(&self.spec.transport) {
                Ok(c) => self.conn = Some(c),
                Err(err) => {
                    fail(health, format!("connect {}: {err}", self.spec.name()));
                    return;
                }
            }
        }
        if let Some(conn) = self.conn.as_mut() {
            match send(conn, &f.bytes) {
                Ok(()) => {
                    health.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    // Reconnect next time (after RETRY): the collector may
                    // have restarted, /dev/log may be back.
                    self.conn = None;
                    fail(health, format!("send {}: {err}", self.spec.name()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::tests::sample;

    /// One parsed RFC 5424 message.
    #[derive(Debug)]
    pub(crate) struct Parsed {
        pub pri: u16,
        pub host: String,
        pub app: String,
        pub procid: String,
        pub msgid: String,
        pub sd: String,
        pub msg: String,
    }

    /// A strict RFC 5424 parser (the ABNF of §6), for the tests.
    pub(crate) fn parse_5424(b: &[u8]) -> Result<Parsed, String> {
        let s = std::str::from_utf8(b).map_err(|e| e.to_string())?;
        let rest = s.strip_prefix('<').ok_or("no PRI")?;
        let (pri, rest) = rest.split_once('>').ok_or("PRI not closed")?;
        if pri.is_empty() || pri.len() > 3 || !pri.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!("bad PRI {pri:?}"));
        }
        let pri: u16 = pri.parse().map_err(|_| "PRI")?;
        if pri > 191 {
            return Err("PRI > 191".into());
        }
        let rest = rest.strip_prefix("1 ").ok_or("VERSION must be 1")?;
        let mut fields = rest.splitn(6, ' ');
        let mut next = |name: &str, max: usize| -> Result<String, String> {
            let f = fields.next().ok_or(format!("no {name}"))?;
            if f.is_empty() || f.len() > max || !f.bytes().all(|c| (33..=126).contains(&c)) {
                return Err(format!("bad {name} {f:?}"));
            }
            Ok(f.to_string())
        };
        let ts = next("TIMESTAMP", 32)?;
        time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("TIMESTAMP {ts:?}: {e}"))?;
        let host = next("HOSTNAME", 255)?;
        let app = next("APP-NAME", 48)?;
        let procid = next("PROCID", 128)?;
        let msgid = next("MSGID", 32)?;
        let rest = fields.next().ok_or("no STRUCTURED-DATA")?;
        // STRUCTURED-DATA: "-" or one or more [SD-ID *(SP PARAM="VALUE")].
        let (sd, msg) = if let Some(m) = rest.strip_prefix('-') {
            ("-".to_string(), m)
        } else {
            let bytes = rest.as_bytes();
            let mut i = 0;
            while i < bytes.len() && bytes[i] == b'[' {
                i += 1;
                let mut in_value = false;
                loop {
                    let c = *bytes.get(i).ok_or("SD-ELEMENT not closed")?;
                    if in_value {
                        if c == b'\\' {
                            i += 1;
                        } else if c == b'"' {
                            in_value = false;
                        } else if c == b']' {
                            return Err("unescaped ] in SD-PARAM".into());
                        }
                    } else if c == b'"' {
                        in_value = true;
                    } else if c == b']' {
                        break;
                    } else if !(32..=126).contains(&c) {
                        return Err(format!("bad SD byte {c}"));
                    }
                    i += 1;
                }
                i += 1;
            }
            if i == 0 {
                return Err("no STRUCTURED-DATA".into());
            }
            (rest[..i].to_string(), &rest[i..])
        };
        let msg = match msg {
            "" => "",
            m => m.strip_prefix(' ').ok_or("no SP before MSG")?,
        };
        Ok(Parsed {
            pri,
            host,
            app,
            procid,
            msgid,
            sd,
            msg: msg.to_string(),
        })
    }

    #[test]
    fn specs_parse() {
        let s = SyslogSpec::parse("").unwrap();
        assert_eq!(s.transport, Transport::Unix(DEV_LOG.into()));
        assert_eq!(s.facility, 10);
        let s = SyslogSpec::parse(":udp://127.0.0.1:514?facility=local0").unwrap();
        assert_eq!(s.transport, Transport::Udp("127.0.0.1:514".into()));
        assert_eq!(s.facility, 16);
        assert_eq!(s.name(), "syslog:udp://127.0.0.1:514?facility=local0");
        let s = SyslogSpec::parse(":tcp://logs.example:6514").unwrap();
        assert_eq!(s.transport, Transport::Tcp("logs.example:6514".into()));
        let s = SyslogSpec::parse(":unix:/run/x.sock").unwrap();
        assert_eq!(s.transport, Transport::Unix("/run/x.sock".into()));
        for bad in [
            ":",
            ":unix:rel",
            ":udp://",
            ":udp://host",
            ":udp://:514",
            ":tcp://h:0",
            ":tcp://h:99999",
            "?facility=local9",
            ":http://x:1",
        ] {
            assert!(SyslogSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn severity_follows_the_verdict() {
        let pri = |kind, n| {
            let f = format(&sample(kind, n), 10, 1, 1, MAX_MESSAGE);
            parse_5424(&f.bytes).unwrap().pri
        };
        assert_eq!(pri(EventKind::Decision, 1), 80 + 4, "deny: warning");
        assert_eq!(pri(EventKind::Decision, 2), 80 + 6, "allow: info");
        assert_eq!(pri(EventKind::Hold, 1), 80 + 5, "hold: notice");
        assert_eq!(pri(EventKind::Approved, 1), 80 + 5, "approved: notice");
        assert_eq!(pri(EventKind::Rejected, 1), 80 + 4);
        assert_eq!(pri(EventKind::Expired, 1), 80 + 4);
        assert_eq!(pri(EventKind::ControlRefused, 1), 80 + 4);
    }

    #[test]
    fn every_kind_is_valid_rfc5424_with_the_ocsf_json_as_msg() {
        for kind in EventKind::ALL {
            for n in [1u64, 2] {
                let e = sample(kind, n);
                let f = format(&e, 16, 4242, 7, MAX_MESSAGE);
                assert!(!f.truncated);
                let p = parse_5424(&f.bytes)
                    .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&f.bytes)));
                assert_eq!(p.pri / 8, 16);
                assert_eq!(p.host, e.host);
                assert_eq!(p.app, "kya");
                assert_eq!(p.procid, "4242");
                assert_eq!(p.msgid, kind.as_str());
                assert!(p.sd.contains("[meta sequenceId=\"7\"]"), "{}", p.sd);
                let v: serde_json::Value = serde_json::from_str(&p.msg).unwrap();
                assert_eq!(v, to_ocsf(&e));
            }
        }
    }

    #[test]
    fn hostile_header_values_are_made_safe() {
        let mut e = sample(EventKind::Decision, 1);
        e.host = "evil host\n<13>1 - fake ]\"\u{7f}é".into();
        let f = format(&e, 10, 1, 1, MAX_MESSAGE);
        assert_eq!(
            parse_5424(&f.bytes).unwrap().host,
            "evil_host_<13>1_-_fake_]\"__"
        );
        e.host = String::new();
        let host = |e: &DecisionEvent| {
            parse_5424(&format(e, 10, 1, 1, MAX_MESSAGE).bytes)
                .unwrap()
                .host
        };
        assert_eq!(host(&e), "-");
        e.host = "h".repeat(1000);
        assert_eq!(host(&e).len(), 255);
        // Control characters and newlines in event fields stay escaped in the MSG.
        e.reason = "line1\nline2\r\0\u{1b}[31m".into();
        let f = format(&e, 10, 1, 1, MAX_MESSAGE);
        assert!(
            !f.bytes.iter().any(|b| *b < 0x20),
            "a control byte in the message"
        );
        assert_eq!(sd_value(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
    }

    #[test]
    fn huge_messages_are_truncated_at_a_character_boundary_and_counted() {
        let mut e = sample(EventKind::Decision, 1);
        e.reason = "é".repeat(10_000);
        let f = format(&e, 10, 1, 1, MAX_MESSAGE);
        assert!(f.truncated);
        assert!(f.bytes.len() <= MAX_MESSAGE);
        assert!(f.bytes.len() >= MAX_MESSAGE - 4);
        parse_5424(&f.bytes).expect("still valid UTF-8 and RFC 5424");

        // The sink counts it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let health = SinkHealth::default();
        let mut sink = SyslogSink::new(SyslogSpec {
            transport: Transport::Unix(path),
            facility: 10,
        });
        sink.emit(&e, &health);
        let mut buf = vec![0u8; 65536];
        let n = rx.recv(&mut buf).unwrap();
        assert!(n <= MAX_MESSAGE);
        assert_eq!(health.truncated.load(Ordering::Relaxed), 1);
        assert_eq!(health.written.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_absent_socket_is_counted_never_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let health = SinkHealth::default();
        let mut sink = SyslogSink::new(SyslogSpec {
            transport: Transport::Unix(dir.path().join("no-such-socket")),
            facility: 10,
        });
        for n in 0..5 {
            sink.emit(&sample(EventKind::Decision, n), &health);
        }
        assert_eq!(health.failures.load(Ordering::Relaxed), 5);
        assert_eq!(health.written.load(Ordering::Relaxed), 0);
        let last = health.last_error.lock().unwrap().clone().unwrap();
        assert!(last.contains("no-such-socket"), "{last}");
    }

    /// Events through the real sink threads to real sockets: a unix datagram
    /// socket standing in for `/dev/log`, a UDP and a TCP collector. What
    /// arrives is valid RFC 5424 whose MSG is the event's OCSF JSON.
    #[test]
    fn events_reach_unix_udp_and_tcp_collectors() {
        use crate::audit::export::{spawn, SinkSpec};
        use crate::decision::events::EventHub;
        use std::io::{BufRead, BufReader, Read};
        let dir = tempfile::tempdir().unwrap();
        let unix_path = dir.path().join("dev-log");
        let unix = UnixDatagram::bind(&unix_path).unwrap();
        unix.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let specs: Vec<SinkSpec> = [
            format!("syslog:unix:{}", unix_path.display()),
            format!("syslog:udp://{}?facility=local0", udp.local_addr().unwrap()),
            format!("syslog:tcp://{}?facility=local3", tcp.local_addr().unwrap()),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let hub = EventHub::new();
        let health = spawn(|| hub.subscribe(), &specs);
        let events = [
            sample(EventKind::Decision, 1),
            sample(EventKind::Hold, 1),
            sample(EventKind::Decision, 2),
        ];
        for e in &events {
            hub.publish(e.clone());
        }
        let check = |bytes: &[u8], n: usize, facility: u16| {
            let p = parse_5424(bytes)
                .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(bytes)));
            assert_eq!(p.pri / 8, facility);
            assert_eq!(p.pri % 8, u16::from(severity(&events[n])));
            assert_eq!(p.msgid, events[n].kind.as_str());
            assert!(
                p.sd.contains(&format!("sequenceId=\"{}\"", n + 1)),
                "{}",
                p.sd
            );
            let v: serde_json::Value = serde_json::from_str(&p.msg).unwrap();
            assert_eq!(v, to_ocsf(&events[n]));
        };
        let mut buf = vec![0u8; 65536];
        for n in 0..3 {
            let len = unix.recv(&mut buf).unwrap();
            check(&buf[..len], n, 10);
            let len = udp.recv(&mut buf).unwrap();
            check(&buf[..len], n, 16);
        }
        let (conn, _) = tcp.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut r = BufReader::new(conn);
        for n in 0..3 {
            // RFC 6587 octet counting: "LEN SP MSG".
            let mut len = Vec::new();
            r.read_until(b' ', &mut len).unwrap();
            let len: usize = std::str::from_utf8(&len[..len.len() - 1])
                .unwrap()
                .parse()
                .unwrap();
            let mut msg = vec![0u8; len];
            r.read_exact(&mut msg).unwrap();
            check(&msg, n, 19);
        }
        // A sink counts a record once its send returned, which can be after
        // the collector read it: wait (bounded) for the counts to settle.
        for h in &health {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while h.written.load(Ordering::Relaxed) < 3 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(h.written.load(Ordering::Relaxed), 3, "{}", h.sink);
            assert_eq!(h.failures.load(Ordering::Relaxed), 0, "{}", h.sink);
        }
    }
}
