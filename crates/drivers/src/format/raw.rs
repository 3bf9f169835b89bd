//! `raw`: the image file as is, optionally a window of it (`offset`, `size`).

use async_trait::async_trait;
use sluice_core::perm::ChildPermModel;
use sluice_core::{
    BlockDriver, DebugEvent, DriverStatus, Error, IoBytes, Node, PermPair, ReadBuf, Result, Role,
    WriteFlags, ZeroFlags,
};

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawOptions {
    /// The image's protocol node: a node-name or nested options.
    pub file: serde_json::Value,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub size: Option<u64>,
}

pub struct RawDriver {
    offset: u64,
}

impl RawDriver {
    /// Checks the window against the file's size; returns the driver and
    /// the node's size.
    pub fn open(opts: &RawOptions, file_size: u64) -> Result<(RawDriver, u64)> {
        let offset = opts.offset.unwrap_or(0);
        if offset > file_size {
            return Err(Error::invalid_option(
                "raw",
                format!("The sum of offset ({offset}) and size (0) has to be smaller or equal to the  actual size of the containing file ({file_size})"),
            ));
        }
        let size = match opts.size {
            Some(s) => {
                if offset.checked_add(s).is_none_or(|end| end > file_size) {
                    return Err(Error::invalid_option(
                        "raw",
                        format!("The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({file_size})"),
                    ));
                }
                s
            }
            None => file_size - offset,
        };
        Ok((RawDriver { offset }, size))
    }
}

#[async_trait]
impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    /// Passes through: the `file` child switches on its own (core
    /// reopens it first or after, as the direction needs).
    async fn reopen(&self, _node: &Node, _read_only: bool) -> Result<()> {
        Ok(())
    }

    fn child_perm(&self, _role: Role, parents: PermPair, node_writable: bool) -> PermPair {
        // raw shows its file as it is: forward what the parents need.
        ChildPermModel::Filter.child_perm(parents, node_writable)
    }

    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
        let file = node.required_child(Role::File)?;
        file.debug_event(DebugEvent::ReadAio).await;
        file.read(self.offset + offset, buf).await
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        let file = node.required_child(Role::File)?;
        file.debug_event(DebugEvent::WriteAio).await;
        file.write(self.offset + offset, data, flags).await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        node.required_child(Role::File)?
            .write_zeroes(self.offset + offset, len, flags)
            .await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        node.required_child(Role::File)?
            .discard(self.offset + offset, len)
            .await
    }

    async fn flush(&self, node: &Node) -> Result<()> {
        node.required_child(Role::File)?.flush().await
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::Passthrough {
            len,
            child: Role::File,
            offset: self.offset + offset,
        })
    }
}
