//! `--image REF`: which images an image selector stands for, and whether the
//! image a container runs (as its engine names it, and its id) is one.
//!
//! A REF is `[DOMAIN/]PATH[:TAG][@sha256:DIGEST]` as Docker and Podman write
//! image names, or an image id prefix (12 to 64 lowercase hex digits,
//! optionally `sha256:`). Without a tag or digest any tag matches. Without a
//! domain the name matches in the engines' default places (`localhost/`,
//! `docker.io/`, `docker.io/library/`): `agent:1.2` is `localhost/agent:1.2`
//! to Podman and `agent:1.2` to Docker. A name without a tag is `:latest`.
//!
//! REFs come from the operator, the names they are matched against from the
//! engine's CLI: both are parsed by the same strict grammar (lowercase names,
//! no spaces, controls or shell characters), and nothing else matches.

/// Longest REF accepted (a name is at most 255 bytes, a tag 128, a digest 71).
const MAX_REF: usize = 512;
/// Longest repository name (domain and path) accepted.
const MAX_NAME: usize = 255;
/// Longest tag accepted.
const MAX_TAG: usize = 128;
/// Shortest image id prefix accepted (what `docker images` shows).
const MIN_ID_PREFIX: usize = 12;

/// Why an image reference is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ImageRefError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {0:?} is longer than {MAX_REF} bytes")]
    TooLong(String),
    #[error("image reference {0:?} may hold only letters, digits and . _ - : / @")]
    BadChar(String),
    #[error("image reference {0:?}: a digest must be sha256: and 64 lowercase hex digits")]
    BadDigest(String),
    #[error("image reference {0:?}: a tag is a letter, digit or '_', then up to 127 of those, '.' and '-'")]
    BadTag(String),
    #[error("image reference {0:?}: the name must be lowercase components ([a-z0-9], joined by '.', '_' or '-') separated by '/', after an optional registry host[:port]")]
    BadName(String),
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ImageRef {
    /// An image id prefix (12 to 64 lowercase hex digits).
    Id(String),
    /// An image name.
    Name(ImageName),
}

/// An image name: registry, repository path, tag, digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageName {
    /// `localhost`, `quay.io`, `registry:5000`; `None` when not given.
    domain: Option<String>,
    /// `library/alpine`, `team/agent`.
    path: String,
    tag: Option<String>,
    /// The 64 hex digits after `sha256:`.
    digest: Option<String>,
}

impl std::str::FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ImageRefError::Empty);
        }
        if s.len() > MAX_REF {
            return Err(ImageRefError::TooLong(s.chars().take(64).collect()));
        }
        if !s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/' | b'@')
        }) {
            return Err(ImageRefError::BadChar(s.to_string()));
        }
        let bare = s.strip_prefix("sha256:").unwrap_or(s);
        if is_hex(bare) && (MIN_ID_PREFIX..=64).contains(&bare.len()) {
            return Ok(ImageRef::Id(bare.to_string()));
        }
        if s.starts_with("sha256:") {
            return Err(ImageRefError::BadDigest(s.to_string()));
        }
        ImageName::parse(s).map(ImageRef::Name)
    }
}

