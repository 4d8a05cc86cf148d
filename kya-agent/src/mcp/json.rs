//! A strict, canonical JSON parser and serialiser.
//!
//! kya decides on what it parsed and forwards what it decided on. Anything that two
//! JSON parsers could read differently is therefore an attack surface: a duplicated
//! key (first-wins in one parser, last-wins in another), keys that differ only in
//! case (servers that look keys up case-insensitively), lone surrogates (replaced by
//! U+FFFD in one place, kept in another), numbers that round differently, a BOM or
//! trailing bytes that some parsers skip. This parser rejects all of them with a
//! typed [`JsonError`] so the caller can deny the message (fail closed).
//!
//! # Number rule
//! * An integer literal (no fraction, no exponent) must fit `i64` (or `u64` when it is
//!   positive); otherwise it is rejected. `-0` is the integer `0`.
//! * Any other literal is read as the nearest `f64`. It is accepted only if that
//!   `f64` is finite **and** its shortest round-trip decimal form (the form
//!   [`to_canonical_bytes`] writes) denotes exactly the same decimal value as the
//!   literal. So `0.1`, `1.50`, `1e2` are accepted (they forward as `0.1`, `1.5`,
//!   `100.0`), while `0.10000000000000000001`, `1e400` and `1e-400` are rejected:
//!   forwarding them would change the value an arbitrary-precision upstream sees.
//!
//! # Why forwarding the re-serialisation is safe
//! [`to_canonical_bytes`] writes the [`Value`] the policy saw: keys sorted by their
//! UTF-8 bytes, no insignificant whitespace, only the escapes JSON requires, numbers
//! in the form described above. That output contains none of the ambiguities listed
//! above, so every conforming JSON parser reads it as the same data; and this parser
//! reads it back to the identical [`Value`] (a property test checks
//! `parse(to_canonical_bytes(v)) == v`). The upstream therefore sees exactly what the
//! policy decided on, whatever quirks its own parser has. The caller must forward the
//! new length (and no `Content-Encoding`), since the bytes differ from the original.

use serde_json::{Map, Number, Value};
use std::collections::HashMap;

/// Bounds on what [`parse`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonLimits {
    /// Largest input in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of arrays and objects (the top-level container is depth 1).
    pub max_depth: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        Self {
            max_bytes: 4 * 1024 * 1024,
            max_depth: 64,
        }
    }
}

/// Why an input is not strict canonical JSON. Offsets are byte offsets in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("input of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("empty input")]
    Empty,
    #[error("input starts with a byte order mark")]
    ByteOrderMark,
    #[error("invalid UTF-8 at byte {offset}")]
    InvalidUtf8 { offset: usize },
    #[error("unexpected {found} at byte {offset}, expected {expected}")]
    Unexpected {
        offset: usize,
        found: String,
        expected: &'static str,
    },
    #[error("unexpected end of input, expected {expected}")]
    UnexpectedEnd { expected: &'static str },
    #[error("nesting deeper than {limit} at byte {offset}")]
    TooDeep { offset: usize, limit: usize },
    #[error("duplicate key {key:?} at byte {offset}")]
    DuplicateKey { key: String, offset: usize },
    #[error("keys {first:?} and {second:?} differ only in case (byte {offset})")]
    CaseVariantKey {
        first: String,
        second: String,
        offset: usize,
    },
    #[error("lone surrogate \\u{code:04x} at byte {offset}")]
    LoneSurrogate { code: u16, offset: usize },
    #[error("invalid escape sequence at byte {offset}")]
    InvalidEscape { offset: usize },
    #[error("unescaped control character U+{code:04X} in a string at byte {offset}")]
    ControlCharacter { code: u32, offset: usize },
    #[error("malformed number at byte {offset}")]
    InvalidNumber { offset: usize },
    /// The message gives the number's length, not its digits: errors reach
    /// logs and records, and the number may be a secret argument.
    #[error("a number of {} characters at byte {offset} cannot be represented without loss", text.len())]
    LossyNumber { text: String, offset: usize },
    #[error("trailing data at byte {offset}")]
    TrailingData { offset: usize },
}

