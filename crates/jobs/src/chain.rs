//! Walking a backing chain the way the jobs need it: which nodes lie
//! between an overlay and a base, and which of them holds the data.

use sluice_core::{Error, Node, Result, Role};
use std::sync::Arc;

/// The next layer below `node`: through filters to the node they filter,
/// else its backing child.
fn below(node: &Arc<Node>) -> Option<Arc<Node>> {
    if node.driver().is_filter() {
        node.filtered_child()
    } else {
        node.child(Role::Backing)
    }
}

/// The node a filter stack above `node` filters, or `node` itself.
pub fn skip_filters(node: &Arc<Node>) -> Arc<Node> {
    let mut cur = node.clone();
    while cur.driver().is_filter() {
        match cur.filtered_child() {
            Some(c) => cur = c,
            None => break,
        }
    }
    cur
}

/// The nodes strictly between `top` and `base` (filters included), top
/// first; an error when `base` is not below `top`. With no base: every
/// node below `top`.
pub fn intermediates(top: &Arc<Node>, base: Option<&Arc<Node>>) -> Result<Vec<Arc<Node>>> {
    let mut out = Vec::new();
    let mut cur = below(top);
    while let Some(n) = cur {
        if base.is_some_and(|b| Arc::ptr_eq(b, &n)) {
            return Ok(out);
        }
        cur = below(&n);
        out.push(n);
    }
    match base {
        None => Ok(out),
        Some(b) => Err(Error::Other(format!(
            "Node '{}' is not a backing image of '{}'",
            b.name(),
            top.name()
        ))),
    }
}

/// The lowest non-filter node above `base` in `top`'s chain: the last
/// layer whose data a stream copies (QEMU's `base_overlay`).
pub fn base_overlay(top: &Arc<Node>, base: Option<&Arc<Node>>) -> Result<Arc<Node>> {
    let mut last = skip_filters(top);
    for n in intermediates(top, base)? {
        if !n.driver().is_filter() {
            last = n;
        }
    }
    Ok(last)
}

/// Whether the start of `[offset, offset + len)` is allocated in `top` or
/// a layer below it, above `base` (QEMU's `bdrv_is_allocated_above`), and
/// for how many bytes that answer holds. Filters are looked through.
pub async fn allocated_above(
    top: &Arc<Node>,
    base: Option<&Arc<Node>>,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut n = len;
    let mut layers = vec![top.clone()];
    layers.extend(intermediates(top, base)?);
    for layer in layers.iter().filter(|l| !l.driver().is_filter()) {
        if offset >= layer.size() {
            continue; // a shorter layer reads as zeroes here
        }
        let st = layer
            .block_status(offset, n.min(layer.size() - offset))
            .await?;
        let l = st.len().clamp(1, n);
        if !matches!(st, sluice_core::DriverStatus::Unallocated { .. }) {
            return Ok((true, l));
        }
        n = l;
    }
    Ok((false, n))
}
