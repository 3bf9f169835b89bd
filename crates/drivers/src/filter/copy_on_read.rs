//! `copy-on-read`: reads of data that the top layer does not hold yet are
//! written into it, so the chain below is needed less (what `block-stream`
//! uses). With `bottom`, only data above `bottom` is copied.

use async_trait::async_trait;
use sluice_core::{
    BlockDriver, DebugEvent, DriverStatus, IoBuf, IoBytes, Node, Perm, PermPair, ReadBuf, Result,
    Role, WriteFlags, ZeroFlags,
};
use std::sync::Arc;

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CorOptions {
    pub file: serde_json::Value,
    #[serde(default)]
    pub bottom: Option<String>,
}

pub struct CopyOnReadDriver {
    /// Copy only what lies above this node (a node-name in the chain).
    bottom: Option<String>,
}

impl CopyOnReadDriver {
    pub fn new(bottom: Option<String>) -> CopyOnReadDriver {
        CopyOnReadDriver { bottom }
    }

    /// Whether the start of `[offset, offset+len)` is missing from `top`
    /// but allocated in a layer down to `bottom` inclusive (anywhere below,
    /// without a bottom): that is data to copy up. Filters are looked through.
    /// Returns the answer and the length it holds for.
    async fn needs_copy(&self, top: &Arc<Node>, offset: u64, len: u64) -> Result<(bool, u64)> {
        let mut cur = top.clone();
        let (mut off, mut len) = (offset, len);
        let mut below_top = false;
        for _ in 0..4096 {
            match cur.block_status(off, len).await? {
                DriverStatus::Passthrough {
                    len: l,
                    child,
                    offset: o,
                } => {
                    let Some(next) = cur.child(child) else {
                        return Ok((false, l));
                    };
                    if child == Role::File && !cur.driver().is_filter() {
                        // A format's own file: this layer is allocated.
                        return Ok((below_top, l));
                    }
                    cur = next;
                    off = o;
                    len = l;
                }
                DriverStatus::Unallocated { len: l } => {
                    len = l;
                    if self.bottom.as_deref() == Some(cur.name()) {
                        // `bottom` is the last layer whose data is copied.
                        return Ok((false, len));
                    }
                    match cur.child(Role::Backing) {
                        Some(b) if off < b.size() => {
                            len = len.min(b.size() - off);
                            cur = b;
                            below_top = true;
                        }
                        _ => return Ok((false, len)),
                    }
                }
                other => return Ok((below_top, other.len())),
            }
        }
        Ok((false, len))
    }
}

#[async_trait]
impl BlockDriver for CopyOnReadDriver {
    fn driver_name(&self) -> &'static str {
        "copy-on-read"
    }

    /// A filter: its child switches on its own.
    async fn reopen(&self, _node: &Node, _read_only: bool) -> Result<()> {
        Ok(())
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn child_perm(&self, _role: Role, parents: PermPair, _node_writable: bool) -> PermPair {
        // Copying up writes data that does not change what the guest sees.
        let mut perm = parents.perm;
        if perm.contains(Perm::CONSISTENT_READ) {
            perm |= Perm::WRITE_UNCHANGED;
        }
        PermPair::new(perm, parents.shared | Perm::WRITE_UNCHANGED)
    }

    async fn read(&self, node: &Node, offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        let file = node.required_child(Role::File)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let (copy, n) = self.needs_copy(&file, pos, end - pos).await?;
            let n = n.clamp(1, end - pos);
            let rel = (pos - offset) as usize;
            let mut piece = buf.reborrow().slice(rel..rel + n as usize);
            file.read(pos, piece.reborrow()).await?;
            if copy && !file.is_read_only() {
                file.debug_event(DebugEvent::CorWrite).await;
                let data = IoBuf::copy_from(piece.as_slice()).freeze();
                file.write(
                    pos,
                    data,
                    WriteFlags {
                        copy_on_read: true,
                        ..WriteFlags::default()
                    },
                )
                .await?;
            }
            pos += n;
        }
        Ok(())
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        node.required_child(Role::File)?
            .write(offset, data, flags)
            .await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        node.required_child(Role::File)?
            .write_zeroes(offset, len, flags)
            .await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        node.required_child(Role::File)?.discard(offset, len).await
    }

    async fn flush(&self, node: &Node) -> Result<()> {
        node.required_child(Role::File)?.flush().await
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::Passthrough {
            len,
            child: Role::File,
            offset,
        })
    }
}