/// Parse `input` as one strict canonical JSON value (see the module docs for the rules).
pub fn parse(input: &[u8], limits: &JsonLimits) -> Result<Value, JsonError> {
    if input.len() > limits.max_bytes {
        return Err(JsonError::TooLarge {
            size: input.len(),
            limit: limits.max_bytes,
        });
    }
    if input.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err(JsonError::ByteOrderMark);
    }
    let text = std::str::from_utf8(input).map_err(|e| JsonError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let mut p = Parser {
        text,
        bytes: input,
        pos: 0,
        max_depth: limits.max_depth,
    };
    p.skip_ws();
    if p.pos == p.bytes.len() {
        return Err(JsonError::Empty);
    }
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos != p.bytes.len() {
        return Err(JsonError::TrailingData { offset: p.pos });
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    max_depth: usize,
}

/// A printable description of the character at `offset`, for error messages.
fn describe(text: &str, offset: usize) -> String {
    match text.get(offset..).and_then(|s| s.chars().next()) {
        Some(c) => format!("{c:?}"),
        None => "end of input".to_string(),
    }
}

impl<'a> Parser<'a> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn unexpected(&self, expected: &'static str) -> JsonError {
        if self.pos >= self.bytes.len() {
            JsonError::UnexpectedEnd { expected }
        } else {
            JsonError::Unexpected {
                offset: self.pos,
                found: describe(self.text, self.pos),
                expected,
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        match self.peek() {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.unexpected("a JSON value")),
        }
    }

    fn literal(&mut self, word: &'static str, value: Value) -> Result<Value, JsonError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.unexpected("true, false or null"))
        }
    }

    fn enter(&self, depth: usize) -> Result<(), JsonError> {
        if depth > self.max_depth {
            Err(JsonError::TooDeep {
                offset: self.pos,
                limit: self.max_depth,
            })
        } else {
            Ok(())
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.enter(depth)?;
        self.pos += 1; // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.unexpected("',' or ']'")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.enter(depth)?;
        self.pos += 1; // '{'
        let mut map = Map::new();
        // Folded key -> first spelling; built only once an object is large, since
        // small objects (nearly all of them) are checked faster by a scan.
        let mut folded: Option<HashMap<String, String>> = None;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.unexpected("a string key"));
            }
            let key_offset = self.pos;
            let key = self.string()?;
            check_new_key(&map, &mut folded, &key, key_offset)?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.unexpected("':'"));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self.value(depth)?;
            map.insert(key, value);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                _ => return Err(self.unexpected("',' or '}'")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u16, JsonError> {
        let start = self.pos;
        let digits = self
            .bytes
            .get(start..start + 4)
            .ok_or(JsonError::InvalidEscape { offset: start })?;
        let mut v: u16 = 0;
        for &d in digits {
            let n = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(JsonError::InvalidEscape { offset: start }),
            };
            v = (v << 4) | u16::from(n);
        }
        self.pos += 4;
        Ok(v)
    }

    /// Parse a string starting at the opening quote; returns the decoded text.
    fn string(&mut self) -> Result<String, JsonError> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        let mut run_start = self.pos;
        loop {
            let Some(b) = self.peek() else {
                return Err(JsonError::UnexpectedEnd {
                    expected: "closing '\"'",
                });
            };
            match b {
                b'"' => {
                    out.push_str(&self.text[run_start..self.pos]);
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    out.push_str(&self.text[run_start..self.pos]);
                    let esc_offset = self.pos;
                    self.pos += 1;
                    let Some(e) = self.peek() else {
                        return Err(JsonError::InvalidEscape { offset: esc_offset });
                    };
                    self.pos += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => out.push(self.unicode_escape(esc_offset)?),
                        _ => return Err(JsonError::InvalidEscape { offset: esc_offset }),
                    }
                    run_start = self.pos;
                }
                0x00..=0x1F => {
                    return Err(JsonError::ControlCharacter {
                        code: u32::from(b),
                        offset: self.pos,
                    })
                }
                _ => self.pos += 1,
            }
        }
    }

    /// After `\u`: one BMP escape or a surrogate pair; a lone surrogate is an error.
    fn unicode_escape(&mut self, esc_offset: usize) -> Result<char, JsonError> {
        let hi = self.hex4()?;
        let code = match hi {
            0xD800..=0xDBFF => {
                if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(JsonError::LoneSurrogate {
                        code: hi,
                        offset: esc_offset,
                    });
                }
                self.pos += 2;
                let lo = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&lo) {
                    return Err(JsonError::LoneSurrogate {
                        code: hi,
                        offset: esc_offset,
                    });
                }
                0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00)
            }
            0xDC00..=0xDFFF => {
                return Err(JsonError::LoneSurrogate {
                    code: hi,
                    offset: esc_offset,
                })
            }
            _ => u32::from(hi),
        };
        char::from_u32(code).ok_or(JsonError::InvalidEscape { offset: esc_offset })
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.pos;
        let invalid = JsonError::InvalidNumber { offset: start };
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(invalid); // leading zero
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(invalid),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.pos += 1;
            if self.digits() == 0 {
                return Err(invalid);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            integer = false;
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(invalid);
            }
        }
        let text = &self.text[start..self.pos];
        let lossy = || JsonError::LossyNumber {
            text: text.to_string(),
            offset: start,
        };
        if integer {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Value::Number(Number::from(i)));
            }
            if let Ok(u) = text.parse::<u64>() {
                return Ok(Value::Number(Number::from(u)));
            }
            return Err(lossy());
        }
        let f: f64 = text.parse().map_err(|_| invalid.clone())?;
        let number = Number::from_f64(f).ok_or_else(lossy)?;
        let shortest = number.to_string();
        if decimal_value(text) != decimal_value(&shortest) {
            return Err(lossy());
        }
        Ok(Value::Number(number))
    }
}