impl ImageName {
    fn parse(s: &str) -> Result<Self, ImageRefError> {
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .filter(|h| h.len() == 64 && is_hex(h))
                    .ok_or_else(|| ImageRefError::BadDigest(s.to_string()))?;
                (rest, Some(hex.to_string()))
            }
            None => (s, None),
        };
        // the tag is after the last ':' that follows the last '/'
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(&rest[at + 1..]))
            }
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !is_tag(t) {
                return Err(ImageRefError::BadTag(s.to_string()));
            }
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(ImageRefError::BadName(s.to_string()));
        }
        let comps: Vec<&str> = name.split('/').collect();
        let (domain, path) = match comps.as_slice() {
            [first, rest @ ..]
                if !rest.is_empty()
                    && (first.contains('.') || first.contains(':') || *first == "localhost") =>
            {
                if !is_domain(first) {
                    return Err(ImageRefError::BadName(s.to_string()));
                }
                (Some(first.to_string()), rest.to_vec())
            }
            all => (None, all.to_vec()),
        };
        if path.is_empty() || !path.iter().all(|c| is_path_component(c)) {
            return Err(ImageRefError::BadName(s.to_string()));
        }
        Ok(Self {
            domain,
            path: path.join("/"),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The repository as the default registry spells it: `docker.io` for
    /// `index.docker.io`, and `library/` before a one-component path there.
    fn canonical(&self) -> (Option<&str>, String) {
        self.canonical_in(self.domain.as_deref())
    }

    /// [`Self::canonical`] as if the domain were `domain`.
    fn canonical_in<'a>(&self, domain: Option<&'a str>) -> (Option<&'a str>, String) {
        match domain {
            Some("docker.io" | "index.docker.io") => {
                let path = if self.path.contains('/') {
                    self.path.clone()
                } else {
                    format!("library/{}", self.path)
                };
                (Some("docker.io"), path)
            }
            d => (d, self.path.clone()),
        }
    }

    /// Whether the image the engine calls `engine` is this name: same
    /// repository (in a default place when this name gives no domain), same
    /// tag when this one gives a tag, same digest when it gives a digest.
    fn matches(&self, engine: &ImageName) -> bool {
        let (e_domain, e_path) = engine.canonical();
        let same_repo = match self.domain {
            Some(_) => {
                let (domain, path) = self.canonical();
                // an engine name without a domain is Docker's short name
                let (e_domain, e_path) = match engine.domain {
                    None => engine.canonical_in(Some("docker.io")),
                    Some(_) => (e_domain, e_path),
                };
                domain == e_domain && path == e_path
            }
            None => match e_domain {
                None | Some("localhost") => e_path == self.path,
                Some("docker.io") => {
                    e_path == self.path || e_path.strip_prefix("library/") == Some(&self.path)
                }
                Some(_) => false,
            },
        };
        if !same_repo {
            return false;
        }
        if let Some(d) = &self.digest {
            if engine.digest.as_ref() != Some(d) {
                return false;
            }
        }
        match &self.tag {
            None => true,
            Some(t) => match (&engine.tag, &engine.digest) {
                (Some(et), _) => et == t,
                // pinned by digest only: the digest decided (when given)
                (None, Some(_)) => self.digest.is_some(),
                (None, None) => t == "latest",
            },
        }
    }
}

impl ImageRef {
    /// Whether a container whose engine names its image `name` (when it
    /// does) and whose image id is `id` (64 lowercase hex digits) runs an
    /// image this reference stands for.
    pub(crate) fn matches(&self, name: Option<&str>, id: &str) -> bool {
        match self {
            ImageRef::Id(prefix) => id.starts_with(prefix.as_str()),
            ImageRef::Name(want) => name
                .and_then(|n| ImageName::parse(n).ok())
                .is_some_and(|engine| want.matches(&engine)),
        }
    }
}

