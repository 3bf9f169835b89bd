//! Numbers in and out the way qemu-io reads and prints them: `cvtnum`
//! (QEMU's `qemu_strtosz`), pattern bytes (`strtol` base 0), `cvtstr`
//! sizes, the two report lines and the `-v` hex dump.

use std::time::Duration;

pub use sluice_drivers::size::{num_error_text, parse_size as cvtnum, NumError};

/// C's `strtol(arg, &end, 0)` requiring the whole string to be used.
pub fn strtol0(text: &str) -> Option<i64> {
    let t = text.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() {
        // "0" alone is handled by radix 10; "0x" leaves an 'x' unparsed.
        return if radix == 8 { Some(0) } else { None };
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i128::from_str_radix(digits, radix).unwrap_or(i128::MAX);
    let v = v.min(i64::MAX as i128) as i64;
    Some(if neg { -v } else { v })
}

/// qemu-io's `parse_pattern`: a byte given as `strtol` base 0 reads it.
pub fn parse_pattern(arg: &str) -> Result<u8, String> {
    match strtol0(arg) {
        Some(v) if (0..=255).contains(&v) => Ok(v as u8),
        _ => Err(format!("{arg} is not a valid pattern byte")),
    }
}

/// qemu-io's `cvtstr`: `1 MiB`, `1.500 KiB`, `100 bytes`.
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, " EiB"),
        (50, " PiB"),
        (40, " TiB"),
        (30, " GiB"),
        (20, " MiB"),
        (10, " KiB"),
    ];
    let (mut s, suffix) = UNITS
        .iter()
        .find(|(shift, _)| value >= (1u64 << shift) as f64)
        .map(|(shift, suffix)| (format!("{:.3}", value / (1u64 << shift) as f64), *suffix))
        .unwrap_or_else(|| (format!("{value:.6}"), " bytes"));
    if let Some(i) = s.find(".000") {
        s.truncate(i);
    }
    s.push_str(suffix);
    s
}

/// qemu-io's `timestr`: `00.00 sec`, or `h:mm:ss.ss` when verbose (`-C`)
/// or a second or longer.
pub fn timestr(t: Duration, verbose: bool) -> String {
    let secs = t.as_secs();
    let frac = t.subsec_nanos() as f64 / 1e9;
    if verbose || secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs % 3600) / 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    }
}

fn tdiv(value: f64, t: Duration) -> f64 {
    value / t.as_secs_f64()
}

/// The two report lines of a finished request (one line with `-C`).
pub fn report(
    op: &str,
    t: Duration,
    offset: u64,
    count: u64,
    total: u64,
    cnt: u32,
    cflag: bool,
) -> String {
    let ts = timestr(t, cflag);
    if cflag {
        format!(
            "{total},{cnt},{ts},{:.3},{:.3}\n",
            tdiv(total as f64, t),
            tdiv(cnt as f64, t)
        )
    } else {
        format!(
            "{op} {total}/{count} bytes at offset {offset}\n{}, {cnt} ops; {ts} ({}/sec and {:.4} ops/sec)\n",
            cvtstr(total as f64),
            cvtstr(tdiv(total as f64, t)),
            tdiv(cnt as f64, t)
        )
    }
}

/// qemu-io's `dump_buffer` (`-v`): 16 bytes a line, hex then ASCII.
pub fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut out = String::with_capacity(buf.len() * 4 + 16);
    for (i, chunk) in buf.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}:  ", offset + i as u64 * 16));
        for b in chunk {
            out.push_str(&format!("{b:02x} "));
        }
        out.push(' ');
        for &b in chunk {
            out.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    out
}

/// `strerror(errno)` without Rust's "(os error N)".
pub fn strerror(errno: i32) -> String {
    sluice_core::error::os_text(&std::io::Error::from_raw_os_error(errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_like_strtol() {
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("07"), Ok(7));
        assert_eq!(parse_pattern("0"), Ok(0));
        assert_eq!(parse_pattern("255"), Ok(255));
        for bad in ["256", "-1", "0x", "\"\"", "1k", "08"] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_print_like_cvtstr() {
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(100.0), "100 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(0.175472), "0.175472 bytes");
        assert_eq!(cvtstr(i64::MAX as f64), "8 EiB");
    }

    #[test]
    fn times_and_dumps_print_like_qemu_io() {
        assert_eq!(timestr(Duration::from_micros(1200), false), "00.00 sec");
        assert_eq!(timestr(Duration::from_millis(1500), false), "0:00:01.50");
        assert_eq!(timestr(Duration::from_millis(20), true), "0:00:00.02");
        assert_eq!(
            dump_buffer(&[0xcd; 20], 0),
            "00000000:  cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd  ................\n00000010:  cd cd cd cd  ....\n"
        );
        assert_eq!(
            dump_buffer(b"hello", 16),
            "00000010:  68 65 6c 6c 6f  hello\n"
        );
    }
}