/// Objects with fewer keys than this are checked for duplicates by a linear scan.
const SCAN_KEYS: usize = 16;

/// Reject `key` if `map` already has it, or a spelling that differs only in case.
fn check_new_key(
    map: &Map<String, Value>,
    folded: &mut Option<HashMap<String, String>>,
    key: &str,
    offset: usize,
) -> Result<(), JsonError> {
    let clash = |first: &str| {
        if first == key {
            JsonError::DuplicateKey {
                key: key.to_string(),
                offset,
            }
        } else {
            JsonError::CaseVariantKey {
                first: first.to_string(),
                second: key.to_string(),
                offset,
            }
        }
    };
    if folded.is_none() && map.len() < SCAN_KEYS {
        for prior in map.keys() {
            let same = if prior.is_ascii() && key.is_ascii() {
                prior.eq_ignore_ascii_case(key)
            } else {
                fold_case(prior) == fold_case(key)
            };
            if same {
                return Err(clash(prior));
            }
        }
        return Ok(());
    }
    let index = folded.get_or_insert_with(|| {
        map.keys()
            .map(|k| (fold_case(k), k.clone()))
            .collect::<HashMap<_, _>>()
    });
    let fold = fold_case(key);
    if let Some(first) = index.get(&fold) {
        return Err(clash(first));
    }
    index.insert(fold, key.to_string());
    Ok(())
}

/// A decimal number reduced to a unique form: sign, significant digits without
/// leading or trailing zeros, and the power of ten of the last digit. Zero has no
/// digits. Used to check that a float literal survives `f64` unchanged.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

