//! Decompression of compressed clusters.
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
