//! Signed tree heads in the C2SP formats, so that any tlog tooling (and any
//! auditor with a few lines of code) can check them:
//!
//! * `tlog-checkpoint` body: origin line, decimal tree size, base64 root hash,
//!   then optional extension lines, each line ending in `\n`.
//! * `signed-note`: the body, one blank line, then signature lines
//!   `— <key name> <base64(key id || signature)>` (U+2014 EM DASH, space).
//!   For Ed25519 the key id is the first 4 bytes of
//!   SHA-256(key name || 0x0A || 0x01 || 32-byte public key), and the signature
//!   covers the body bytes exactly.
//!
//! kya adds one extension line, `kya-vkey <name>+<hex key id>+<base64(0x01 || public key)>`
//! (the signed-note verifier-key encoding), so a verifier without the public key
//! file can still name the key that signed. That only proves integrity relative
//! to that key, not who held it; `kya audit verify --key` pins the key.
//!
//! The checkpoint file holds one signed note after another, separated by one
//! extra blank line.

use super::merkle::Hash;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// The signature line prefix: EM DASH and a space.
pub const SIG_PREFIX: &str = "\u{2014} ";
/// The extension line carrying the verifier key.
pub const VKEY_EXTENSION: &str = "kya-vkey ";
/// The signed-note algorithm byte for Ed25519.
const ALG_ED25519: u8 = 0x01;
/// Notes longer than this are not checkpoints (a hostile file cannot make us buffer more).
pub const MAX_NOTE_BYTES: usize = 16 * 1024;

/// What is wrong with a checkpoint or signed note.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    #[error("invalid key name {0:?} (must be non-empty, without spaces or '+')")]
    BadKeyName(String),
    #[error("no signature by key {name} (id {key_id}); signatures present: {present}")]
    NoSignatureByKey {
        name: String,
        key_id: String,
        present: String,
    },
    #[error("signature by key {name} does not verify")]
    BadSignature { name: String },
}

/// A tree head: the claim "the log named `origin` had `size` records with this root".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// Extension lines, verbatim and in order (without their newline).
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The note body in tlog-checkpoint form (ends with a newline).
    pub fn body(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for e in &self.extensions {
            s.push_str(e);
            s.push('\n');
        }
        s
    }

    /// Parse a body strictly: canonical decimal size, 32-byte canonical base64 root.
    pub fn parse_body(body: &str) -> Result<Self, CheckpointError> {
        let bad = |m: &str| CheckpointError::Malformed(m.to_string());
        let Some(text) = body.strip_suffix('\n') else {
            return Err(bad("body does not end with a newline"));
        };
        let mut lines = text.split('\n');
        let origin = lines.next().unwrap_or_default();
        if origin.is_empty() {
            return Err(bad("empty origin line"));
        }
        let size_line = lines.next().ok_or_else(|| bad("missing tree size line"))?;
        let size =
            parse_decimal(size_line).ok_or_else(|| bad("tree size is not a canonical decimal"))?;
        let root_line = lines.next().ok_or_else(|| bad("missing root hash line"))?;
        let root = decode_canonical(root_line)
            .and_then(|v| <Hash>::try_from(v.as_slice()).ok())
            .ok_or_else(|| bad("root hash is not 32 bytes of canonical base64"))?;
        let mut extensions = Vec::new();
        for e in lines {
            if e.is_empty() {
                return Err(bad("empty extension line"));
            }
            extensions.push(e.to_string());
        }
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }

    /// The verifier key named in the `kya-vkey` extension line, if any.
    pub fn embedded_key(&self) -> Option<Result<(String, VerifyingKey), CheckpointError>> {
        self.extensions
            .iter()
            .find_map(|e| e.strip_prefix(VKEY_EXTENSION))
            .map(parse_verifier_key)
    }
}

fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Decode standard padded base64, refusing any encoding that does not round-trip
/// (so one stored value has exactly one text form).
fn decode_canonical(s: &str) -> Option<Vec<u8>> {
    let v = B64.decode(s).ok()?;
    (B64.encode(&v) == s).then_some(v)
}

fn check_key_name(name: &str) -> Result<(), CheckpointError> {
    if name.is_empty() || name.contains(char::is_whitespace) || name.contains('+') {
        return Err(CheckpointError::BadKeyName(name.to_string()));
    }
    Ok(())
}

