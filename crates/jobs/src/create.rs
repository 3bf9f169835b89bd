//! `blockdev-create`: making an image as a job (QEMU's `create` job type,
//! not a block job: it sends only `JOB_STATUS_CHANGE`, and stays
//! `concluded` until dismissed).
//!
//! Two drivers can be created: `file` (a new host file of a size, with
//! QEMU's preallocation modes) and `qcow2` (an image written onto an
//! existing protocol node, which the job holds writable for its duration).

use crate::job::{Job, JobDriver, JobManager, JobOptions};
use async_trait::async_trait;
use parking_lot::Mutex;
use sluice_core::{Error, Node, Perm, PermPair, Result, Root};
use sluice_qcow2::create::CreateOptions;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

/// What to create.
pub enum CreateSpec {
    /// `{"driver": "file", "filename", "size", "preallocation"}`.
    File {
        filename: String,
        size: u64,
        preallocation: String,
    },
    /// `{"driver": "qcow2", "file": <node>, ...}`: the rest of the options,
    /// with QEMU's names; checked when the job runs, so that a bad value
    /// fails the job (as in QEMU) rather than the command.
    /// The file node is looked up when the job runs, too; a `data-file`
    /// node is recorded in the header by its file name.
    Qcow2 {
        file: String,
        options: serde_json::Map<String, serde_json::Value>,
    },
}

struct CreateJob {
    spec: CreateSpec,
    /// For qcow2: the job's writer on the file node.
    root: Mutex<Option<Root>>,
}

/// Starts a create job. Like QEMU's, it is dismissed by hand.
pub fn start(jobs: &JobManager, mut opts: JobOptions, spec: CreateSpec) -> Result<Arc<Job>> {
    opts.auto_dismiss = false;
    jobs.spawn(
        opts,
        Box::new(CreateJob {
            spec,
            root: Mutex::new(None),
        }),
    )
}

/// A node by name, with QEMU's message when there is none.
fn lookup(graph: &sluice_core::Graph, name: &str) -> Result<Arc<Node>> {
    graph.node(name).map_err(|_| {
        Error::Other(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

/// Creates (or truncates) `filename` at `size` bytes.
fn create_file(filename: &str, size: u64, preallocation: &str) -> Result<()> {
    let fail = |e: std::io::Error| Error::Other(format!("Could not create '{filename}': {e}"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(filename)
        .map_err(fail)?;
    match preallocation {
        "off" => f.set_len(size).map_err(fail)?,
        "falloc" => {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid descriptor owned by `f`, for its lifetime.
            let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
            if r != 0 {
                return Err(fail(std::io::Error::from_raw_os_error(r)));
            }
        }
        "full" => {
            let zeroes = vec![0u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = left.min(zeroes.len() as u64) as usize;
                f.write_all(&zeroes[..n]).map_err(fail)?;
                left -= n as u64;
            }
            f.seek(SeekFrom::Start(0)).map_err(fail)?;
            f.sync_all().map_err(fail)?;
        }
        other => {
            return Err(Error::Other(format!(
                "Parameter 'preallocation' does not accept value '{other}'"
            )))
        }
    }
    Ok(())
}

#[async_trait]
impl JobDriver for CreateJob {
    fn job_type(&self) -> &'static str {
        "create"
    }

    fn is_block_job(&self) -> bool {
        false
    }

    async fn run(&self, job: &Arc<Job>) -> Result<()> {
        job.progress_set_remaining(1);
        match &self.spec {
            CreateSpec::File {
                filename,
                size,
                preallocation,
            } => {
                let (f, s, p) = (filename.clone(), *size, preallocation.clone());
                tokio::task::spawn_blocking(move || create_file(&f, s, &p))
                    .await
                    .map_err(|e| Error::Other(format!("file creation failed: {e}")))??;
            }
            CreateSpec::Qcow2 { file, options } => {
                let graph = job.graph();
                let file = lookup(graph, file)?;
                let mut options = options.clone();
                if let Some(d) = options.remove("data-file") {
                    let name = d.as_str().unwrap_or_default();
                    let filename = lookup(graph, name)?.driver().filename().ok_or_else(|| {
                        Error::Other(format!("Node '{name}' has no file name for 'data-file'"))
                    })?;
                    options.insert("data-file".into(), filename.into());
                }
                let opts = CreateOptions::parse(options)?;
                // The job writes and resizes the file: users that do not
                // share that make it fail (as QEMU's qcow2_co_create).
                let w = job.graph().writer().await;
                let root = w
                    .add_root(
                        "job",
                        job.id(),
                        &file,
                        PermPair::new(Perm::WRITE | Perm::RESIZE, Perm::ALL),
                    )
                    .await?;
                drop(w);
                *self.root.lock() = Some(root);
                sluice_qcow2::create::create(&file, &opts).await?;
                file.flush().await?;
            }
        }
        job.progress_update(1);
        Ok(())
    }

    async fn clean(&self, _graph: &sluice_core::Graph) {
        self.root.lock().take();
    }
}
