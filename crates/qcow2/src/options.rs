//! The options of a `qcow2` node (QEMU's `BlockdevOptionsQcow2`).

use serde_json::{Map, Value};
use sluice_core::{Error, Result};
use std::time::Duration;

/// QEMU's default `cache-clean-interval` on Linux (seconds).
pub const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;
/// QEMU's `DEFAULT_L2_CACHE_MAX_SIZE`: the default L2 cache covers the
/// whole disk up to this many bytes of tables (256 GiB of disk at 64 KiB
/// clusters).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// The image file: a node-name or nested options.
    pub file: Value,
    /// `None`: the header decides; `Some(Null)`: no backing file;
    /// otherwise a node-name or nested options.
    pub backing: Option<Value>,
    /// The external data file: a node-name or nested options.
    pub data_file: Option<Value>,
    pub l2_cache_size: Option<u64>,
    pub l2_cache_entry_size: Option<u64>,
    pub refcount_cache_size: Option<u64>,
    pub cache_size: Option<u64>,
    pub cache_clean_interval: Option<u64>,
    pub lazy_refcounts: Option<bool>,
}

fn err(msg: impl Into<String>) -> Error {
    Error::invalid_option("qcow2", msg)
}

fn as_u64(key: &str, v: Value) -> Result<u64> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            err(format!(
                "Parameter '{key}' expects a non-negative integer, got {n}"
            ))
        }),
        Value::String(s) => parse_size(&s)
            .ok_or_else(|| err(format!("Parameter '{key}' expects a size, got '{s}'"))),
        other => Err(err(format!(
            "Invalid parameter type for '{key}', expected: integer, got {other}"
        ))),
    }
}

/// A size as QEMU's `qemu_strtosz` reads it (for `-o` options and
/// keyval alike): a decimal number with an optional fraction and an
/// optional binary suffix `B`, `K`, `M`, `G`, `T`, `P` or `E` (either
/// case). `None` when it is not one or does not fit in 64 bits.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some(c @ ('B' | 'K' | 'M' | 'G' | 'T' | 'P' | 'E')) => {
            let shift = "BKMGTPE".find(c).expect("listed") as u32 * 10;
            (&s[..s.len() - 1], shift)
        }
        _ => (s, 0),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift);
    }
    let f: f64 = num.parse().ok()?;
    let v = f * (1u64 << shift) as f64;
    (0.0..18446744073709550000.0)
        .contains(&v)
        .then_some(v as u64)
}

/// QEMU's spellings of a boolean option value.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

fn as_bool(key: &str, v: Value) -> Result<bool> {
    let b = match &v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => parse_bool(s),
        _ => None,
    };
    b.ok_or_else(|| {
        err(format!(
            "Invalid parameter type for '{key}', expected: boolean, got {v}"
        ))
    })
}

impl Qcow2Options {
    /// Parses the driver-specific options (the common ones — `driver`,
    /// `node-name`, `read-only`, `cache` — already taken out).
    pub fn parse(mut map: Map<String, Value>) -> Result<Qcow2Options> {
        let file = map
            .remove("file")
            .ok_or_else(|| err("Parameter 'file' is missing"))?;
        let mut o = Qcow2Options {
            file,
            backing: map.remove("backing"),
            data_file: map.remove("data-file"),
            ..Qcow2Options::default()
        };
        for (key, value) in map {
            match key.as_str() {
                "l2-cache-size" => o.l2_cache_size = Some(as_u64(&key, value)?),
                "l2-cache-entry-size" => o.l2_cache_entry_size = Some(as_u64(&key, value)?),
                "refcount-cache-size" => o.refcount_cache_size = Some(as_u64(&key, value)?),
                "cache-size" => o.cache_size = Some(as_u64(&key, value)?),
                "cache-clean-interval" => o.cache_clean_interval = Some(as_u64(&key, value)?),
                "lazy-refcounts" => o.lazy_refcounts = Some(as_bool(&key, value)?),
                // Accepted for compatibility; they only matter for writes
                // and metadata checks sluice does its own way.
                "pass-discard-request"
                | "pass-discard-snapshot"
                | "pass-discard-other"
                | "discard-no-unref" => {
                    as_bool(&key, value)?;
                }
                "overlap-check" => {}
                "encrypt" => {
                    return Err(err("encrypted qcow2 images are not supported"));
                }
                _ => return Err(err(format!("Invalid parameter '{key}'"))),
            }
        }
        if o.cache_size.is_some() && o.l2_cache_size.is_some() && o.refcount_cache_size.is_some() {
            return Err(err(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            ));
        }
        if let Some(i) = o.cache_clean_interval {
            if i > u64::from(u32::MAX) {
                return Err(err("Cache clean interval too big"));
            }
        }
        Ok(o)
    }

