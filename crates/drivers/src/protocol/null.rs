//! `null-co` and `null-aio`: QEMU's null block drivers. Writes are dropped,
//! reads return zeroes (or leave the buffer alone without `read-zeroes`),
//! optionally after `latency-ns`. They measure the block layer's own
//! per-request overhead.

use async_trait::async_trait;
use sluice_core::{
    BlockDriver, DriverStatus, IoBytes, Node, ReadBuf, Result, WriteFlags, ZeroFlags,
};
use std::time::Duration;

/// QEMU's default size of a null device: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NullOptions {
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub latency_ns: Option<u64>,
    #[serde(default)]
    pub read_zeroes: Option<bool>,
}

pub struct NullDriver {
    name: &'static str,
    latency: Option<Duration>,
    read_zeroes: bool,
    /// `null-aio` completes from a later turn of the event loop, as QEMU's
    /// does from a bottom half; `null-co` completes in place.
    deferred: bool,
}

impl NullDriver {
    pub fn new(aio: bool, opts: &NullOptions) -> NullDriver {
        NullDriver {
            name: if aio { "null-aio" } else { "null-co" },
            latency: opts.latency_ns.filter(|&n| n > 0).map(Duration::from_nanos),
            read_zeroes: opts.read_zeroes.unwrap_or(false),
            deferred: aio,
        }
    }

    async fn complete(&self) {
        if let Some(l) = self.latency {
            tokio::time::sleep(l).await;
        } else if self.deferred {
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl BlockDriver for NullDriver {
    fn driver_name(&self) -> &'static str {
        self.name
    }

    /// Nothing is stored: nothing to switch.
    async fn reopen(&self, _node: &Node, _read_only: bool) -> Result<()> {
        Ok(())
    }

    async fn read(&self, _node: &Node, _offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        if self.read_zeroes {
            buf.fill(0);
        }
        self.complete().await;
        Ok(())
    }

    async fn write(
        &self,
        _node: &Node,
        _offset: u64,
        _data: IoBytes,
        _flags: WriteFlags,
    ) -> Result<()> {
        self.complete().await;
        Ok(())
    }

    async fn write_zeroes(
        &self,
        _node: &Node,
        _offset: u64,
        _len: u64,
        _flags: ZeroFlags,
    ) -> Result<()> {
        self.complete().await;
        Ok(())
    }

    async fn flush(&self, _node: &Node) -> Result<()> {
        self.complete().await;
        Ok(())
    }

    async fn block_status(&self, _node: &Node, _offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(if self.read_zeroes {
            DriverStatus::Zero { len, offset: None }
        } else {
            DriverStatus::Data { len, offset: None }
        })
    }
}
