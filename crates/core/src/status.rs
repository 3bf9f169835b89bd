//! Block status through backing chains: what `qemu-img map` and NBD's
//! `base:allocation` and `qemu:allocation-depth` contexts report.

use crate::driver::DriverStatus;
use crate::error::{Error, Result};
use crate::graph::{Node, Role};
use std::sync::Arc;

/// One run of bytes with the same status, seen from a chain's top node.
/// Field names follow `qemu-img map --output=json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// How many backing links down the layer that decided this run lies
    /// (0: the top layer itself).
    pub depth: u32,
    /// Allocated in some layer of the chain.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Holds data (as opposed to a zero or unallocated run).
    pub data: bool,
    /// Where the data lies in the image file, when the driver can tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The node whose `file` holds the bytes at `offset` (for `map` output).
    #[serde(skip)]
    pub file_node: Option<String>,
}

/// Walks `node`'s chain for the status at `offset`, covering up to `len`
/// bytes: filters and raw layers are looked through, unallocated runs fall
/// through to the backing child one level deeper.
pub async fn block_status_chain(node: &Arc<Node>, offset: u64, len: u64) -> Result<Extent> {
    // The answer may cover less than asked: a query longer than a request
    // may be is answered for its start.
    let len = len.min(crate::graph::MAX_REQUEST_BYTES);
    node.check_request(offset, len)?;
    let start = offset;
    let mut cur = node.clone();
    let mut off = offset;
    let mut len = len;
    let mut depth = 0u32;
    // Bounded: a chain can only be as deep as the graph has nodes; the
    // walk also stops at the first layer that decides.
    for _ in 0..4096 {
        let st = cur.block_status(off, len).await?;
        let (data, zero, at) = match st {
            DriverStatus::Data { len, offset } => (true, false, offset.map(|o| (o, len))),
            DriverStatus::Zero { len, offset } => (false, true, offset.map(|o| (o, len))),
            DriverStatus::Unallocated { len: l } => {
                len = l;
                match cur.child(Role::Backing) {
                    Some(b) if off < b.size() => {
                        len = len.min(b.size() - off);
                        cur = b;
                        depth += 1;
                        continue;
                    }
                    _ => {
                        // No backing, or past the backing's end: the run is
                        // decided (as zeroes) at this depth, as QEMU's map
                        // reports it.
                        return Ok(Extent {
                            start,
                            length: len,
                            depth,
                            present: false,
                            zero: true,
                            data: false,
                            offset: None,
                            file_node: None,
                        });
                    }
                }
            }
            DriverStatus::Passthrough {
                len: l,
                child,
                offset: o,
            } => {
                let next = cur.child(child).ok_or_else(|| {
                    Error::Other(format!(
                        "{}: block status refers to a missing '{}' child",
                        cur.name(),
                        child
                    ))
                })?;
                cur = next;
                off = o;
                len = l;
                continue;
            }
        };
        let length = st.len();
        let file_node = at.map(|_| {
            cur.child(Role::File)
                .map(|f| f.name().to_string())
                .unwrap_or_else(|| cur.name().to_string())
        });
        return Ok(Extent {
            start,
            length,
            depth,
            present: true,
            zero,
            data,
            offset: at.map(|(o, _)| o),
            file_node,
        });
    }
    Err(Error::Other(format!(
        "{}: block status walk did not end",
        node.name()
    )))
}

/// All extents of `[offset, offset + len)`, merged where adjacent runs agree.
pub async fn map_range(node: &Arc<Node>, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let e = block_status_chain(node, pos, end - pos).await?;
        pos += e.length;
        if let Some(last) = out.last_mut() {
            let contiguous_offset = match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.length == b,
                (None, None) => true,
                _ => false,
            };
            if last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && last.file_node == e.file_node
                && contiguous_offset
            {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}
