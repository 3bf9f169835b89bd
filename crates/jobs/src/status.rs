//! The job state machine: QEMU's `JobStatus`, `JobVerb` and the two tables
//! of `job.c` that say which transitions and which user commands each
//! state allows. Everything else in this crate asks these tables.

use std::fmt;

/// A job's state, with QEMU's names (`qapi/job.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

/// A command a user may send to a job (`JobVerb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
}

impl JobStatus {
    pub const ALL: [JobStatus; 10] = [
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether the state machine allows moving from `self` to `to`
    /// (`JobSTT`).
    pub fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// Whether a user may send `verb` in this state (`JobVerbTable`).
    pub fn allows(self, verb: JobVerb) -> bool {
        use JobStatus::*;
        match verb {
            JobVerb::Cancel => matches!(
                self,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
                matches!(self, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => self == Ready,
            JobVerb::Finalize => self == Pending,
            JobVerb::Dismiss => self == Concluded,
        }
    }

    /// The work is over (successfully or not): `job_is_completed`.
    pub fn is_completed(self) -> bool {
        use JobStatus::*;
        matches!(self, Waiting | Pending | Aborting | Concluded | Null)
    }

    /// In sync and waiting to be completed: `job_is_ready`.
    pub fn is_ready(self) -> bool {
        matches!(self, JobStatus::Ready | JobStatus::Standby)
    }
}

impl JobVerb {
    pub const ALL: [JobVerb; 7] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Finalize,
        JobVerb::Dismiss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
