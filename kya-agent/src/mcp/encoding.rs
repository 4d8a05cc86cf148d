//! `Content-Encoding` decoding, bounded, so compressed bodies are judged too.
//!
//! A body kya cannot decode is a body it cannot judge, so every encoding other than
//! `identity`, `gzip` (`x-gzip`), `deflate` (zlib, as RFC 9110 defines it) and `br`
//! is an error and the caller denies. Output is capped ([`decode`]'s `max_output`)
//! so a small zip bomb cannot exhaust memory, bytes after the end of a compressed
//! stream are an error (a second parser might read them), and at most
//! [`MAX_LAYERS`] stacked encodings are undone.

use std::io::Read;

use http::header::CONTENT_ENCODING;
use http::HeaderMap;

/// Most stacked encodings undone; real clients use one.
pub const MAX_LAYERS: usize = 2;

/// One content coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Brotli,
}

/// Why a body cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    #[error("unsupported content encoding {0:?}")]
    Unsupported(String),
    #[error("more than {MAX_LAYERS} stacked content encodings")]
    TooManyLayers,
    #[error("Content-Encoding is not visible ASCII")]
    NotText,
    #[error("decoded body exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("corrupt {coding:?} data: {detail}")]
    Corrupt { coding: Coding, detail: String },
    #[error("data after the end of the {0:?} stream")]
    TrailingData(Coding),
}

/// The codings named by every `Content-Encoding` header, in the order applied.
/// `identity` entries are dropped.
pub fn codings(headers: &HeaderMap) -> Result<Vec<Coding>, EncodingError> {
    let mut out = Vec::new();
    for value in headers.get_all(CONTENT_ENCODING) {
        let text = value.to_str().map_err(|_| EncodingError::NotText)?;
        for token in text.split(',') {
            let token = token.trim();
            let coding = match token.to_ascii_lowercase().as_str() {
                "" | "identity" => continue,
                "gzip" | "x-gzip" => Coding::Gzip,
                "deflate" => Coding::Deflate,
                "br" => Coding::Brotli,
                _ => return Err(EncodingError::Unsupported(token.to_string())),
            };
            out.push(coding);
            if out.len() > MAX_LAYERS {
                return Err(EncodingError::TooManyLayers);
            }
        }
    }
    Ok(out)
}

/// Undo `codings` (listed in the order they were applied) on `body`; the result and
/// every intermediate layer are at most `max_output` bytes.
pub fn decode(
    codings: &[Coding],
    body: &[u8],
    max_output: usize,
) -> Result<Vec<u8>, EncodingError> {
    if codings.len() > MAX_LAYERS {
        return Err(EncodingError::TooManyLayers);
    }
    let mut data = body.to_vec();
    for coding in codings.iter().rev() {
        data = decode_one(*coding, &data, max_output)?;
    }
    Ok(data)
}

/// Decode a body according to its headers.
pub fn decode_body(
    headers: &HeaderMap,
    body: &[u8],
    max_output: usize,
) -> Result<Vec<u8>, EncodingError> {
    let codings = codings(headers)?;
    if codings.is_empty() {
        if body.len() > max_output {
            return Err(EncodingError::TooLarge { limit: max_output });
        }
        return Ok(body.to_vec());
    }
    decode(&codings, body, max_output)
}

fn read_bounded(
    coding: Coding,
    reader: &mut impl Read,
    max_output: usize,
) -> Result<Vec<u8>, EncodingError> {
    let mut out = Vec::new();
    let cap = u64::try_from(max_output)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| EncodingError::Corrupt {
            coding,
            detail: e.to_string(),
        })?;
    if out.len() > max_output {
        return Err(EncodingError::TooLarge { limit: max_output });
    }
    Ok(out)
}

