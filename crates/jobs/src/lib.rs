//! sluice-jobs: live block jobs with QEMU's job state machine.
//!
//! * [`status`] — `JobStatus`, `JobVerb` and `job.c`'s two tables.
//! * [`job`] — [`Job`], [`JobManager`], [`JobTxn`], the [`JobDriver`]
//!   trait every job kind implements; pauses, rate limits, error policy.
//! * [`events`] — the bus carrying `JOB_STATUS_CHANGE`, `BLOCK_JOB_*`.
//! * [`stream`], [`commit`], [`mirror`] (also active commit), [`backup`] —
//!   the block job kinds; [`create`] — `blockdev-create`. Each ends with its graph
//!   change in `prepare`, inside a drained section, as one transaction.

pub mod backup;
mod batch;
mod bitmap;
pub mod chain;
pub mod commit;
pub mod create;
pub mod events;
pub mod filters;
pub mod job;
pub mod mirror;
pub mod status;
pub mod stream;

pub use events::{EventBus, JobEvent};
pub use job::{ErrorAction, Job, JobDriver, JobManager, JobOptions, JobTxn, OnError};
pub use status::{JobStatus, JobVerb};
