//! Text format of `embedding`, compatible with pgvector: `[1,2.5,-3e-2]`.
//!
//! Input allows whitespace around the brackets and around each element. Output uses the
//! shortest decimal that reads back to the same `f32`, spelled as PostgreSQL's `float4out`
//! spells it (fixed notation for decimal exponents -4..5, otherwise `1.5e-05`), so values print
//! identically in both extensions and every finite `f32` round-trips exactly.

use crate::MAX_DIMS;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Nothing but whitespace, or no `[` at the start.
    MissingOpenBracket,
    /// No `]` at the end, or something after it.
    MissingCloseBracket,
    /// `[]`: an embedding has at least one dimension.
    Empty,
    /// `[1,,2]` or a trailing comma: element number (1-based) is empty.
    EmptyElement(usize),
    /// Not a decimal number.
    InvalidNumber(String),
    /// NaN or infinity spelled out.
    NotFinite(String),
    /// A number too large for `real`.
    OutOfRange(String),
    TooManyDims,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::MissingOpenBracket => write!(f, "embedding must start with \"[\""),
            ParseError::MissingCloseBracket => write!(f, "embedding must end with \"]\""),
            ParseError::Empty => write!(f, "embedding must have at least 1 dimension"),
            ParseError::EmptyElement(i) => write!(f, "element {i} is empty"),
            ParseError::InvalidNumber(t) => write!(f, "\"{t}\" is not a number"),
            ParseError::NotFinite(t) => {
                write!(f, "\"{t}\" is not finite: NaN and infinity are not allowed")
            }
            ParseError::OutOfRange(t) => write!(f, "\"{t}\" is out of range for type real"),
            ParseError::TooManyDims => {
                write!(f, "embedding cannot have more than {MAX_DIMS} dimensions")
            }
        }
    }
}

/// The whitespace PostgreSQL's own array and vector parsers skip.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if is_space(*first) {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if is_space(*last) {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// True when `t` is a plain decimal number: `[+-]? (d+ (. d*)? | . d+) ([eE] [+-]? d+)?`.
/// Rust's `f32::from_str` alone would also take `inf`, `nan` and `infinity`.
fn is_decimal(t: &[u8]) -> bool {
    let mut i = 0;
    if i < t.len() && (t[i] == b'+' || t[i] == b'-') {
        i += 1;
    }
    let int_start = i;
    while i < t.len() && t[i].is_ascii_digit() {
        i += 1;
    }
    let mut digits = i - int_start;
    if i < t.len() && t[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < t.len() && t[i].is_ascii_digit() {
            i += 1;
        }
        digits += i - frac_start;
    }
    if digits == 0 {
        return false;
    }
    if i < t.len() && (t[i] == b'e' || t[i] == b'E') {
        i += 1;
        if i < t.len() && (t[i] == b'+' || t[i] == b'-') {
            i += 1;
        }
        let exp_start = i;
        while i < t.len() && t[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return false;
        }
    }
    i == t.len()
}

fn is_non_finite_word(t: &[u8]) -> bool {
    let unsigned = match t {
        [b'+' | b'-', rest @ ..] => rest,
        _ => t,
    };
    ["nan", "inf", "infinity"]
        .iter()
        .any(|w| unsigned.eq_ignore_ascii_case(w.as_bytes()))
}

/// Parses one element; the result is correctly rounded to the nearest `f32`, as `strtof` does.
pub fn parse_element(token: &[u8]) -> Result<f32, ParseError> {
    let shown = || String::from_utf8_lossy(token).into_owned();
    if is_non_finite_word(token) {
        return Err(ParseError::NotFinite(shown()));
    }
    if !is_decimal(token) {
        return Err(ParseError::InvalidNumber(shown()));
    }
    // is_decimal guarantees ASCII.
    let s = std::str::from_utf8(token).map_err(|_| ParseError::InvalidNumber(shown()))?;
    let v: f32 = s.parse().map_err(|_| ParseError::InvalidNumber(shown()))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ParseError::OutOfRange(shown()))
    }
}