/// Whether `s` is an image name as an engine may report it.
pub(crate) fn is_image_name(s: &str) -> bool {
    s.len() <= MAX_REF && matches!(s.parse::<ImageRef>(), Ok(ImageRef::Name(_)))
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_tag(t: &str) -> bool {
    let mut b = t.bytes();
    t.len() <= MAX_TAG
        && b.next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `host[:port]`: lowercase labels of letters, digits and '-', joined by '.'.
fn is_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    port_ok
        && !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A path component: lowercase letters and digits, with single '.', '_',
/// '__' or runs of '-' between them.
fn is_path_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // separators: '.', '_', '__', or any run of '-'
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "dec98d5f5d7686bb20a235ee4b98429239e2b492231e028f5fb453a7a2362229";
    const OTHER: &str = "0000000000000000000000000000000000000000000000000000000000000001";
    const DIGEST: &str = "4a1c4b21597c1b4415bdbecb28a3296c6b5e23ca4f9feeb599860a1dac6a0108";

    fn r(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn references_parse_as_engines_write_them() {
        assert_eq!(r(&ID[..12]), ImageRef::Id(ID[..12].into()));
        assert_eq!(r(ID), ImageRef::Id(ID.into()));
        assert_eq!(r(&format!("sha256:{ID}")), ImageRef::Id(ID.into()));
        for good in [
            "agent",
            "agent:1.2",
            "localhost/agent:latest",
            "localhost:5000/team/agent:v1",
            "quay.io/team/agent",
            "docker.io/library/alpine:3.19",
            "my-agent_x.y__z",
            "a--b",
            "agent:V1_RC",
            &format!("agent@sha256:{DIGEST}"),
            &format!("agent:1@sha256:{DIGEST}"),
            // short hex is a name, not an id
            "abc123",
        ] {
            assert!(matches!(r(good), ImageRef::Name(_)), "{good:?}");
            assert!(is_image_name(good), "{good:?}");
        }
    }

    #[test]
    fn hostile_and_malformed_references_are_refused() {
        let long_tag = format!("agent:{}", "t".repeat(MAX_TAG + 1));
        let long_name = "a".repeat(MAX_NAME + 1);
        let too_long = "a/".repeat(300);
        type Want = fn(&ImageRefError) -> bool;
        let cases: &[(&str, Want)] = &[
            ("", |e| matches!(e, ImageRefError::Empty)),
            (&too_long, |e| matches!(e, ImageRefError::TooLong(_))),
            ("agent; rm -rf /", |e| {
                matches!(e, ImageRefError::BadChar(_))
            }),
            ("$(id)", |e| matches!(e, ImageRefError::BadChar(_))),
            ("`id`", |e| matches!(e, ImageRefError::BadChar(_))),
            ("{{.Id}}", |e| matches!(e, ImageRefError::BadChar(_))),
            ("agent\n", |e| matches!(e, ImageRefError::BadChar(_))),
            ("agent\0", |e| matches!(e, ImageRefError::BadChar(_))),
            ("agent name", |e| matches!(e, ImageRefError::BadChar(_))),
            ("agént", |e| matches!(e, ImageRefError::BadChar(_))),
            ("-rm", |e| matches!(e, ImageRefError::BadName(_))),
            ("--format=x", |e| matches!(e, ImageRefError::BadChar(_))),
            ("Agent", |e| matches!(e, ImageRefError::BadName(_))),
            ("localhost/Agent:1", |e| {
                matches!(e, ImageRefError::BadName(_))
            }),
            ("Quay.IO/agent", |e| matches!(e, ImageRefError::BadName(_))),
            // an uppercase id is no id, and no name either
            (&ID.to_uppercase(), |e| {
                matches!(e, ImageRefError::BadName(_))
            }),
            // too long for an id: a name of 65 hex digits is allowed by the
            // grammar, so only the id forms are checked here
            (&format!("sha256:{ID}0"), |e| {
                matches!(e, ImageRefError::BadDigest(_))
            }),
            ("sha256:abc", |e| matches!(e, ImageRefError::BadDigest(_))),
            (&format!("agent@sha256:{}", &DIGEST[..63]), |e| {
                matches!(e, ImageRefError::BadDigest(_))
            }),
            (&format!("agent@sha256:{}", DIGEST.to_uppercase()), |e| {
                matches!(e, ImageRefError::BadDigest(_))
            }),
            (&format!("agent@sha512:{DIGEST}"), |e| {
                matches!(e, ImageRefError::BadDigest(_))
            }),
            (&format!("agent@sha256:{DIGEST}@sha256:{DIGEST}"), |e| {
                matches!(e, ImageRefError::BadDigest(_))
            }),
            ("agent@", |e| matches!(e, ImageRefError::BadDigest(_))),
            ("agent:", |e| matches!(e, ImageRefError::BadTag(_))),
            ("agent:.x", |e| matches!(e, ImageRefError::BadTag(_))),
            (&long_tag, |e| matches!(e, ImageRefError::BadTag(_))),
            (&long_name, |e| matches!(e, ImageRefError::BadName(_))),
            (":tag", |e| matches!(e, ImageRefError::BadName(_))),
            ("/agent", |e| matches!(e, ImageRefError::BadName(_))),
            ("agent/", |e| matches!(e, ImageRefError::BadName(_))),
            ("a//b", |e| matches!(e, ImageRefError::BadName(_))),
            ("../etc", |e| matches!(e, ImageRefError::BadName(_))),
            ("a..b", |e| matches!(e, ImageRefError::BadName(_))),
            ("a___b", |e| matches!(e, ImageRefError::BadName(_))),
            ("a.", |e| matches!(e, ImageRefError::BadName(_))),
            ("host:99999999/agent", |e| {
                matches!(e, ImageRefError::BadName(_))
            }),
            ("-bad.io/agent", |e| matches!(e, ImageRefError::BadName(_))),
        ];
        for (bad, want) in cases {
            match bad.parse::<ImageRef>() {
                Err(e) => assert!(want(&e), "{bad:?}: {e:?}"),
                Ok(v) => panic!("{bad:?} parsed as {v:?}"),
            }
            assert!(!is_image_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn references_match_the_names_engines_give() {
        let m = |reference: &str, name: Option<&str>| r(reference).matches(name, ID);
        // Podman names local images localhost/..., pulled ones in full
        let podman = Some("localhost/agent:1.2");
        for yes in [
            "agent",
            "agent:1.2",
            "localhost/agent",
            "localhost/agent:1.2",
        ] {
            assert!(m(yes, podman), "{yes:?}");
        }
        for no in [
            "agent:1.3",
            "agen",
            "agent2",
            "team/agent",
            "quay.io/agent:1.2",
            "localhost:5000/agent",
            "docker.io/agent",
        ] {
            assert!(!m(no, podman), "{no:?}");
        }
        let hub = Some("docker.io/library/alpine:3.19");
        for yes in [
            "alpine",
            "alpine:3.19",
            "library/alpine",
            "docker.io/alpine:3.19",
            "docker.io/library/alpine",
        ] {
            assert!(m(yes, hub), "{yes:?}");
        }
        assert!(!m("localhost/alpine", hub));
        assert!(!m("alpine:latest", hub));
        // Docker keeps the name as given at run: no tag is latest
        assert!(m("alpine:latest", Some("alpine")));
        assert!(m("docker.io/library/alpine", Some("alpine")));
        assert!(!m("alpine:3.19", Some("alpine")));
        // another registry is matched only when named
        let quay = Some("quay.io/team/agent:v1");
        assert!(m("quay.io/team/agent", quay));
        assert!(!m("team/agent", quay));
        assert!(!m("agent", quay));
        // digests
        let pinned = format!("localhost/agent@sha256:{DIGEST}");
        assert!(m(&format!("agent@sha256:{DIGEST}"), Some(&pinned)));
        assert!(m("agent", Some(&pinned)));
        assert!(!m("agent:1.2", Some(&pinned)));
        assert!(!m(&format!("agent@sha256:{DIGEST}"), podman));
        let other = format!("agent@sha256:{}", "1".repeat(64));
        assert!(!m(&other, Some(&pinned)));
        // ids: by prefix, whatever the name
        assert!(m(&ID[..12], None));
        assert!(m(&format!("sha256:{}", &ID[..20]), podman));
        assert!(!r(&OTHER[..12]).matches(podman, ID));
        // an unknown or malformed engine name matches no name
        assert!(!m("agent", None));
        assert!(!m("agent", Some("")));
        assert!(!m("agent", Some("<none>")));
        assert!(!m("agent", Some("localhost/Agent:1.2")));
        assert!(!m("agent", Some("agent;id")));
    }
}
