//! Sizes as QEMU's tools take them (`qemu_strtosz`): a number with an
//! optional binary suffix `B`, `K`, `M`, `G`, `T`, `P`, `E` (any case);
//! fractions are allowed with a suffix (`1.5G`). No suffix means bytes.

/// Parses a size; the error says what is wrong with `text`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("'{text}' is not a size"));
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => {
            return Err(format!(
                "'{text}': unknown size suffix '{suffix}' (use B, K, M, G, T, P or E)"
            ))
        }
    };
    let value = if let Some((int, frac)) = num.split_once('.') {
        if shift == 0 {
            return Err(format!("'{text}': a fraction needs a suffix"));
        }
        let whole: f64 = format!("{}.{}", if int.is_empty() { "0" } else { int }, frac)
            .parse()
            .map_err(|_| format!("'{text}' is not a size"))?;
        let bytes = whole * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("'{text}' is too large"));
        }
        bytes as u64
    } else {
        let n: u64 = num.parse().map_err(|_| format!("'{text}' is too large"))?;
        n.checked_mul(1u64 << shift)
            .ok_or_else(|| format!("'{text}' is too large"))?
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_qemu() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2E"), Ok(2 << 60));
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "-1", "1Z", "k", "1.5", "16E", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