fn decode_one(coding: Coding, input: &[u8], max_output: usize) -> Result<Vec<u8>, EncodingError> {
    match coding {
        Coding::Gzip => {
            // Multi-member gzip is legal and what `gzip -c a b` produces.
            let mut d = flate2::bufread::MultiGzDecoder::new(input);
            let out = read_bounded(coding, &mut d, max_output)?;
            if !d.into_inner().is_empty() {
                return Err(EncodingError::TrailingData(coding));
            }
            Ok(out)
        }
        Coding::Deflate => {
            let mut d = flate2::bufread::ZlibDecoder::new(input);
            let out = read_bounded(coding, &mut d, max_output)?;
            if !d.into_inner().is_empty() {
                return Err(EncodingError::TrailingData(coding));
            }
            Ok(out)
        }
        Coding::Brotli => {
            let mut d = brotli::Decompressor::new(input, 4096);
            let out = read_bounded(coding, &mut d, max_output)?;
            // At the end of the stream one more read returns 0 only if no bytes are
            // left in the decompressor's buffer; then the source itself must be empty.
            let mut probe = [0u8; 1];
            if !matches!(d.read(&mut probe), Ok(0)) || !d.into_inner().is_empty() {
                return Err(EncodingError::TrailingData(coding));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;
    use std::io::Write;

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn br(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            w.write_all(data).unwrap();
        }
        out
    }

    fn hdr(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const BODY: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;

    #[test]
    fn decodes_each_coding() {
        assert_eq!(
            decode_body(&hdr(&["gzip"]), &gzip(BODY), 1024).unwrap(),
            BODY
        );
        assert_eq!(
            decode_body(&hdr(&["X-GZIP"]), &gzip(BODY), 1024).unwrap(),
            BODY
        );
        assert_eq!(
            decode_body(&hdr(&["deflate"]), &zlib(BODY), 1024).unwrap(),
            BODY
        );
        assert_eq!(decode_body(&hdr(&["br"]), &br(BODY), 1024).unwrap(), BODY);
        assert_eq!(decode_body(&hdr(&[]), BODY, 1024).unwrap(), BODY);
        assert_eq!(decode_body(&hdr(&["identity"]), BODY, 1024).unwrap(), BODY);
    }

    #[test]
    fn stacked_codings_are_undone_in_reverse() {
        let twice = br(&gzip(BODY));
        assert_eq!(
            decode_body(&hdr(&["gzip, br"]), &twice, 1024).unwrap(),
            BODY
        );
        assert_eq!(
            decode_body(&hdr(&["gzip", "br"]), &twice, 1024).unwrap(),
            BODY
        );
        // The wrong order is corrupt data, not a silent pass.
        assert!(decode_body(&hdr(&["br, gzip"]), &twice, 1024).is_err());
        assert_eq!(
            codings(&hdr(&["gzip, gzip, gzip"])),
            Err(EncodingError::TooManyLayers)
        );
    }

    #[test]
    fn unknown_or_malformed_codings_are_refused() {
        for v in ["compress", "zstd", "gzip;q=1", "chunked", "x-compress"] {
            assert!(
                matches!(codings(&hdr(&[v])), Err(EncodingError::Unsupported(_))),
                "{v}"
            );
        }
        let mut h = HeaderMap::new();
        h.append(
            CONTENT_ENCODING,
            HeaderValue::from_bytes(b"gz\xffip").unwrap(),
        );
        assert_eq!(codings(&h), Err(EncodingError::NotText));
    }

    #[test]
    fn zip_bombs_are_bounded() {
        let zeros = vec![0u8; 10 * 1024 * 1024];
        for (coding, data) in [
            (Coding::Gzip, gzip(&zeros)),
            (Coding::Deflate, zlib(&zeros)),
            (Coding::Brotli, br(&zeros)),
        ] {
            assert!(
                data.len() < 64 * 1024,
                "{coding:?} bomb is {} bytes",
                data.len()
            );
            assert_eq!(
                decode(&[coding], &data, 1024 * 1024),
                Err(EncodingError::TooLarge { limit: 1024 * 1024 })
            );
        }
        // The bound holds for the inner layer of a stacked bomb too.
        let nested = gzip(&gzip(&zeros));
        assert!(matches!(
            decode(&[Coding::Gzip, Coding::Gzip], &nested, 1024 * 1024),
            Err(EncodingError::TooLarge { .. })
        ));
        // Exactly at the limit is fine.
        assert_eq!(
            decode(&[Coding::Gzip], &gzip(&zeros[..1000]), 1000)
                .unwrap()
                .len(),
            1000
        );
        assert!(decode_body(&hdr(&[]), &zeros, 1000).is_err());
    }

    #[test]
    fn corrupt_truncated_and_trailing_data() {
        let g = gzip(BODY);
        assert!(matches!(
            decode(&[Coding::Gzip], &g[..g.len() - 4], 1024),
            Err(EncodingError::Corrupt { .. })
        ));
        let mut trailing = g.clone();
        trailing.extend_from_slice(b"{\"smuggled\":1}");
        assert!(decode(&[Coding::Gzip], &trailing, 1024).is_err());
        let mut z = zlib(BODY);
        z.extend_from_slice(b"x");
        assert_eq!(
            decode(&[Coding::Deflate], &z, 1024),
            Err(EncodingError::TrailingData(Coding::Deflate))
        );
        let mut b = br(BODY);
        b.extend_from_slice(b"xyz");
        assert!(decode(&[Coding::Brotli], &b, 1024).is_err());
        // Raw deflate (without the zlib wrapper) is not what `deflate` means.
        assert!(decode(&[Coding::Deflate], &raw_deflate(BODY), 1024).is_err());
        assert!(decode(&[Coding::Gzip], BODY, 1024).is_err());
        assert!(decode(&[Coding::Brotli], b"", 1024).is_err());
        // Two gzip members decode to both.
        let mut two = gzip(b"ab");
        two.extend(gzip(b"cd"));
        assert_eq!(decode(&[Coding::Gzip], &two, 1024).unwrap(), b"abcd");
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            for c in [Coding::Gzip, Coding::Deflate, Coding::Brotli] {
                let _ = decode(&[c], &bytes, 4096);
            }
        }

        #[test]
        fn round_trips(data in prop::collection::vec(any::<u8>(), 0..2048)) {
            prop_assert_eq!(decode(&[Coding::Gzip], &gzip(&data), 4096).unwrap(), data.clone());
            prop_assert_eq!(decode(&[Coding::Deflate], &zlib(&data), 4096).unwrap(), data.clone());
            prop_assert_eq!(decode(&[Coding::Brotli], &br(&data), 4096).unwrap(), data);
        }
    }
}
