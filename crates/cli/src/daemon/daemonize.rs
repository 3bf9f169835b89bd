//! `--daemonize`, as qemu-storage-daemon does it (`os_daemonize` and
//! `os_setup_post` in QEMU's `os-posix.c`): the process forks; the parent
//! waits on a pipe and exits 0 only when the daemon writes a zero byte
//! there, once it is set up (sockets listening, pid file written), and 1
//! if the pipe closes first (setup failed: the daemon has printed why on
//! the stderr it still shares). The daemon starts a new session and forks
//! again, so that it is no session leader and cannot get a terminal back;
//! when ready it moves to `/` and points stdin, stdout and stderr at
//! `/dev/null`.
//!
//! Forking is only sound while the process has one thread: call
//! [`daemonize`] before the runtime starts.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The daemon's end of the pipe to the waiting parent.
pub struct Ready {
    pipe: File,
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Forks. Returns in the daemon only; the original process exits with
/// the daemon's verdict.
pub fn daemonize() -> Result<Ready, String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("cannot create a pipe"));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process has a single thread here (see the module docs).
    match unsafe { libc::fork() } {
        -1 => Err(os_error("cannot fork")),
        0 => {
            drop(rd);
            // SAFETY: plain system calls without memory arguments.
            unsafe {
                libc::setsid();
                match libc::fork() {
                    -1 => libc::_exit(1),
                    0 => {}
                    // The session leader goes; the parent waits on the pipe.
                    _ => libc::_exit(0),
                }
            }
            Ok(Ready {
                pipe: File::from(wr),
            })
        }
        _ => {
            drop(wr);
            let mut rd = File::from(rd);
            let mut status = [1u8];
            let ok = loop {
                match rd.read(&mut status) {
                    Ok(n) => break n == 1 && status[0] == 0,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break false,
                }
            };
            std::process::exit(if ok { 0 } else { 1 });
        }
    }
}

impl Ready {
    /// Setup is complete: detach from the terminal and the working
    /// directory, then release the parent.
    pub fn done(mut self) -> Result<(), String> {
        std::env::set_current_dir("/").map_err(|e| format!("cannot change to '/': {e}"))?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| format!("cannot open /dev/null: {e}"))?;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors, which stay open.
            if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                return Err(os_error("cannot redirect standard I/O"));
            }
        }
        self.pipe
            .write_all(&[0])
            .map_err(|e| format!("cannot report readiness: {e}"))
    }
}
