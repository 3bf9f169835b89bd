//! Compression and decompression of compressed clusters.
//!
//! QEMU writes zlib clusters as raw deflate streams (no zlib header, a
//! 4 KiB window) and zstd clusters as zstd frames. The stored length is
//! rounded up to 512-byte sectors, so the input may carry trailing bytes
//! that belong to the next cluster: decompression stops once a whole
//! cluster has come out, as QEMU's does.

use crate::format::CompressionType;
use std::io::Read;

/// Decompresses `input` into exactly `out.len()` bytes.
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) => {}
        Err(e) => return Err(format!("zlib decompression failed: {e}")),
    }
    if d.total_out() as usize != out.len() {
        return Err(format!(
            "zlib stream produced {} bytes, expected {}",
            d.total_out(),
            out.len()
        ));
    }
    Ok(())
}

fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    let mut dec = zstd::stream::read::Decoder::with_buffer(input)
        .map_err(|e| format!("zstd decompression failed: {e}"))?;
    dec.read_exact(out)
        .map_err(|e| format!("zstd decompression failed: {e}"))
}

/// Compresses one cluster as QEMU writes it: a raw deflate stream with
/// a 4 KiB window (QEMU's `deflateInit2` window bits -12) at the default
/// level, or a zstd frame at zstd's default level. `None` when the result does not fit in
/// `max_len` bytes (QEMU asks for less than a cluster, else it writes
/// the cluster uncompressed).
pub fn compress(kind: CompressionType, input: &[u8], max_len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; max_len];
    let n = match kind {
        CompressionType::Zlib => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            match c.compress(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => c.total_out() as usize,
                _ => return None,
            }
        }
        // An error here is "the output does not fit" in practice; the
        // caller then writes the data uncompressed, which is always right.
        CompressionType::Zstd => zstd::bulk::compress_to_buffer(input, &mut out, 0).ok()?,
    };
    out.truncate(n);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xAA; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zlib, &c[..c.len() / 4], &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn compress_round_trips_and_refuses_what_does_not_shrink() {
        let data: Vec<u8> = (0..65536u32)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &data, 65535).unwrap();
            assert!(c.len() < 65535);
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data, "{kind:?}");
            // Random bytes do not shrink.
            let mut x = 0x1234_5678_9abc_def0u64;
            let noise: Vec<u8> = (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert!(compress(kind, &noise, 65535).is_none(), "{kind:?}");
        }
    }

    #[test]
    fn zstd_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0x55; 200]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
