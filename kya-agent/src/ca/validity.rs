//! Reading a certificate's validity window from its DER, so kya can refuse an
//! expired CA with a clear message (instead of every agent failing with
//! "certificate expired") and warn ahead of time.
//!
//! A minimal DER walk over exactly the path to `tbsCertificate.validity`
//! (rcgen cannot parse certificates without pulling in x509-parser). Every
//! length is bounds-checked; anything unexpected is `None`, never a panic.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// `(notBefore, notAfter)` of an X.509 certificate, or `None` if it is not
/// well-formed where this walk looks.
pub(crate) fn validity(der: &[u8]) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let (tag, cert, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    // Optional [0] EXPLICIT version.
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    // serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE.
    for want in [0x02, 0x30, 0x30] {
        let (tag, _, rest) = tlv(tbs)?;
        if tag != want {
            return None;
        }
        tbs = rest;
    }
    let (tag, validity, _) = tlv(tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, not_before, rest) = tlv(validity)?;
    let (t2, not_after, _) = tlv(rest)?;
    Some((time_value(t1, not_before)?, time_value(t2, not_after)?))
}

/// One DER TLV: (tag, contents, what follows). Single-byte tags only (all
/// that the path above uses); definite lengths up to 4 bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// UTCTime (0x17, `YYMMDDHHMMSSZ`, RFC 5280: YY < 50 is 20YY) or
/// GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`).
fn time_value(tag: u8, value: &[u8]) -> Option<OffsetDateTime> {
    let digits = |s: &[u8]| -> Option<u32> {
        s.iter().try_fold(0u32, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
        })
    };
    let (year, rest) = match (tag, value.len()) {
        (0x17, 13) => {
            let yy = digits(&value[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &value[2..])
        }
        (0x18, 15) => (digits(&value[..4])?, &value[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let month = Month::try_from(u8::try_from(field(0)?).ok()?).ok()?;
    let date = Date::from_calendar_date(i32::try_from(year).ok()?, month, field(2)? as u8).ok()?;
    let time = Time::from_hms(field(4)? as u8, field(6)? as u8, field(8)? as u8).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utc_and_generalized_times() {
        let t = time_value(0x17, b"491231235959Z").unwrap();
        assert_eq!(t.year(), 2049);
        assert_eq!(time_value(0x17, b"500101000000Z").unwrap().year(), 1950);
        let g = time_value(0x18, b"20991231235959Z").unwrap();
        assert_eq!((g.year(), g.month(), g.day()), (2099, Month::December, 31));
        for bad in [
            &b"491231235959"[..],
            b"4912312359590",
            b"491331235959Z",
            b"491232235959Z",
            b"491231245959Z",
            b"49123123595aZ",
            b"",
        ] {
            assert!(time_value(0x17, bad).is_none(), "{bad:?}");
        }
        assert!(time_value(0x18, b"491231235959Z").is_none());
        assert!(time_value(0x02, b"491231235959Z").is_none());
    }

    #[test]
    fn garbage_and_truncations_are_none_never_a_panic() {
        assert!(validity(&[]).is_none());
        assert!(validity(&[0x30]).is_none());
        assert!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(validity(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert!(validity(&[0x30, 0x80, 0, 0]).is_none());
        assert!(validity(&[0xff; 300]).is_none());
    }

    proptest::proptest! {
        #[test]
        fn any_prefix_or_corruption_of_a_real_certificate_is_safe(
            cut in 0usize..2000,
            flips in proptest::collection::vec((0usize..2000, proptest::num::u8::ANY), 0..6),
        ) {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let mut der = cert.der().to_vec();
            proptest::prop_assert!(validity(&der).is_some());
            for (at, b) in flips {
                let at = at % der.len();
                der[at] = b;
            }
            der.truncate(cut.min(der.len()));
            let _ = validity(&der);
        }
    }
}