/// Parses the text form. Never panics, whatever the bytes.
pub fn parse(input: &[u8]) -> Result<Vec<f32>, ParseError> {
    let s = trim(input);
    let inner = match s {
        [b'[', inner @ ..] => inner,
        _ => return Err(ParseError::MissingOpenBracket),
    };
    let inner = match inner {
        [inner @ .., b']'] => inner,
        _ => return Err(ParseError::MissingCloseBracket),
    };
    if trim(inner).is_empty() {
        return Err(ParseError::Empty);
    }
    // Pre-size from the comma count, capped so a hostile input cannot make us reserve much.
    let commas = inner.iter().filter(|&&b| b == b',').count();
    if commas >= MAX_DIMS {
        return Err(ParseError::TooManyDims);
    }
    let mut out = Vec::with_capacity(commas + 1);
    for (i, token) in inner.split(|&b| b == b',').enumerate() {
        let token = trim(token);
        if token.is_empty() {
            return Err(ParseError::EmptyElement(i + 1));
        }
        out.push(parse_element(token)?);
    }
    Ok(out)
}

/// Appends the shortest round-trip spelling of `v`, formatted as PostgreSQL's `float4out`.
pub fn write_float(v: f32, out: &mut String) {
    use std::fmt::Write;
    if v == 0.0 {
        out.push_str(if v.is_sign_negative() { "-0" } else { "0" });
        return;
    }
    if !v.is_finite() {
        // Embeddings never hold these, but keep the function total.
        let _ = write!(
            out,
            "{}",
            if v.is_nan() {
                "NaN"
            } else if v > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            }
        );
        return;
    }
    let sci = shortest_scientific(v);
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if negative {
        out.push('-');
    }
    if (-4..6).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
}

/// Whether the decimal `s` lies exactly halfway between `v` and a neighbouring `f32`. Such a
/// string reads back as `v` only through round-half-even; PostgreSQL's Ryu-based `float4out`
/// does not accept those bounds and prints a longer string instead, and so do we.
fn is_halfway(v: f32, s: &str) -> bool {
    let Ok(d) = s.parse::<f64>() else {
        return false;
    };
    let a = v.abs();
    let d = d.abs();
    let here = a as f64;
    if d == here {
        return false;
    }
    let up = f32::from_bits(a.to_bits() + 1);
    let down = if a.to_bits() == 0 {
        0.0
    } else {
        f32::from_bits(a.to_bits() - 1)
    };
    // Both midpoints are exact in f64 (f32 has 24 significant bits).
    (up.is_finite() && d == (here + up as f64) / 2.0) || d == (here + down as f64) / 2.0
}

/// Shortest scientific spelling ("-1.2345e-5") that reads back as `v`, chosen as PostgreSQL's
/// Ryu-based `float4out` chooses: the fewest digits that identify `v` without relying on a
/// round-half-even tie, and among those the decimal nearest to `v` (ties to even).
fn shortest_scientific(v: f32) -> String {
    use std::fmt::Write;
    let mut sci = String::with_capacity(24);
    // Grisu/Dragon shortest: gives the minimal digit count, though it may pick a different
    // neighbour than Ryu when two are equally near, or rely on a tie.
    let _ = write!(sci, "{v:e}");
    let digits = sci
        .split('e')
        .next()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_digit)
        .count();
    for significant in digits.max(1)..=9 {
        sci.clear();
        // `{:.Ne}` rounds the exact binary value to N digits after the point, ties to even.
        let _ = write!(sci, "{v:.prec$e}", prec = significant - 1);
        let candidate = trim_mantissa_zeros(&sci);
        if candidate.parse::<f32>().ok() == Some(v) && !is_halfway(v, &candidate) {
            return candidate;
        }
    }
    sci.clear();
    let _ = write!(sci, "{v:.8e}");
    trim_mantissa_zeros(&sci)
}

fn trim_mantissa_zeros(sci: &str) -> String {
    let (m, e) = sci.split_once('e').unwrap_or((sci, "0"));
    let m = if m.contains('.') {
        m.trim_end_matches('0').trim_end_matches('.')
    } else {
        m
    };
    format!("{m}e{e}")
}

