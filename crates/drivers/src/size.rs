//! Sizes and offsets as QEMU's tools and options take them
//! (`qemu_strtosz`, with qemu-io's `cvtnum` checks): a decimal number with
//! an optional fraction and binary suffix (`B`, `K`, `M`, `G`, `T`, `P`,
//! `E`, any case; `1.5k`), or a hex number without either (`0x10`); at most
//! `i64::MAX`. One parser serves `sluice img`, `sluice io` and `key=value`
//! options.

/// Why a number was refused, as `qemu_strtosz` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumError {
    Invalid,
    TooLarge,
}

/// The message qemu-io prints for a number it cannot parse.
pub fn num_error_text(e: NumError, arg: &str) -> String {
    match e {
        NumError::Invalid => format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
        ),
        NumError::TooLarge => format!("Parsing error: argument too large -- {arg}"),
    }
}

fn suffix_shift(c: u8) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    })
}

/// QEMU's `qemu_strtosz` with the checks of qemu-io's `cvtnum`: a decimal
/// number with an optional fraction and binary suffix (`1.5k`), or a hex
/// number without either (`0x10`); at most `i64::MAX`.
pub fn parse_size(text: &str) -> Result<u64, NumError> {
    let s = text.trim_start().as_bytes();
    let mut i = 0;
    if s.first() == Some(&b'+') {
        i += 1;
    }
    let int_start = i;
    while i < s.len() && s[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &s[int_start..i];
    // Hex: exactly "0x" followed by hex digits and nothing else.
    if int_digits == b"0" && i < s.len() && (s[i] == b'x' || s[i] == b'X') {
        let hex = &s[i + 1..];
        if hex.is_empty() || !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(NumError::Invalid);
        }
        let digits = std::str::from_utf8(hex).map_err(|_| NumError::Invalid)?;
        let v = u64::from_str_radix(digits, 16).map_err(|_| NumError::TooLarge)?;
        return if v > i64::MAX as u64 {
            Err(NumError::TooLarge)
        } else {
            Ok(v)
        };
    }
    let mut frac_digits: &[u8] = &[];
    let mut has_point = false;
    if i < s.len() && s[i] == b'.' {
        has_point = true;
        i += 1;
        let fs = i;
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &s[fs..i];
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(NumError::Invalid);
    }
    let shift = match s.get(i).copied().and_then(suffix_shift) {
        Some(sh) => {
            i += 1;
            sh
        }
        None => 0,
    };
    if i != s.len() {
        return Err(NumError::Invalid);
    }
    let val: u64 = if int_digits.is_empty() {
        0
    } else {
        std::str::from_utf8(int_digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or(NumError::TooLarge)?
    };
    let fraction: f64 = if has_point && !frac_digits.is_empty() {
        format!("0.{}", std::str::from_utf8(frac_digits).unwrap_or("0"))
            .parse()
            .unwrap_or(0.0)
    } else {
        0.0
    };
    if shift == 0 && fraction != 0.0 {
        return Err(NumError::Invalid);
    }
    let mul = 1u64 << shift;
    if val > u64::MAX / mul || val.wrapping_mul(mul) >= 0xffff_ffff_ffff_fc00 {
        return Err(NumError::TooLarge);
    }
    let v = val * mul + (fraction * mul as f64) as u64;
    if v > i64::MAX as u64 {
        return Err(NumError::TooLarge);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_like_qemu_strtosz() {
        let ok = [
            ("0x10", 16),
            ("0X10", 16),
            ("1.0", 1),
            ("1.0k", 1024),
            ("1b", 1),
            ("1B", 1),
            ("1e", 1 << 60),
            ("0.5k", 512),
            (".5k", 512),
            ("5.", 5),
            ("5.k", 5120),
            ("+1", 1),
            ("010", 10),
            ("1.5k", 1536),
            ("9223372036854775807", i64::MAX as u64),
        ];
        for (t, v) in ok {
            assert_eq!(parse_size(t), Ok(v), "{t}");
        }
        let invalid = [
            "0x10k", "1.5", "1.5B", "1kB", "0x", "00x10", "1e3", "1_0", "", "-1", "abc", ".",
        ];
        for t in invalid {
            assert_eq!(parse_size(t), Err(NumError::Invalid), "{t}");
        }
        let large = [
            "8E",
            "16E",
            "99999999999999999999",
            "9223372036854775808",
            "0x8000000000000000",
        ];
        for t in large {
            assert_eq!(parse_size(t), Err(NumError::TooLarge), "{t}");
        }
    }
}
