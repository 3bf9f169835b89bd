//! sluice-control: how users steer sluice. For now the options model
//! shared by the command line (`--blockdev`, `--image-opts`) and QMP.

pub mod keyval;
