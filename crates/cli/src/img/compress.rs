//! Compressed output for `convert -c`. `Qcow2Driver::write_compressed` is
//! a method of the driver, which a graph node hides behind
//! `dyn BlockDriver`; so the target is opened here by hand: its qcow2
//! driver is shared between the node (through [`Shared`], which forwards
//! every driver call) and the copy, which calls `write_compressed` on it.

use super::common::Image;
use super::convert::is_zero;
use async_trait::async_trait;
use sluice_core::{
    BlockDriver, DebugControl, DebugEvent, DriverStatus, Graph, IoBytes, Node, NodeSpec, PermPair,
    ReadBuf, Result, Role, Root, WriteFlags, ZeroFlags,
};
use sluice_drivers::protocol::file::CacheMode;
use sluice_qcow2::Qcow2Driver;
use std::sync::Arc;

/// A qcow2 driver shared with the code that opened it.
struct Shared(Arc<Qcow2Driver>);

#[async_trait]
impl BlockDriver for Shared {
    fn driver_name(&self) -> &'static str {
        self.0.driver_name()
    }
    fn request_alignment(&self) -> u32 {
        self.0.request_alignment()
    }
    fn is_filter(&self) -> bool {
        self.0.is_filter()
    }
    fn supports_backing(&self) -> bool {
        self.0.supports_backing()
    }
    fn child_perm(&self, role: Role, parents: PermPair, node_writable: bool) -> PermPair {
        self.0.child_perm(role, parents, node_writable)
    }
    fn set_perm(&self, node: &Node, cumulative: PermPair) -> Result<()> {
        self.0.set_perm(node, cumulative)
    }
    fn filename(&self) -> Option<String> {
        self.0.filename()
    }
    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
        self.0.read(node, offset, buf).await
    }
    async fn write(&self, node: &Node, offset: u64, buf: IoBytes, flags: WriteFlags) -> Result<()> {
        self.0.write(node, offset, buf, flags).await
    }
    async fn write_zeroes(&self, node: &Node, offset: u64, len: u64, f: ZeroFlags) -> Result<()> {
        self.0.write_zeroes(node, offset, len, f).await
    }
    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.0.discard(node, offset, len).await
    }
    async fn flush(&self, node: &Node) -> Result<()> {
        self.0.flush(node).await
    }
    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        self.0.block_status(node, offset, len).await
    }
    async fn truncate(&self, node: &Node, size: u64, prealloc: &str) -> Result<()> {
        self.0.truncate(node, size, prealloc).await
    }
    async fn change_backing_file(
        &self,
        node: &Node,
        file: Option<&str>,
        fmt: Option<&str>,
    ) -> Result<()> {
        self.0.change_backing_file(node, file, fmt).await
    }
    fn handles_debug_events(&self) -> bool {
        self.0.handles_debug_events()
    }
    async fn debug_event(&self, node: &Node, event: DebugEvent) {
        self.0.debug_event(node, event).await
    }
    fn debug_control(&self) -> Option<&dyn DebugControl> {
        self.0.debug_control()
    }
    fn close(&self) {
        self.0.close()
    }
}

/// Opens the qcow2 image `name` writable, without its backing file (the
/// copy writes whole clusters and never reads the target), and keeps a
/// handle on its driver for compressed writes.
pub async fn open_target(
    name: &str,
    cache: CacheMode,
) -> Result<(Image, Arc<Qcow2Driver>), String> {
    let could_not = |e: String| format!("Could not open '{name}': {e}");
    let graph = Graph::new();
    let (root, top, driver) = {
        let w = graph.writer().await;
        let file = sluice_drivers::open_with(
            &w,
            serde_json::json!({"driver": "file", "filename": name}),
            cache,
            false,
        )
        .await
        .map_err(|e| could_not(e.to_string()))?;
        let opts = sluice_qcow2::Qcow2Options {
            file: serde_json::Value::String(file.name().to_string()),
            ..Default::default()
        };
        let opened = Qcow2Driver::open(&file, &opts, false).await;
        let delete_file = || async {
            let d = w.drain(&file).await;
            let _ = w.delete_node(&d, &file).await;
        };
        let driver = match opened {
            Ok(d) if !d.header().has_data_file() => Arc::new(d),
            Ok(_) => {
                delete_file().await;
                return Err(could_not(
                    "compressed writes are not possible with an external data file".into(),
                ));
            }
            Err(e) => {
                delete_file().await;
                return Err(could_not(e.to_string()));
            }
        };
        let top = w
            .add_node(NodeSpec {
                name: None,
                driver: Box::new(Shared(driver.clone())),
                size: driver.size(),
                read_only: false,
                children: vec![(Role::File, file.clone())],
                implicit: false,
            })
            .await;
        let top = match top {
            Ok(t) => t,
            Err(e) => {
                delete_file().await;
                return Err(could_not(e.to_string()));
            }
        };
        // The file node now belongs to `top`: closing `top` closes it.
        let root = w
            .add_root("block device", "qemu-img", &top, PermPair::writer())
            .await
            .map_err(|e| could_not(e.to_string()))?;
        (root, top, driver)
    };
    Ok((
        Image {
            graph,
            root: Arc::new(root),
            name: name.to_string(),
            top,
        },
        driver,
    ))
}

/// Writes `data` at `off` (cluster-aligned) as compressed clusters of
/// `cluster` bytes. All-zero clusters are skipped when the target reads
/// as zeroes, else written as zeroes.
pub async fn write_clusters(
    dst: &Root,
    driver: &Qcow2Driver,
    off: u64,
    data: &IoBytes,
    cluster: usize,
    target_zero: bool,
) -> Result<(), String> {
    let node = dst.node();
    for (i, c) in data.chunks(cluster).enumerate() {
        let at = off + (i * cluster) as u64;
        if is_zero(c) {
            if !target_zero {
                node.write_zeroes(at, c.len() as u64, ZeroFlags::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            continue;
        }
        // A short last piece (a source shorter than the target's whole
        // sectors) is padded with zeroes to the cluster or the disk's end.
        let want = (cluster as u64).min(node.size() - at) as usize;
        let padded;
        let c = if c.len() < want {
            let mut v = c.to_vec();
            v.resize(want, 0);
            padded = v;
            &padded[..]
        } else {
            c
        };
        driver
            .write_compressed(&node, at, c)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
