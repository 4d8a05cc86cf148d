//! One audit record: a JSON line `{"seq":N,"prev":"<hex>","event":{...}}`.
//!
//! `prev` is the hex SHA-256 of the previous record's line (without its
//! newline); the first record of a log carries [`GENESIS`] (64 zeros). The
//! line's bytes (again without the newline) are the record's Merkle leaf.
//! The writer composes lines byte for byte and the verifier hashes the bytes it
//! reads, so neither depends on how a JSON library orders or spaces fields.

use super::merkle::{leaf_hash, Frontier, Hash};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{self, BufRead};

/// `prev` of the first record.
pub(crate) const GENESIS: Hash = [0; 32];
/// Longest record line the writer produces and the verifier reads (bytes, without newline).
pub(crate) const MAX_LINE_BYTES: usize = 1 << 20;

/// Compose a record line (without newline) from already-serialised event JSON.
pub(crate) fn compose(seq: u64, prev: &Hash, event_json: &[u8]) -> Vec<u8> {
    let head = format!(
        "{{\"seq\":{seq},\"prev\":\"{}\",\"event\":",
        hex::encode(prev)
    );
    let mut line = Vec::with_capacity(head.len() + event_json.len() + 1);
    line.extend_from_slice(head.as_bytes());
    line.extend_from_slice(event_json);
    line.push(b'}');
    line
}

/// SHA-256 of a line: the next record's `prev`.
pub(crate) fn line_hash(line: &[u8]) -> Hash {
    Sha256::digest(line).into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordIn {
    seq: u64,
    prev: String,
    event: serde_json::Value,
}

/// The running state of a log: next sequence number, last line hash, Merkle frontier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub next_seq: u64,
    pub prev: Hash,
    pub tree: Frontier,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            next_seq: 0,
            prev: GENESIS,
            tree: Frontier::new(),
        }
    }
}

impl Chain {
    /// Check that `line` is the next record and append it; on error the chain is unchanged.
    pub fn accept(&mut self, line: &[u8]) -> Result<(), String> {
        let rec: RecordIn =
            serde_json::from_slice(line).map_err(|e| format!("not a valid audit record: {e}"))?;
        if rec.seq != self.next_seq {
            return Err(format!(
                "sequence number {} where {} was expected (a record was deleted, inserted or reordered)",
                rec.seq, self.next_seq
            ));
        }
        if rec.prev != hex::encode(self.prev) {
            return Err(
                "prev hash does not match the SHA-256 of the previous record (this record or the previous one was altered)"
                    .to_string(),
            );
        }
        if !rec.event.is_object() {
            return Err("event is not a JSON object".to_string());
        }
        self.push(line);
        Ok(())
    }

    /// Append a line this process composed itself (the writer's path).
    pub fn push(&mut self, line: &[u8]) {
        self.prev = line_hash(line);
        self.tree.push(leaf_hash(line));
        self.next_seq += 1;
    }
}

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineStatus {
    /// A full line (newline consumed, not stored).
    Complete,
    /// End of input with no bytes.
    Eof,
    /// Bytes without a final newline: a write cut short.
    Unterminated,
    /// Longer than the limit; reading stopped.
    TooLong,
}

/// Read one line into `buf` without ever holding more than `max` bytes of it.
pub(crate) fn read_line<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineStatus> {
    buf.clear();
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                LineStatus::Eof
            } else {
                LineStatus::Unterminated
            });
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(pos) => (pos, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > max {
            return Ok(LineStatus::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(LineStatus::Complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composed_lines_chain_and_mutations_break_it() {
        let mut writer = Chain::default();
        let mut lines = Vec::new();
        for i in 0..5u64 {
            let line = compose(
                writer.next_seq,
                &writer.prev,
                format!("{{\"n\":{i}}}").as_bytes(),
            );
            writer.push(&line);
            lines.push(line);
        }
        let mut reader = Chain::default();
        for l in &lines {
            reader.accept(l).unwrap();
        }
        assert_eq!(reader, writer);

        // Skipping, repeating, altering: each refused, and the chain is unchanged.
        let mut c = Chain::default();
        c.accept(&lines[0]).unwrap();
        let before = c.clone();
        assert!(c.accept(&lines[2]).unwrap_err().contains("sequence"));
        assert!(c.accept(&lines[0]).unwrap_err().contains("sequence"));
        let mut altered = lines[1].clone();
        let at = altered.len() - 20;
        altered[at] ^= 1;
        assert!(c.accept(&altered).unwrap_err().contains("prev"));
        assert_eq!(c, before);
    }

    #[test]
    fn hostile_lines_are_errors() {
        let mut c = Chain::default();
        let g = hex::encode(GENESIS);
        for bad in [
            b"".to_vec(),
            b"garbage".to_vec(),
            vec![0xff, 0xfe, b'{'],
            b"{\"seq\":\"0\",\"prev\":\"\",\"event\":{}}".to_vec(),
            b"{\"seq\":-1,\"prev\":\"\",\"event\":{}}".to_vec(),
            format!("{{\"seq\":0,\"prev\":\"{g}\",\"event\":[]}}").into_bytes(),
            format!("{{\"seq\":0,\"prev\":\"{g}\",\"event\":{{}},\"x\":1}}").into_bytes(),
            format!("{{\"seq\":0,\"seq\":0,\"prev\":\"{g}\",\"event\":{{}}}}").into_bytes(),
            format!(
                "{{\"seq\":0,\"prev\":\"{}\",\"event\":{{}}}}",
                "A".repeat(64)
            )
            .into_bytes(),
            format!("{{\"seq\":0,\"prev\":\"{g}\",\"event\":{{\"a\":\"\u{0}\"}}").into_bytes(),
            [b"[".repeat(100_000), b"]".repeat(100_000)].concat(),
        ] {
            assert!(
                c.accept(&bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(&bad[..bad.len().min(80)])
            );
        }
        assert_eq!(c, Chain::default());
        c.accept(format!("{{\"seq\":0,\"prev\":\"{g}\",\"event\":{{}}}}").as_bytes())
            .unwrap();
    }

    #[test]
    fn bounded_reader_handles_every_shape() {
        let mut buf = Vec::new();
        let mut r = io::BufReader::with_capacity(4, &b"ab\n\ncdefgh\nxyz"[..]);
        assert_eq!(
            read_line(&mut r, &mut buf, 10).unwrap(),
            LineStatus::Complete
        );
        assert_eq!(buf, b"ab");
        assert_eq!(
            read_line(&mut r, &mut buf, 10).unwrap(),
            LineStatus::Complete
        );
        assert!(buf.is_empty());
        assert_eq!(
            read_line(&mut r, &mut buf, 10).unwrap(),
            LineStatus::Complete
        );
        assert_eq!(buf, b"cdefgh");
        assert_eq!(
            read_line(&mut r, &mut buf, 10).unwrap(),
            LineStatus::Unterminated
        );
        assert_eq!(buf, b"xyz");
        assert_eq!(read_line(&mut r, &mut buf, 10).unwrap(), LineStatus::Eof);
        let huge = vec![b'a'; 1000];
        let mut r = io::BufReader::with_capacity(16, &huge[..]);
        assert_eq!(
            read_line(&mut r, &mut buf, 100).unwrap(),
            LineStatus::TooLong
        );
        assert!(buf.len() <= 100);
    }
}