    /// How many L2 tables the cache holds for an image of `virtual_size`
    /// bytes with `cluster_size`-byte clusters and `entry_size`-byte L2
    /// entries (QEMU's `read_cache_sizes`).
    pub fn l2_cache_tables(
        &self,
        virtual_size: u64,
        cluster_size: u64,
        entry_size: u64,
    ) -> Result<usize> {
        let entries_per_table = cluster_size / entry_size;
        let tables_for_disk = virtual_size
            .div_ceil(cluster_size * entries_per_table)
            .max(1);
        let max_l2_cache = tables_for_disk.saturating_mul(cluster_size);
        let bytes = match (self.l2_cache_size, self.cache_size) {
            (Some(l2), Some(total)) if l2 > total => {
                return Err(err(format!(
                    "l2-cache-size ({l2}) may not exceed cache-size ({total})"
                )))
            }
            (Some(l2), _) => l2,
            (None, Some(total)) => total.min(max_l2_cache),
            (None, None) => max_l2_cache.min(DEFAULT_L2_CACHE_MAX),
        };
        if let Some(e) = self.l2_cache_entry_size {
            if !e.is_power_of_two() || e < 512 || e > cluster_size {
                return Err(err(format!(
                    "L2 cache entry size must be a power of two between 512 and the cluster size ({cluster_size})"
                )));
            }
        }
        let tables = (bytes / cluster_size).max(2);
        // Never more tables than the disk has: memory stays bounded by the
        // image even when a huge cache is asked for.
        Ok(tables.min(tables_for_disk.max(2)).min(usize::MAX as u64) as usize)
    }

    pub fn clean_interval(&self) -> Option<Duration> {
        match self
            .cache_clean_interval
            .unwrap_or(DEFAULT_CACHE_CLEAN_INTERVAL)
        {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Qcow2Options> {
        Qcow2Options::parse(v.as_object().unwrap().clone())
    }

    #[test]
    fn default_l2_cache_covers_8_gib_at_64k() {
        let o = parse(json!({"file": "f"})).unwrap();
        let tables = o.l2_cache_tables(8 << 30, 65536, 8).unwrap();
        assert!(tables as u64 * 8192 * 65536 >= 8 << 30);
        let tables = o.l2_cache_tables(1 << 40, 65536, 8).unwrap();
        assert_eq!(tables as u64 * 65536, DEFAULT_L2_CACHE_MAX);
    }

    #[test]
    fn sizes_and_booleans_as_qemu_spells_them() {
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size(" 2M "), Some(2 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("512b"), Some(512));
        assert_eq!(parse_size("1E"), Some(1 << 60));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_bool("on"), Some(true));
        assert_eq!(parse_bool("no"), Some(false));
        assert_eq!(parse_bool("1"), None);
    }

    #[test]
    fn options_are_checked() {
        assert!(parse(json!({})).is_err());
        assert!(parse(json!({"file": "f", "bogus": 1})).is_err());
        let o = parse(json!({"file": "f", "l2-cache-size": "1M", "backing": null})).unwrap();
        assert_eq!(o.l2_cache_size, Some(1 << 20));
        assert_eq!(o.backing, Some(Value::Null));
        assert!(parse(
            json!({"file": "f", "cache-size": 1, "l2-cache-size": 1, "refcount-cache-size": 1})
        )
        .is_err());
        assert!(parse(json!({"file": "f", "cache-clean-interval": 1u64 << 40})).is_err());
    }
}
