//! RFC 8785 JSON Canonicalization Scheme (JCS), plus the strict JSON reader that
//! feeds it.
//!
//! A signature over JSON is only meaningful if signer and verifier agree on the
//! exact bytes. JCS fixes them: object members sorted by their names' UTF-16
//! code units, no insignificant whitespace, strings escaped as ECMAScript's
//! `JSON.stringify` does, and numbers written as ECMAScript writes an IEEE-754
//! double. It is written here rather than taken from a crate because kya also
//! needs the *reading* side to be strict: duplicate member names are ambiguous
//! (two parsers may keep different values) and are refused, as are integers that
//! a double cannot hold exactly (they would silently change when canonicalized).

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Largest JSON text [`parse_strict`] accepts by default: credentials are small,
/// and a bound keeps hostile input from costing memory.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;

/// Nesting deeper than this is refused when canonicalizing (the reader is
/// bounded by serde_json's own recursion limit of 128).
pub const MAX_DEPTH: usize = 128;

/// Largest integer magnitude a double represents exactly with all smaller ones (2^53).
const MAX_SAFE: u64 = 1 << 53;

/// Why JSON could not be read strictly or canonicalized.
#[derive(Debug, thiserror::Error)]
pub enum JcsError {
    #[error("JSON input is {len} bytes, more than the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("invalid JSON: {0}")]
    Parse(String),
    #[error("JSON nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("number {0} cannot be represented exactly as an IEEE-754 double")]
    InexactNumber(String),
}

