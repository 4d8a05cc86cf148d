//! `Content-Encoding` decoding, bounded against decompression bombs.
//!
//! A compressed body kya did not decode would be forwarded uninspected, so an
//! encoding outside `gzip`, `deflate`, `br` and `identity` is an error (the caller
//! denies it). The decoded size is capped at the same limit as plain bodies.

use std::io::Read;

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported Content-Encoding {0:?}")]
    Unsupported(String),
    #[error("decoded body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("corrupt {0} body")]
    Corrupt(&'static str),
    #[error("more than one Content-Encoding header")]
    Repeated,
}

/// Decode `body` according to the (comma separated, applied in order) encodings.
/// `None` means no header. The result is at most `limit` bytes.
pub fn decode(header: Option<&str>, body: &[u8], limit: u64) -> Result<Vec<u8>, DecodeError> {
    let Some(header) = header else {
        return Ok(body.to_vec());
    };
    let mut data = body.to_vec();
    // Encodings are listed in the order they were applied; undo them in reverse.
    let codings: Vec<String> = header
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    for coding in codings.iter().rev() {
        data = match coding.as_str() {
            "identity" => data,
            "gzip" | "x-gzip" => {
                read_bounded(flate2::read::GzDecoder::new(&data[..]), limit, "gzip")?
            }
            "deflate" => {
                // RFC 9110 `deflate` is zlib; some peers send raw deflate. Accept zlib only:
                // guessing between two readings is what kya refuses elsewhere.
                read_bounded(flate2::read::ZlibDecoder::new(&data[..]), limit, "deflate")?
            }
            "br" => read_bounded(brotli::Decompressor::new(&data[..], 4096), limit, "br")?,
            other => return Err(DecodeError::Unsupported(other.to_string())),
        };
    }
    Ok(data)
}

fn read_bounded<R: Read>(
    reader: R,
    limit: u64,
    name: &'static str,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    // Read one byte past the limit so "exactly the limit" and "over it" differ.
    let mut take = reader.take(limit.saturating_add(1));
    take.read_to_end(&mut out)
        .map_err(|_| DecodeError::Corrupt(name))?;
    if out.len() as u64 > limit {
        return Err(DecodeError::TooLarge(limit));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn identity_and_absent() {
        assert_eq!(decode(None, b"abc", 10).unwrap(), b"abc");
        assert_eq!(decode(Some("identity"), b"abc", 10).unwrap(), b"abc");
    }

    #[test]
    fn gzip_round_trip() {
        assert_eq!(
            decode(Some("GZIP"), &gz(b"{\"a\":1}"), 100).unwrap(),
            b"{\"a\":1}"
        );
    }

    #[test]
    fn stacked_encodings_undone_in_reverse() {
        let twice = gz(&gz(b"hello"));
        assert_eq!(decode(Some("gzip, gzip"), &twice, 100).unwrap(), b"hello");
    }

    #[test]
    fn bomb_is_bounded() {
        let bomb = gz(&vec![b'a'; 10 * 1024 * 1024]);
        assert!(bomb.len() < 100 * 1024);
        assert_eq!(
            decode(Some("gzip"), &bomb, 1024 * 1024),
            Err(DecodeError::TooLarge(1024 * 1024))
        );
    }

    #[test]
    fn unknown_encoding_is_refused() {
        assert_eq!(
            decode(Some("zstd"), b"x", 10),
            Err(DecodeError::Unsupported("zstd".into()))
        );
        assert!(decode(Some("gzip, compress"), b"x", 10).is_err());
    }

    #[test]
    fn corrupt_bodies_are_refused() {
        assert_eq!(
            decode(Some("gzip"), b"not gzip", 10),
            Err(DecodeError::Corrupt("gzip"))
        );
        assert_eq!(
            decode(Some("deflate"), b"\x00\x01", 10),
            Err(DecodeError::Corrupt("deflate"))
        );
        assert!(decode(Some("br"), b"\xff\xff\xff\xff", 10).is_err());
    }

    #[test]
    fn exact_limit_is_accepted() {
        assert_eq!(decode(Some("gzip"), &gz(b"12345"), 5).unwrap(), b"12345");
        assert!(decode(Some("gzip"), &gz(b"123456"), 5).is_err());
    }
}