/// The signed-note key id: first 4 bytes of SHA-256(name || "\n" || 0x01 || public key).
pub fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(key.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// The signed-note verifier key string `<name>+<hex key id>+<base64(0x01 || key)>`.
pub fn verifier_key(name: &str, key: &VerifyingKey) -> String {
    let mut k = vec![ALG_ED25519];
    k.extend_from_slice(key.as_bytes());
    format!(
        "{name}+{}+{}",
        hex::encode(key_id(name, key)),
        B64.encode(k)
    )
}

/// Parse a verifier key string, checking that its key id matches its name and key.
pub fn parse_verifier_key(s: &str) -> Result<(String, VerifyingKey), CheckpointError> {
    let bad = |m: &str| CheckpointError::Malformed(format!("verifier key: {m}"));
    // The base64 key may itself contain '+': split off name and id only.
    let mut parts = s.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected name+id+key"));
    };
    check_key_name(name)?;
    let raw = decode_canonical(key).ok_or_else(|| bad("key is not canonical base64"))?;
    let [alg, rest @ ..] = raw.as_slice() else {
        return Err(bad("empty key"));
    };
    if *alg != ALG_ED25519 {
        return Err(bad("not an Ed25519 key"));
    }
    let bytes: [u8; 32] = rest
        .try_into()
        .map_err(|_| bad("Ed25519 key is not 32 bytes"))?;
    let vk = VerifyingKey::from_bytes(&bytes).map_err(|_| bad("invalid Ed25519 point"))?;
    if hex::encode(key_id(name, &vk)) != id {
        return Err(bad("key id does not match the name and key"));
    }
    Ok((name.to_string(), vk))
}

/// One signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    pub name: String,
    pub key_id: [u8; 4],
    /// The signature bytes after the key id (64 for Ed25519; other lengths are kept so they can be reported).
    pub signature: Vec<u8>,
}

/// A parsed signed note: the exact body text and its signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNote {
    pub body: String,
    pub signatures: Vec<NoteSignature>,
}

impl SignedNote {
    /// Check that a signature by (`name`, `key`) is present and valid. Signatures
    /// by other keys are ignored, as the signed-note spec requires.
    pub fn verify(&self, name: &str, key: &VerifyingKey) -> Result<(), CheckpointError> {
        let id = key_id(name, key);
        let Some(sig) = self
            .signatures
            .iter()
            .find(|s| s.name == name && s.key_id == id)
        else {
            let present = self
                .signatures
                .iter()
                .map(|s| format!("{} ({})", s.name, hex::encode(s.key_id)))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(CheckpointError::NoSignatureByKey {
                name: name.to_string(),
                key_id: hex::encode(id),
                present,
            });
        };
        let bad = || CheckpointError::BadSignature {
            name: name.to_string(),
        };
        let bytes: [u8; 64] = sig.signature.as_slice().try_into().map_err(|_| bad())?;
        key.verify_strict(self.body.as_bytes(), &Signature::from_bytes(&bytes))
            .map_err(|_| bad())
    }

    /// Render the note: body, blank line, signature lines.
    pub fn render(&self) -> String {
        let mut s = self.body.clone();
        s.push('\n');
        for sig in &self.signatures {
            let mut blob = sig.key_id.to_vec();
            blob.extend_from_slice(&sig.signature);
            s.push_str(&format!("{SIG_PREFIX}{} {}\n", sig.name, B64.encode(blob)));
        }
        s
    }
}

/// Sign `body` as key `name`.
pub fn sign(body: &str, name: &str, key: &SigningKey) -> Result<SignedNote, CheckpointError> {
    check_key_name(name)?;
    let sig = key.sign(body.as_bytes());
    Ok(SignedNote {
        body: body.to_string(),
        signatures: vec![NoteSignature {
            name: name.to_string(),
            key_id: key_id(name, &key.verifying_key()),
            signature: sig.to_bytes().to_vec(),
        }],
    })
}

/// A note found in a checkpoint file, with the 1-based line its body starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNote {
    pub line: u64,
    pub note: SignedNote,
}

/// A fault in a checkpoint file, at a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFault {
    pub line: u64,
    pub what: String,
}

/// An incomplete final note: exactly what a write cut short by a crash leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornNote {
    /// 1-based line where it starts.
    pub line: u64,
    /// Byte offset where it starts (the writer truncates the file here).
    pub offset: u64,
}

