//! sluice-control: how users steer sluice: the options model shared by
//! the command line (`--blockdev`, `--image-opts`) and QMP, and the QMP
//! monitor itself, and the QMP commands of block jobs.

pub mod jobs;
pub mod keyval;
pub mod objects;
pub mod qmp;
pub mod reopen;