fn decimal_value(text: &str) -> Decimal {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, "0"),
    };
    // A saturating parse: an absurd exponent only matters for values f64 already
    // rejected (infinite) or flushed to zero (which then differs in digits).
    let exp_value: i64 = {
        let (neg, digits) = match exp.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, exp.strip_prefix('+').unwrap_or(exp)),
        };
        let mut v: i64 = 0;
        for d in digits.bytes() {
            v = v
                .saturating_mul(10)
                .saturating_add(i64::from(d.saturating_sub(b'0')));
        }
        if neg {
            -v
        } else {
            v
        }
    };
    let (int_part, frac_part) = match mantissa.find('.') {
        Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
        None => (mantissa, ""),
    };
    let all: String = format!("{int_part}{frac_part}");
    let frac_len = i64::try_from(frac_part.len()).unwrap_or(i64::MAX);
    let trimmed_lead = all.trim_start_matches('0');
    let trimmed = trimmed_lead.trim_end_matches('0');
    let trailing = i64::try_from(trimmed_lead.len() - trimmed.len()).unwrap_or(i64::MAX);
    if trimmed.is_empty() {
        return Decimal {
            negative,
            digits: String::new(),
            exponent: 0,
        };
    }
    Decimal {
        negative,
        digits: trimmed.to_string(),
        exponent: exp_value.saturating_sub(frac_len).saturating_add(trailing),
    }
}

/// The key two spellings share when they differ only in case. Upper- then
/// lower-casing also folds forms such as U+017F (long s) and U+212A (Kelvin sign)
/// onto their ASCII look-alikes, which case-insensitive lookups elsewhere may do.
pub fn fold_case(key: &str) -> String {
    if key.is_ascii() {
        key.to_ascii_lowercase()
    } else {
        key.to_uppercase().to_lowercase()
    }
}

/// Serialise `value` canonically (see the module docs): what kya forwards.
pub fn to_canonical_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

