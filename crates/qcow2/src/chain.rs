//! Resolving the backing chain an image header names (QEMU's
//! `bdrv_open_backing_file`): file names relative to the image's
//! directory, the header's backing format or a probe where it names none,
//! loops refused, depth bounded.
//!
//! The chain is walked header by header before any node is opened, so a
//! loop or an absurdly deep chain is refused without opening anything.

use crate::format::{corrupt, fixed_header_len, peek_cluster_bits, Header, MAGIC};
use sluice_core::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The deepest backing chain sluice opens from image headers.
pub const MAX_CHAIN_DEPTH: usize = 256;

/// One image below the top of a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainLink {
    /// The file name to open (already made relative to the parent's
    /// directory).
    pub filename: String,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// The file name of a backing file `backing` named by the image
/// `image` (QEMU's `bdrv_get_full_backing_filename`).
pub fn backing_path(image: Option<&str>, backing: &str) -> Result<String> {
    if backing.starts_with("json:") {
        return Err(Error::Other(format!(
            "backing file name '{backing}': json: file names are not supported"
        )));
    }
    if Path::new(backing).is_absolute() {
        return Ok(backing.to_string());
    }
    let Some(image) = image else {
        return Err(Error::Other(format!(
            "Cannot use relative backing file name '{backing}': the image's own file name is not known"
        )));
    };
    let dir = Path::new(image).parent().unwrap_or(Path::new(""));
    Ok(dir.join(backing).to_string_lossy().into_owned())
}

fn open_err(file: &str, e: std::io::Error) -> Error {
    Error::Open {
        file: file.to_string(),
        source: e,
    }
}

/// Reads the header of the qcow2 image at `path` (a plain file).
pub fn read_header_file(path: &str) -> Result<Header> {
    let mut f = std::fs::File::open(path).map_err(|e| open_err(path, e))?;
    let size = f.metadata().map_err(|e| open_err(path, e))?.len();
    let mut first = vec![0u8; size.min(512) as usize];
    f.read_exact(&mut first).map_err(|e| open_err(path, e))?;
    let mut want = fixed_header_len(&first) as u64;
    if let Some(bits) = peek_cluster_bits(&first) {
        want = want.max(1 << bits);
    }
    let want = want.min(size) as usize;
    if want > first.len() {
        let mut rest = vec![0u8; want - first.len()];
        f.read_exact(&mut rest).map_err(|e| open_err(path, e))?;
        first.extend_from_slice(&rest);
    }
    Header::parse(&first, size, path)
}

/// The format of the image at `path` by its first bytes: `qcow2` or
/// `raw` (a raw file is never guessed to be anything else).
pub fn probe(path: &str) -> Result<&'static str> {
    let mut f = std::fs::File::open(path).map_err(|e| open_err(path, e))?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        match f.read(&mut magic[n..]).map_err(|e| open_err(path, e))? {
            0 => break,
            k => n += k,
        }
    }
    Ok(if n == 4 && u32::from_be_bytes(magic) == MAGIC {
        "qcow2"
    } else {
        "raw"
    })
}

fn identity(path: &str) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| open_err(path, e))
}

/// The chain below the image `top_file` whose header is `top`: each
/// backing image with its format, top-down. Empty when the header names
/// no backing file.
pub fn resolve(top_file: Option<&str>, top: &Header) -> Result<Vec<ChainLink>> {
    let mut links = Vec::new();
    let Some(mut backing) = top.backing_file.clone() else {
        return Ok(links);
    };
    let mut fmt = top.backing_format.clone();
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut parent: Option<String> = top_file.map(str::to_string);
    if let Some(p) = &parent {
        if let Ok(id) = identity(p) {
            seen.push(id);
        }
    }
    loop {
        if links.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::Other(format!(
                "backing chain of '{}' is deeper than {MAX_CHAIN_DEPTH} images",
                top_file.unwrap_or("the image")
            )));
        }
        let path = backing_path(parent.as_deref(), &backing)?;
        let id = identity(&path)?;
        if seen.contains(&id) {
            return Err(Error::Other(format!(
                "backing chain of '{}' loops: '{path}' is already in the chain",
                top_file.unwrap_or("the image")
            )));
        }
        seen.push(id);
        let format = match fmt.as_deref() {
            Some("qcow2") => "qcow2".to_string(),
            Some("raw") => "raw".to_string(),
            Some(other) => {
                return Err(corrupt(
                    parent.as_deref().unwrap_or("image"),
                    format!("backing file '{path}' has format '{other}', which sluice cannot open (Unknown driver '{other}')"),
                ))
            }
            None => probe(&path)?.to_string(),
        };
        links.push(ChainLink {
            filename: path.clone(),
            format: format.clone(),
        });
        if format != "qcow2" {
            return Ok(links);
        }
        let h = read_header_file(&path)?;
        match h.backing_file {
            Some(b) => {
                backing = b;
                fmt = h.backing_format;
                parent = Some(path);
            }
            None => return Ok(links),
        }
    }
}