/// The notes of a checkpoint file, and an incomplete final note if there is one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedFile {
    pub notes: Vec<FileNote>,
    pub torn: Option<TornNote>,
}

/// Parse a checkpoint file: notes separated by blank lines. Strict: anything
/// that is not body-blank-signatures is a fault at its line, except one
/// incomplete final note that is a byte-for-byte plausible prefix of what the
/// writer emits (a crash mid-write). Dropping a final note that way gains an
/// attacker nothing: removing whole final notes is equally undetectable
/// without an outside witness of the latest checkpoint.
pub fn parse_file(text: &str) -> Result<ParsedFile, FileFault> {
    let fault = |line: u64, what: &str| FileFault {
        line,
        what: what.to_string(),
    };
    let (complete, partial) = match text.rfind('\n') {
        Some(i) => (&text[..=i], &text[i + 1..]),
        None => ("", text),
    };
    let mut lines: Vec<&str> = complete.split('\n').collect();
    lines.pop(); // the empty element after the final newline
    let mut offsets = Vec::with_capacity(lines.len() + 1);
    let mut at = 0u64;
    for l in &lines {
        offsets.push(at);
        at += l.len() as u64 + 1;
    }
    offsets.push(at);
    let n = lines.len();
    let mut notes = Vec::new();
    let mut torn_from: Option<usize> = None;
    let mut i = 0;
    let mut after_separator = true;
    while i < n {
        if lines[i].is_empty() {
            after_separator = true;
            i += 1;
            continue;
        }
        if !after_separator {
            return Err(fault(
                i as u64 + 1,
                "expected a blank line between checkpoints",
            ));
        }
        let start = i;
        let mut body = String::new();
        while i < n && !lines[i].is_empty() {
            if lines[i].starts_with(SIG_PREFIX) {
                return Err(fault(
                    i as u64 + 1,
                    "signature line inside a checkpoint body",
                ));
            }
            body.push_str(lines[i]);
            body.push('\n');
            if body.len() > MAX_NOTE_BYTES {
                return Err(fault(start as u64 + 1, "checkpoint note too large"));
            }
            i += 1;
        }
        if i >= n {
            torn_from = Some(start);
            break;
        }
        i += 1; // the blank line
        if i >= n {
            torn_from = Some(start);
            break;
        }
        let mut signatures = Vec::new();
        while i < n && !lines[i].is_empty() {
            let line_no = i as u64 + 1;
            let Some(rest) = lines[i].strip_prefix(SIG_PREFIX) else {
                return Err(fault(
                    line_no,
                    "expected a signature line (\u{2014} name signature)",
                ));
            };
            let mut parts = rest.split(' ');
            let (Some(name), Some(blob), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(fault(
                    line_no,
                    "signature line is not `\u{2014} <name> <base64>`",
                ));
            };
            check_key_name(name).map_err(|e| fault(line_no, &e.to_string()))?;
            let blob = decode_canonical(blob)
                .ok_or_else(|| fault(line_no, "signature is not canonical base64"))?;
            if blob.len() < 5 {
                return Err(fault(line_no, "signature too short"));
            }
            signatures.push(NoteSignature {
                name: name.to_string(),
                key_id: [blob[0], blob[1], blob[2], blob[3]],
                signature: blob[4..].to_vec(),
            });
            i += 1;
        }
        if signatures.is_empty() {
            return Err(fault(i as u64 + 1, "checkpoint has no signature lines"));
        }
        after_separator = false;
        notes.push(FileNote {
            line: start as u64 + 1,
            note: SignedNote { body, signatures },
        });
    }
    let partial = (!partial.is_empty()).then_some(partial);
    let torn_start = match (torn_from, partial) {
        (Some(start), _) => Some(start),
        (None, Some(_)) if after_separator => Some(n),
        (None, Some(_)) => {
            return Err(fault(
                n as u64 + 1,
                "file does not end with a newline (truncated?)",
            ));
        }
        (None, None) => None,
    };
    let torn = match torn_start {
        None => None,
        Some(start) => {
            if !plausible_prefix(&lines[start..n], partial) {
                return Err(fault(
                    start as u64 + 1,
                    "incomplete final checkpoint that is not a write cut short (altered?)",
                ));
            }
            Some(TornNote {
                line: start as u64 + 1,
                offset: offsets[start],
            })
        }
    };
    Ok(ParsedFile { notes, torn })
}