/// The text form of a whole embedding.
pub fn format(values: &[f32]) -> String {
    let mut out = String::with_capacity(values.len() * 12 + 2);
    out.push('[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_float(*v, &mut out);
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Result<Vec<f32>, ParseError> {
        parse(s.as_bytes())
    }

    #[test]
    fn parses_pgvector_examples() {
        assert_eq!(p("[1,2.5,-3e-2]").unwrap(), vec![1.0, 2.5, -0.03]);
        assert_eq!(p("  [ 1 , 2 ]\n").unwrap(), vec![1.0, 2.0]);
        assert_eq!(p("[+.5,5.,1E3]").unwrap(), vec![0.5, 5.0, 1000.0]);
        assert_eq!(p("[1e-50]").unwrap(), vec![0.0]);
    }

    #[test]
    fn rejects_bad_input_with_the_reason() {
        assert_eq!(p("[1,2"), Err(ParseError::MissingCloseBracket));
        assert_eq!(p("1,2]"), Err(ParseError::MissingOpenBracket));
        assert_eq!(p(""), Err(ParseError::MissingOpenBracket));
        assert_eq!(p("[]"), Err(ParseError::Empty));
        assert_eq!(p("[ ]"), Err(ParseError::Empty));
        assert_eq!(p("[1,,2]"), Err(ParseError::EmptyElement(2)));
        assert_eq!(p("[1,]"), Err(ParseError::EmptyElement(2)));
        assert_eq!(p("[a]"), Err(ParseError::InvalidNumber("a".into())));
        assert_eq!(p("[1 2]"), Err(ParseError::InvalidNumber("1 2".into())));
        assert_eq!(p("[0x10]"), Err(ParseError::InvalidNumber("0x10".into())));
        assert_eq!(p("[1e]"), Err(ParseError::InvalidNumber("1e".into())));
        assert_eq!(p("[1e999]"), Err(ParseError::OutOfRange("1e999".into())));
        assert_eq!(p("[NaN]"), Err(ParseError::NotFinite("NaN".into())));
        assert_eq!(
            p("[-Infinity]"),
            Err(ParseError::NotFinite("-Infinity".into()))
        );
        assert_eq!(p("[1]]"), Err(ParseError::InvalidNumber("1]".into())));
        assert_eq!(p("[1] x"), Err(ParseError::MissingCloseBracket));
        let too_many = format!("[{}]", vec!["1"; MAX_DIMS + 1].join(","));
        assert_eq!(p(&too_many), Err(ParseError::TooManyDims));
        let max = format!("[{}]", vec!["1"; MAX_DIMS].join(","));
        assert_eq!(p(&max).unwrap().len(), MAX_DIMS);
    }

    #[test]
    // The halfway-case literals are PostgreSQL's (longer than shortest) spellings on purpose.
    #[allow(clippy::excessive_precision)]
    fn formats_like_float4out() {
        let cases: &[(f32, &str)] = &[
            (1.0, "1"),
            (-3.0, "-3"),
            (2.5, "2.5"),
            (0.1, "0.1"),
            (-0.03, "-0.03"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123456.0, "123456"),
            (1234567.0, "1.234567e+06"),
            (1e6, "1e+06"),
            (100000.0, "100000"),
            (1.5e-7, "1.5e-07"),
            (f32::MAX, "3.4028235e+38"),
            (f32::MIN_POSITIVE, "1.1754944e-38"),
            (1e-45, "1e-45"),
            (0.0, "0"),
            (-0.0, "-0"),
            (1.0 / 3.0, "0.33333334"),
            // Halfway cases: PostgreSQL prints the longer, tie-free form.
            (-2.1989619e+08, "-2.1989619e+08"),
            (3.0961182e+06, "3.0961182e+06"),
            (1.15327376e+08, "1.15327376e+08"),
        ];
        for (v, want) in cases {
            let mut s = String::new();
            write_float(*v, &mut s);
            assert_eq!(&s, want, "formatting {v:?}");
        }
        assert_eq!(format(&[3.0, 4.0]), "[3,4]");
    }

    #[test]
    fn every_float_class_round_trips() {
        // Exhaustive over a stride of all bit patterns, plus the edges.
        let mut bits: u32 = 0;
        let mut s = String::new();
        loop {
            let v = f32::from_bits(bits);
            if v.is_finite() {
                s.clear();
                write_float(v, &mut s);
                let back = parse_element(s.as_bytes()).unwrap();
                assert_eq!(back.to_bits(), v.to_bits(), "{v:e} printed as {s}");
            }
            match bits.checked_add(65_521) {
                Some(b) => bits = b,
                None => break,
            }
        }
    }

    proptest! {
        #[test]
        fn text_round_trip_is_exact(v in proptest::collection::vec(any::<f32>().prop_filter("finite", |x| x.is_finite()), 1..64)) {
            let text = format(&v);
            let back = parse(text.as_bytes()).unwrap();
            prop_assert_eq!(back.len(), v.len());
            for (a, b) in back.iter().zip(&v) {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
        }

        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parser_never_panics_on_near_valid_text(s in r"\s*\[[0-9eE+\-., \t]{0,40}\]?\s*") {
            let _ = parse(s.as_bytes());
        }
    }
}