/// Parse JSON, refusing duplicate member names (at any depth), unpaired
/// surrogates, trailing data and inputs larger than `limit` bytes.
pub fn parse_strict(bytes: &[u8], limit: usize) -> Result<Value, JcsError> {
    if bytes.len() > limit {
        return Err(JcsError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let StrictValue(value) =
        StrictValue::deserialize(&mut de).map_err(|e| JcsError::Parse(e.to_string()))?;
    de.end().map_err(|e| JcsError::Parse(e.to_string()))?;
    Ok(value)
}

/// The JCS serialization of `value` as a string.
pub fn canonicalize(value: &Value) -> Result<String, JcsError> {
    let mut out = String::new();
    write_value(value, &mut out, 0)?;
    Ok(out)
}

/// A `serde_json::Value` whose deserialization refuses duplicate object keys.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate member name {key:?}")));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

fn write_value(value: &Value, out: &mut String, depth: usize) -> Result<(), JcsError> {
    if depth > MAX_DEPTH {
        return Err(JcsError::TooDeep);
    }
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out)?,
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out, depth + 1)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785 3.2.3: compare names as arrays of UTF-16 code units.
            members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (name, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(name, out);
                out.push(':');
                write_value(member, out, depth + 1)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// Strings as ECMAScript `JSON.stringify` writes them (RFC 8785 3.2.2.2).
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{09}' => out.push_str("\\t"),
            '\u{0a}' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\u{0d}' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Integers are numbers like any other in JCS (doubles). Up to 2^53 they are
/// exact; beyond, an integer is accepted only when its text is already what
/// ECMAScript writes for the nearest double (e.g. `6260177730066591000`, the
/// canonical form of a large double). Anything else (e.g. `9007199254740993`)
/// would be silently rounded, and a server reading it as a 64-bit integer would
/// see a different value from the one that was signed, so it is refused.
fn write_number(n: &Number, out: &mut String) -> Result<(), JcsError> {
    let exact_int = |text: String, magnitude: u64, f: f64| -> Result<String, JcsError> {
        if magnitude <= MAX_SAFE {
            return Ok(text);
        }
        let canonical = format_es6(f);
        if canonical == text {
            Ok(canonical)
        } else {
            Err(JcsError::InexactNumber(text))
        }
    };
    if let Some(u) = n.as_u64() {
        out.push_str(&exact_int(u.to_string(), u, u as f64)?);
    } else if let Some(i) = n.as_i64() {
        out.push_str(&exact_int(i.to_string(), i.unsigned_abs(), i as f64)?);
    } else if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
        // (Finite is guaranteed by serde_json today; checked so that a feature
        // change such as `arbitrary_precision` cannot turn 1e400 into "0".)
        out.push_str(&format_es6(f));
    } else {
        return Err(JcsError::InexactNumber(n.to_string()));
    }
    Ok(())
}

/// ECMAScript `Number.prototype.toString` for a finite double (ECMA-262
/// 7.1.12.1), which RFC 8785 3.2.2.3 prescribes.
///
/// Rust's `{:e}` gives the shortest digit string that round-trips (the `s`, `k`
/// of the ECMAScript algorithm) together with the exponent; the ECMAScript rules
/// then only decide where the decimal point goes.
pub fn format_es6(f: f64) -> String {
    if f == 0.0 || !f.is_finite() {
        // -0 is written "0"; non-finite numbers cannot occur in serde_json values.
        return "0".to_owned();
    }
    let shortest = format!("{:e}", f.abs());
    let k = shortest.split_once('e').map_or(shortest.len(), |(m, _)| {
        m.chars().filter(char::is_ascii_digit).count()
    });
    // Among the k-digit strings that round-trip, ECMAScript wants the one
    // closest to the exact value, ties to even. Rust's shortest form may pick
    // the other one of a tie (e.g. 1424953923781206.25 -> ...206.3), so round
    // the exact value to k digits (Rust's precision mode rounds half to even)
    // and use that when it still round-trips.
    let closest = format!("{:.*e}", k.saturating_sub(1), f.abs());
    let sci = if closest.parse::<f64>().ok() == Some(f.abs()) {
        closest
    } else {
        shortest
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i32;
    let n = exp + 1;
    let mut out = String::new();
    if f < 0.0 {
        out.push('-');
    }
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        let e = n - 1;
        let sign = if e < 0 { '-' } else { '+' };
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(sign);
        out.push_str(&e.unsigned_abs().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> String {
        canonicalize(&parse_strict(text.as_bytes(), MAX_INPUT_BYTES).unwrap()).unwrap()
    }

    #[test]
    fn rfc8785_example_3_2_2() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        assert_eq!(
            canon(input),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    #[test]
    fn rfc8785_sorting_by_utf16_code_units() {
        let input = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let out = canon(input);
        let order: Vec<&str> = vec![
            "\"\\r\"",
            "\"1\"",
            "\"\u{80}\"",
            "\"\u{f6}\"",
            "\"\u{20ac}\"",
            "\"\u{1f600}\"",
            "\"\u{fb33}\"",
        ];
        let mut last = 0;
        for name in order {
            let pos = out.find(name).unwrap();
            assert!(pos >= last, "{name} out of order in {out}");
            last = pos;
        }
    }

    #[test]
    fn rfc8785_appendix_b_numbers() {
        let cases: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, want) in cases {
            let f = f64::from_bits(*bits);
            assert_eq!(format_es6(f), *want, "bits {bits:#018x}");
            // And through the full reader/writer path.
            let v = Value::Number(Number::from_f64(f).unwrap());
            assert_eq!(canonicalize(&v).unwrap(), *want);
        }
    }

    #[test]
    fn integers_beyond_double_precision_are_refused_not_rounded() {
        assert_eq!(canon("9007199254740992"), "9007199254740992");
        assert_eq!(canon("-9007199254740992"), "-9007199254740992");
        // The canonical text of a large double is read back as itself.
        assert_eq!(canon("6260177730066591000"), "6260177730066591000");
        assert_eq!(canon("-6260177730066591000"), "-6260177730066591000");
        // 2^60 is a double, but ECMAScript writes it 1152921504606847000: refused
        // rather than signed as a different number than the text says.
        for text in [
            "9007199254740993",
            "-9007199254740993",
            "18446744073709551615",
            "1152921504606846976",
        ] {
            let v = parse_strict(text.as_bytes(), MAX_INPUT_BYTES).unwrap();
            assert!(matches!(canonicalize(&v), Err(JcsError::InexactNumber(_))));
        }
    }

    #[test]
    fn control_characters_are_escaped_in_lowercase_hex() {
        assert_eq!(
            canon(r#""\u0000\u001f\u007f\b\f\t""#),
            "\"\\u0000\\u001f\u{7f}\\b\\f\\t\""
        );
    }

    #[test]
    fn hostile_input_is_refused_without_panicking() {
        let dup = r#"{"a":1,"b":{"c":1,"c":2}}"#;
        assert!(matches!(
            parse_strict(dup.as_bytes(), MAX_INPUT_BYTES),
            Err(JcsError::Parse(m)) if m.contains("duplicate")
        ));
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(parse_strict(deep.as_bytes(), MAX_INPUT_BYTES).is_err());
        let huge = vec![b' '; MAX_INPUT_BYTES + 1];
        assert!(matches!(
            parse_strict(&huge, MAX_INPUT_BYTES),
            Err(JcsError::TooLarge { .. })
        ));
        for bad in [
            "",
            "{",
            "{\"a\":}",
            "[1,]",
            "\"\\ud800\"",
            "{} {}",
            "NaN",
            "1e400",
            "\u{feff}{}",
            "{'a':1}",
        ] {
            assert!(
                parse_strict(bad.as_bytes(), MAX_INPUT_BYTES).is_err(),
                "accepted {bad:?}"
            );
        }
        assert!(parse_strict(&[0xff, 0xfe, b'{', b'}'], MAX_INPUT_BYTES).is_err());
    }

    #[test]
    fn deep_values_built_in_memory_are_refused_by_the_writer() {
        let mut v = Value::Null;
        for _ in 0..(MAX_DEPTH + 5) {
            v = Value::Array(vec![v]);
        }
        assert!(matches!(canonicalize(&v), Err(JcsError::TooDeep)));
    }

    proptest::proptest! {
        #[test]
        fn canonical_form_is_a_fixed_point(f in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL, s in ".{0,20}", i in proptest::num::i64::ANY) {
            let v = serde_json::json!({"z": f, "a": [s, i % (1i64 << 53)], "m": {"b": null, "a": true}});
            let once = canonicalize(&v).unwrap();
            let again = canonicalize(&parse_strict(once.as_bytes(), MAX_INPUT_BYTES).unwrap()).unwrap();
            proptest::prop_assert_eq!(&once, &again);
            // Numbers survive the round trip exactly.
            let back = parse_strict(once.as_bytes(), MAX_INPUT_BYTES).unwrap();
            proptest::prop_assert_eq!(back["z"].as_f64().unwrap(), f);
        }
    }
}