/// Whether `lines` (complete) and `partial` (an unterminated last line) can be
/// the start of a note as kya writes it: origin, size, root, `kya-vkey` line,
/// blank line, one signature line.
fn plausible_prefix(lines: &[&str], partial: Option<&str>) -> bool {
    let elements: Vec<(&str, bool)> = lines
        .iter()
        .map(|l| (*l, true))
        .chain(partial.map(|p| (p, false)))
        .collect();
    if elements.is_empty() || elements.len() > 6 {
        return false;
    }
    let b64 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
    };
    let token = |s: &str| !s.chars().any(|c| c.is_whitespace() || c.is_control());
    elements
        .iter()
        .enumerate()
        .all(|(index, &(s, complete))| match index {
            0 => !s.is_empty() && token(s),
            1 => (!complete || !s.is_empty()) && s.bytes().all(|b| b.is_ascii_digit()),
            2 => (!complete || !s.is_empty()) && b64(s),
            3 => {
                if s.len() < VKEY_EXTENSION.len() {
                    !complete && VKEY_EXTENSION.starts_with(s)
                } else {
                    s.strip_prefix(VKEY_EXTENSION).is_some_and(token)
                }
            }
            4 => complete && s.is_empty(),
            // A complete signature line would have made the note complete.
            _ => {
                !complete
                    && if s.len() < SIG_PREFIX.len() {
                        SIG_PREFIX.starts_with(s)
                    } else {
                        s.strip_prefix(SIG_PREFIX).is_some_and(|rest| {
                            let mut parts = rest.splitn(2, ' ');
                            let name = parts.next().unwrap_or_default();
                            !name.contains('+') && token(name) && parts.next().is_none_or(b64)
                        })
                    }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn sample(size: u64) -> Checkpoint {
        Checkpoint {
            origin: "kya.example/audit".into(),
            size,
            root: [size as u8; 32],
            extensions: vec![format!(
                "{VKEY_EXTENSION}{}",
                verifier_key("kya", &key(1).verifying_key())
            )],
        }
    }

    #[test]
    fn key_id_follows_the_signed_note_spec() {
        let k = key(9).verifying_key();
        let mut input = b"example.com/log\n".to_vec();
        input.push(0x01);
        input.extend_from_slice(k.as_bytes());
        let d = Sha256::digest(&input);
        assert_eq!(key_id("example.com/log", &k), [d[0], d[1], d[2], d[3]]);
        let vkey = verifier_key("example.com/log", &k);
        assert_eq!(
            parse_verifier_key(&vkey).unwrap(),
            ("example.com/log".into(), k)
        );
        // Keys whose base64 contains '+' (many do) parse too.
        let mut plus = 0;
        for seed in 0..=255u8 {
            let k = key(seed).verifying_key();
            let vkey = verifier_key("n", &k);
            plus += usize::from(vkey.matches('+').count() > 2);
            assert_eq!(
                parse_verifier_key(&vkey).unwrap(),
                ("n".into(), k),
                "{vkey}"
            );
        }
        assert!(plus > 0, "no test key had a '+' in its base64");
        // Same key under another name, or a wrong id: refused.
        let other = vkey.replacen("example.com/log", "other", 1);
        assert!(parse_verifier_key(&other).is_err());
        assert!(parse_verifier_key("a+b").is_err());
        assert!(parse_verifier_key("a+00000000+AQ==").is_err());
        assert!(parse_verifier_key("a b+00000000+AQ==").is_err());
    }

    #[test]
    fn body_round_trips_and_renders_in_checkpoint_form() {
        let c = sample(42);
        let body = c.body();
        let mut lines = body.lines();
        assert_eq!(lines.next(), Some("kya.example/audit"));
        assert_eq!(lines.next(), Some("42"));
        assert_eq!(lines.next(), Some(B64.encode([42u8; 32]).as_str()));
        assert_eq!(Checkpoint::parse_body(&body).unwrap(), c);
        let (name, vk) = c.embedded_key().unwrap().unwrap();
        assert_eq!((name.as_str(), vk), ("kya", key(1).verifying_key()));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let root = B64.encode([0u8; 32]);
        for body in [
            String::new(),
            "origin\n".to_string(),
            format!("origin\n01\n{root}\n"),
            format!("origin\n+1\n{root}\n"),
            format!("origin\n-1\n{root}\n"),
            format!("origin\n18446744073709551616\n{root}\n"),
            format!("origin\n1\n{root}"),
            "origin\n1\nAAAA\n".to_string(),
            format!("origin\n1\n{}\n", &root[..root.len() - 1]),
            format!("\n1\n{root}\n"),
            format!("origin\n1\n{root}\n\n"),
        ] {
            assert!(Checkpoint::parse_body(&body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn sign_verify_and_reject_other_keys_and_edits() {
        let body = sample(7).body();
        let note = sign(&body, "kya", &key(1)).unwrap();
        note.verify("kya", &key(1).verifying_key()).unwrap();
        assert!(matches!(
            note.verify("kya", &key(2).verifying_key()),
            Err(CheckpointError::NoSignatureByKey { .. })
        ));
        assert!(note.verify("other", &key(1).verifying_key()).is_err());
        let mut edited = note.clone();
        edited.body = sample(8).body();
        assert!(matches!(
            edited.verify("kya", &key(1).verifying_key()),
            Err(CheckpointError::BadSignature { .. })
        ));
        let mut cut = note.clone();
        cut.signatures[0].signature.truncate(10);
        assert!(cut.verify("kya", &key(1).verifying_key()).is_err());
        assert!(sign(&body, "bad name", &key(1)).is_err());
        assert!(sign(&body, "", &key(1)).is_err());
    }

    #[test]
    fn files_of_notes_parse_and_hostile_files_fault_with_a_line() {
        let a = sign(&sample(1).body(), "kya", &key(1)).unwrap();
        let b = sign(&sample(2).body(), "kya", &key(1)).unwrap();
        let text = format!("{}\n{}\n", a.render(), b.render());
        let parsed = parse_file(&text).unwrap();
        assert_eq!(parsed.torn, None);
        let notes = parsed.notes;
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].line, 1);
        assert_eq!(notes[0].note, a);
        assert_eq!(notes[1].note, b);
        assert_eq!(parse_file("").unwrap(), ParsedFile::default());

        let sig_line = a.render().lines().last().unwrap().to_string();
        for bad in [
            "no newline".to_string(),
            "origin\n1\n\n".to_string(),
            "origin\n1\nAAAA\nkya-vkey x\nmore\n".to_string(),
            format!("origin\n{sig_line}\n\n{sig_line}\n"),
            "origin\n\n- kya AAAA\n".to_string(),
            "origin\n\n\u{2014} kya\n".to_string(),
            "origin\n\n\u{2014} kya !!!!\n".to_string(),
            "origin\n\n\u{2014} kya AAAA\n".to_string(),
            format!("{}\n", "x".repeat(MAX_NOTE_BYTES + 10)),
        ] {
            let err = parse_file(&bad).unwrap_err();
            assert!(err.line >= 1, "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn every_cut_short_write_is_a_torn_note_and_nothing_else_is() {
        let a = sign(&sample(1).body(), "kya", &key(1)).unwrap().render() + "\n";
        let b = sign(&sample(2).body(), "kya", &key(1)).unwrap().render() + "\n";
        let whole = format!("{a}{b}");
        for cut in a.len()..=whole.len() {
            let Some(prefix) = whole.get(..cut) else {
                continue; // inside the em dash: the verifier handles a split UTF-8 sequence
            };
            let parsed = parse_file(prefix).unwrap_or_else(|e| panic!("cut at {cut}: {e:?}"));
            assert_eq!(
                parsed.notes.len(),
                if parsed.torn.is_some() {
                    1
                } else {
                    parsed.notes.len()
                }
            );
            match parsed.torn {
                Some(t) => assert_eq!(t.offset as usize, a.len(), "cut at {cut}"),
                None => assert!(
                    cut == a.len() || cut + 1 >= whole.len(),
                    "cut at {cut} parsed whole"
                ),
            }
        }
        // Changing a byte at the end of the last note is not a tear.
        for (at, to) in [
            (whole.len() - 1, 0x0bu8),
            (whole.len() - 1, b'*'),
            (whole.len() - 2, 0x0b),
            (whole.len() - 3, b'!'),
        ] {
            let mut bytes = whole.clone().into_bytes();
            bytes[at] = to;
            let text = String::from_utf8(bytes).unwrap();
            assert!(
                parse_file(&text).is_err(),
                "byte {at} -> {to}: {:?}",
                parse_file(&text)
            );
        }
        // A body line that the writer never writes is not a tear either.
        assert!(parse_file(&format!("{a}origin\n1\nAAAA\nkya-vkey x\n*\n")).is_err());
    }
}