/// Append the canonical serialisation of `value` to `out`.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut run_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0C => Some(b"\\f"),
            0x00..=0x1F => Some(b""),
            _ => None,
        };
        if let Some(esc) = escape {
            out.extend_from_slice(&bytes[run_start..i]);
            if esc.is_empty() {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xF)]);
            } else {
                out.extend_from_slice(esc);
            }
            run_start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn p(s: &str) -> Result<Value, JsonError> {
        parse(s.as_bytes(), &JsonLimits::default())
    }

    fn canon(s: &str) -> String {
        String::from_utf8(to_canonical_bytes(&p(s).unwrap())).unwrap()
    }

    #[test]
    fn parses_ordinary_documents() {
        assert_eq!(
            p(r#" {"a": [1, -2, 3.5, true, false, null, "x"], "b": {}} "#).unwrap(),
            json!({"a": [1, -2, 3.5, true, false, null, "x"], "b": {}})
        );
        assert_eq!(p("[]").unwrap(), json!([]));
        assert_eq!(p("\"\"").unwrap(), json!(""));
        assert_eq!(p("0").unwrap(), json!(0));
        assert_eq!(p("\t\r\n 7 \n").unwrap(), json!(7));
    }

    #[test]
    fn escapes_decode_before_anything_is_decided() {
        assert_eq!(p(r#""tools\u002fcall""#).unwrap(), json!("tools/call"));
        assert_eq!(p(r#""tools\/call""#).unwrap(), json!("tools/call"));
        assert_eq!(
            p(r#""\"\\\b\f\n\r\t\u00e9\uD83D\uDE00""#).unwrap(),
            json!("\"\\\u{8}\u{c}\n\r\té😀")
        );
        assert_eq!(p(r#""\u0000""#).unwrap(), json!("\u{0}"));
    }

    #[test]
    fn rejects_duplicate_keys_even_when_escaped() {
        assert!(matches!(
            p(r#"{"a":1,"a":2}"#),
            Err(JsonError::DuplicateKey { ref key, .. }) if key == "a"
        ));
        assert!(matches!(
            p(r#"{"name":1,"n\u0061me":2}"#),
            Err(JsonError::DuplicateKey { .. })
        ));
        assert!(matches!(
            p(r#"{"x":{"a":1,"b":{"c":1,"c":1}}}"#),
            Err(JsonError::DuplicateKey { .. })
        ));
        // The same key in sibling objects is fine.
        assert!(p(r#"[{"a":1},{"a":2}]"#).is_ok());
        // Large objects (past the linear-scan size) are checked as strictly.
        let keys: Vec<String> = (0..100).map(|i| format!("\"k{i}\":{i}")).collect();
        let big = |extra: &str| format!("{{{},{extra}}}", keys.join(","));
        assert!(p(&big("\"k100\":0")).is_ok());
        assert!(matches!(
            p(&big("\"k3\":0")),
            Err(JsonError::DuplicateKey { ref key, .. }) if key == "k3"
        ));
        assert!(matches!(
            p(&big("\"K99\":0")),
            Err(JsonError::CaseVariantKey { ref first, .. }) if first == "k99"
        ));
        assert!(matches!(
            p(&big(r#""k\u0031":0"#)),
            Err(JsonError::DuplicateKey { .. })
        ));
        // A hostile object with very many keys stays linear-time.
        let many: Vec<String> = (0..100_000).map(|i| format!("\"{i}\":0")).collect();
        assert!(p(&format!("{{{}}}", many.join(","))).is_ok());
    }

    #[test]
    fn rejects_case_variant_keys() {
        assert!(matches!(
            p(r#"{"name":"a","Name":"b"}"#),
            Err(JsonError::CaseVariantKey { ref first, ref second, .. })
                if first == "name" && second == "Name"
        ));
        assert!(matches!(
            p(r#"{"params":{"ARGUMENTS":{},"arguments":{}}}"#),
            Err(JsonError::CaseVariantKey { .. })
        ));
        // U+212A KELVIN SIGN folds onto 'k'; U+017F LONG S onto 's'.
        assert!(matches!(
            p("{\"kind\":1,\"\u{212A}ind\":2}"),
            Err(JsonError::CaseVariantKey { .. })
        ));
        assert!(matches!(
            p("{\"s\":1,\"\u{17F}\":2}"),
            Err(JsonError::CaseVariantKey { .. })
        ));
        assert!(p(r#"{"name":1,"names":2}"#).is_ok());
    }

    #[test]
    fn rejects_invalid_utf8_bom_and_empty() {
        assert_eq!(
            parse(b"\"a\xff\"", &JsonLimits::default()),
            Err(JsonError::InvalidUtf8 { offset: 2 })
        );
        // Overlong encoding of '/' and an encoded surrogate are not UTF-8.
        assert!(matches!(
            parse(b"\"\xc0\xaf\"", &JsonLimits::default()),
            Err(JsonError::InvalidUtf8 { .. })
        ));
        assert!(matches!(
            parse(b"\"\xed\xa0\x80\"", &JsonLimits::default()),
            Err(JsonError::InvalidUtf8 { .. })
        ));
        assert_eq!(
            parse(b"\xEF\xBB\xBF{}", &JsonLimits::default()),
            Err(JsonError::ByteOrderMark)
        );
        assert_eq!(p(""), Err(JsonError::Empty));
        assert_eq!(p("  \n"), Err(JsonError::Empty));
    }

    #[test]
    fn rejects_lone_surrogates() {
        for s in [
            r#""\uD800""#,
            r#""\uDC00""#,
            r#""\uD800x""#,
            r#""\uD800\u0041""#,
            r#""\uD800\uD800""#,
            r#""\udbff\n""#,
        ] {
            assert!(
                matches!(p(s), Err(JsonError::LoneSurrogate { .. })),
                "{s}: {:?}",
                p(s)
            );
        }
    }

    #[test]
    fn rejects_bad_escapes_and_control_characters() {
        for s in [r#""\x41""#, r#""\u12""#, r#""\u12G4""#, r#""\'""#, "\"\\"] {
            assert!(
                matches!(
                    p(s),
                    Err(JsonError::InvalidEscape { .. } | JsonError::UnexpectedEnd { .. })
                ),
                "{s}: {:?}",
                p(s)
            );
        }
        assert!(matches!(
            p("\"a\nb\""),
            Err(JsonError::ControlCharacter { code: 10, .. })
        ));
        assert!(matches!(
            p("\"a\u{0}b\""),
            Err(JsonError::ControlCharacter { code: 0, .. })
        ));
    }

    #[test]
    fn rejects_non_json_literals_and_syntax() {
        for s in [
            "NaN",
            "Infinity",
            "-Infinity",
            "nan",
            "undefined",
            "tru",
            "nul",
            "'a'",
            "{a:1}",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "[1,]",
            "[1 2]",
            "{,}",
            "[",
            "{",
            "{\"a\":",
            "\"abc",
            "// c\n1",
            "+1",
            "01",
            "-01",
            "1.",
            ".5",
            "1e",
            "1e+",
            "-",
            "0x10",
            "1_000",
        ] {
            assert!(p(s).is_err(), "{s} was accepted: {:?}", p(s));
        }
    }

    #[test]
    fn rejects_trailing_data() {
        assert_eq!(p("{} {}"), Err(JsonError::TrailingData { offset: 3 }));
        assert!(matches!(p("1 2"), Err(JsonError::TrailingData { .. })));
        assert!(matches!(p("{}\u{0}"), Err(JsonError::TrailingData { .. })));
        assert!(matches!(p("nullx"), Err(JsonError::TrailingData { .. })));
        assert!(matches!(
            p("[1]\u{a0}"),
            Err(JsonError::TrailingData { .. })
        ));
    }

    #[test]
    fn integers_must_fit_64_bits() {
        assert_eq!(p("9223372036854775807").unwrap(), json!(i64::MAX));
        assert_eq!(p("-9223372036854775808").unwrap(), json!(i64::MIN));
        assert_eq!(p("18446744073709551615").unwrap(), json!(u64::MAX));
        assert_eq!(p("-0").unwrap(), json!(0));
        for s in [
            "18446744073709551616",
            "-9223372036854775809",
            "100000000000000000000000000000",
        ] {
            assert!(matches!(p(s), Err(JsonError::LossyNumber { .. })), "{s}");
        }
        // The message never repeats the number (it may be a secret argument).
        let e = p(r#"{"pin": 918273645546372819283746}"#)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("918273645546372819283746"), "{e}");
    }

    #[test]
    fn floats_must_round_trip_exactly() {
        for (input, forwarded) in [
            ("0.1", "0.1"),
            ("1.50", "1.5"),
            ("1e2", "100.0"),
            ("1E+2", "100.0"),
            ("2.5e-3", "0.0025"),
            ("-0.0", "-0.0"),
            ("0.0", "0.0"),
            ("0e999999999999999999999", "0.0"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("123456789.125", "123456789.125"),
            ("0.30000000000000004", "0.30000000000000004"),
        ] {
            assert_eq!(canon(input), forwarded, "{input}");
        }
        for s in [
            "0.10000000000000000001",
            "1e400",
            "-1e400",
            "1e-400",
            "2e-324",
            "9007199254740993.0",
            "0.1000000000000000055511151231257827",
            "1e99999999999999999999",
        ] {
            assert!(
                matches!(p(s), Err(JsonError::LossyNumber { .. })),
                "{s}: {:?}",
                p(s)
            );
        }
    }

    #[test]
    fn enforces_depth_limit() {
        let limits = JsonLimits {
            max_bytes: 1 << 20,
            max_depth: 3,
        };
        assert!(parse(b"[[[1]]]", &limits).is_ok());
        assert!(parse(br#"{"a":{"b":{}}}"#, &limits).is_ok());
        assert!(matches!(
            parse(b"[[[[1]]]]", &limits),
            Err(JsonError::TooDeep { limit: 3, .. })
        ));
        assert!(matches!(
            parse(br#"{"a":[{"b":1}]}"#, &limits).map(|_| ()),
            Ok(())
        ));
        assert!(matches!(
            parse(br#"{"a":[{"b":[]}]}"#, &limits),
            Err(JsonError::TooDeep { .. })
        ));
        // Hostile depth far beyond the limit fails without exhausting the stack.
        let deep = "[".repeat(1_000_000);
        assert!(matches!(
            parse(
                deep.as_bytes(),
                &JsonLimits {
                    max_bytes: 2 << 20,
                    max_depth: 64
                }
            ),
            Err(JsonError::TooDeep { .. })
        ));
    }

    #[test]
    fn enforces_size_limit() {
        let limits = JsonLimits {
            max_bytes: 10,
            max_depth: 8,
        };
        assert!(parse(b"\"12345678\"", &limits).is_ok());
        assert_eq!(
            parse(b"\"123456789\"", &limits),
            Err(JsonError::TooLarge {
                size: 11,
                limit: 10
            })
        );
    }

    #[test]
    fn canonical_form_sorts_keys_and_escapes_minimally() {
        assert_eq!(
            canon(r#"{ "b" : 1, "a" : [ 1 , 2 ], "é":"\u00e9", "c":"\u001f\/\n" }"#),
            r#"{"a":[1,2],"b":1,"c":"\u001f/\n","é":"é"}"#
        );
        assert_eq!(canon(r#""\u007f""#), "\"\u{7f}\"");
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..8).prop_map(|entries| {
                    // Keep one spelling per case-folded key, as the parser demands.
                    let mut seen = std::collections::HashSet::new();
                    let mut map = Map::new();
                    for (k, v) in entries {
                        if seen.insert(fold_case(&k)) {
                            map.insert(k, v);
                        }
                    }
                    Value::Object(map)
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes, &JsonLimits::default());
        }

        #[test]
        fn random_json_like_text_never_panics(s in "[\\[\\]{}\",:0-9eE+.\\-a-z\\\\ u]{0,64}") {
            let _ = parse(s.as_bytes(), &JsonLimits::default());
        }

        #[test]
        fn canonical_output_parses_back_to_the_same_value(v in arb_value()) {
            let bytes = to_canonical_bytes(&v);
            let back = parse(&bytes, &JsonLimits::default()).unwrap();
            prop_assert_eq!(&back, &v);
            // And canonicalisation is idempotent.
            prop_assert_eq!(to_canonical_bytes(&back), bytes);
        }

        #[test]
        fn agrees_with_serde_json_on_what_it_accepts(v in arb_value()) {
            let text = serde_json::to_string_pretty(&v).unwrap();
            let ours = parse(text.as_bytes(), &JsonLimits::default()).unwrap();
            let theirs: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn any_duplicated_key_is_rejected(
            key in "[a-zA-Z_]{1,8}",
            a in arb_value(),
            b in arb_value(),
            others in prop::collection::vec("[0-9]{1,4}", 0..4),
        ) {
            let mut parts: Vec<String> = others
                .iter()
                .map(|k| format!("\"{k}\":0"))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let av = serde_json::to_string(&a).unwrap();
            let bv = serde_json::to_string(&b).unwrap();
            parts.insert(0, format!("\"{key}\":{av}"));
            parts.push(format!("\"{key}\":{bv}"));
            let text = format!("{{{}}}", parts.join(","));
            let res = parse(text.as_bytes(), &JsonLimits::default());
            prop_assert!(
                matches!(res, Err(JsonError::DuplicateKey { .. })),
                "{}: {:?}", text, res
            );
        }

        /// A float is accepted exactly when kya forwards the same decimal the
        /// agent wrote: then the value is the agent's. Rust's shortest spelling
        /// and the one kya forwards (serde_json's) differ in the last of 17
        /// digits for rare values; such a literal is refused, never altered.
        #[test]
        fn accepted_floats_forward_the_same_decimal(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let text = format!("{f:e}");
            let forwarded = serde_json::Number::from_f64(f).map(|n| n.to_string()).unwrap_or_default();
            match parse(text.as_bytes(), &JsonLimits::default()) {
                Ok(v) => {
                    prop_assert_eq!(v.as_f64(), Some(f));
                    prop_assert_eq!(decimal_value(&text), decimal_value(&forwarded));
                }
                Err(JsonError::LossyNumber { .. }) => {
                    prop_assert_ne!(decimal_value(&text), decimal_value(&forwarded));
                }
                Err(e) => prop_assert!(false, "{text}: {e}"),
            }
        }

        /// What kya forwards for any float parses back to itself, unchanged.
        #[test]
        fn forwarded_floats_are_accepted(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let text = serde_json::Number::from_f64(f).map(|n| n.to_string()).unwrap_or_default();
            let v = parse(text.as_bytes(), &JsonLimits::default()).unwrap();
            prop_assert_eq!(v.as_f64(), Some(f));
        }
    }
}
