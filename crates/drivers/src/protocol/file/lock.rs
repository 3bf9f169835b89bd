//! Image locking compatible with QEMU's `file-posix` driver.
//!
//! QEMU (block/file-posix.c) takes shared (read) open-file-description
//! byte-range locks on the image file itself:
//!
//! * byte `100 + i` (`RAW_LOCK_PERM_BASE`) for each permission bit `i` it
//!   holds;
//! * byte `200 + i` (`RAW_LOCK_SHARED_BASE`) for each permission bit `i` it
//!   does *not* share with others;
//!
//! where `i` is the bit index of `BLK_PERM_CONSISTENT_READ` (0), `WRITE` (1),
//! `WRITE_UNCHANGED` (2) and `RESIZE` (3) — the same bits as
//! [`sluice_core::Perm`].
//!
//! Taking permissions is lock-then-check, so two processes racing for the
//! same image cannot both win: first the union of the old and new bytes is
//! locked, then `F_OFD_GETLK` with a write lock tests whether another open
//! file description holds byte `200 + i` for a permission `i` we want
//! ("Failed to get "write" lock") or byte `100 + i` for a permission `i` we
//! do not share ("Failed to get shared "write" lock"). On a conflict the old
//! bytes are restored; otherwise exactly the new bytes stay locked. Locks
//! taken through one open file description never conflict with each other,
//! so a node's own locks are invisible to its checks.

use sluice_core::perm::{Perm, PermPair};
use std::io;
use std::os::fd::RawFd;

/// `RAW_LOCK_PERM_BASE`: locked for each permission held.
pub const PERM_BASE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE`: locked for each permission not shared.
pub const SHARED_BASE: i64 = 200;

/// The permission bits QEMU locks, by bit index.
const BITS: [Perm; 4] = [
    Perm::CONSISTENT_READ,
    Perm::WRITE,
    Perm::WRITE_UNCHANGED,
    Perm::RESIZE,
];

/// The lock bytes one open file holds, and the permissions they stand for.
#[derive(Debug)]
pub struct LockState {
    /// The permissions last applied.
    pub perms: PermPair,
    /// Permission bits whose `100 + i` byte is locked.
    locked_perm: Perm,
    /// Permission bits whose `200 + i` byte is locked.
    locked_unshared: Perm,
}

impl Default for LockState {
    /// Nothing held, everything shared, nothing locked (QEMU's state right
    /// after open).
    fn default() -> LockState {
        LockState {
            perms: PermPair::NONE_ALL_SHARED,
            locked_perm: Perm::empty(),
            locked_unshared: Perm::empty(),
        }
    }
}

fn flock(ty: libc::c_int, start: i64) -> libc::flock {
    // SAFETY: `flock` is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    // OFD locks require l_pid == 0.
    fl.l_pid = 0;
    fl
}

fn fcntl_lock(fd: RawFd, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: `fl` is a valid flock for the duration of the call.
        let ret = unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes (`lock`) or drops a shared lock on one byte.
fn set_byte(fd: RawFd, byte: i64, lock: bool) -> io::Result<()> {
    let mut fl = flock(if lock { libc::F_RDLCK } else { libc::F_UNLCK }, byte);
    fcntl_lock(fd, libc::F_OFD_SETLK, &mut fl)
}

/// Whether another open file description holds a lock on `byte`.
fn byte_taken(fd: RawFd, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether OFD locks work on `fd` (they need Linux 3.15 and a file system
/// that supports them).
pub fn ofd_supported(fd: RawFd) -> bool {
    byte_taken(fd, PERM_BASE).is_ok()
}

/// Locks the bytes for `perm` / `unshared`; with `unlock`, also drops the
/// bytes locked now but not asked for. Updates `st` as it goes.
fn apply_bytes(
    fd: RawFd,
    st: &mut LockState,
    perm: Perm,
    unshared: Perm,
    unlock: bool,
) -> Result<(), String> {
    for (i, bit) in BITS.iter().enumerate() {
        let i = i as i64;
        for (base, want, locked) in [
            (PERM_BASE, perm, &mut st.locked_perm),
            (SHARED_BASE, unshared, &mut st.locked_unshared),
        ] {
            if want.contains(*bit) && !locked.contains(*bit) {
                set_byte(fd, base + i, true)
                    .map_err(|e| lock_err(format!("Failed to lock byte {}", base + i), e))?;
                locked.insert(*bit);
            } else if unlock && locked.contains(*bit) && !want.contains(*bit) {
                set_byte(fd, base + i, false)
                    .map_err(|e| format!("Failed to unlock byte {}: {e}", base + i))?;
                locked.remove(*bit);
            }
        }
    }
    Ok(())
}

/// QEMU's `raw_lock_error_setg_errno`: a conflict (EAGAIN/EACCES) is
/// reported without the errno text.
fn lock_err(msg: String, e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => msg,
        _ => format!("{msg}: {e}"),
    }
}

/// Checks that no other open file description holds bytes conflicting with
/// `want` (QEMU's `raw_check_lock_bytes`).
fn check_bytes(fd: RawFd, want: PermPair) -> Result<(), String> {
    for (i, bit) in BITS.iter().enumerate() {
        if want.perm.contains(*bit) {
            match byte_taken(fd, SHARED_BASE + i as i64) {
                Ok(false) => {}
                Ok(true) => return Err(format!("Failed to get \"{}\" lock", bit.name())),
                Err(e) => {
                    return Err(lock_err(
                        format!("Failed to get \"{}\" lock", bit.name()),
                        e,
                    ))
                }
            }
        }
    }
    for (i, bit) in BITS.iter().enumerate() {
        if !want.shared.contains(*bit) {
            match byte_taken(fd, PERM_BASE + i as i64) {
                Ok(false) => {}
                Ok(true) => return Err(format!("Failed to get shared \"{}\" lock", bit.name())),
                Err(e) => {
                    return Err(lock_err(
                        format!("Failed to get shared \"{}\" lock", bit.name()),
                        e,
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Moves `fd`'s lock bytes from `st.perms` to `new`, as QEMU's
/// `raw_handle_perm_lock` prepare + commit (or abort). The error is QEMU's
/// message, with its hint on a second line.
pub fn apply(fd: RawFd, st: &mut LockState, new: PermPair, filename: &str) -> Result<(), String> {
    let old = st.perms;
    let all = Perm::ALL;
    // Prepare: lock the union of the old and the new bytes, then check.
    let prepared = apply_bytes(
        fd,
        st,
        old.perm | new.perm,
        (all - old.shared) | (all - new.shared),
        false,
    )
    .and_then(|()| {
        check_bytes(fd, new)
            .map_err(|msg| format!("{msg}\nIs another process using the image [{filename}]?"))
    });
    match prepared {
        Ok(()) => {
            // Commit: keep exactly the new bytes.
            if let Err(e) = apply_bytes(fd, st, new.perm, all - new.shared, true) {
                tracing::warn!("{filename}: {e}");
            }
            st.perms = new;
            Ok(())
        }
        Err(msg) => {
            // Abort: back to the old bytes.
            if let Err(e) = apply_bytes(fd, st, old.perm, all - old.shared, true) {
                tracing::warn!("{filename}: {e}");
            }
            Err(msg)
        }
    }
}

/// Moves the bytes `st` holds from `old` to `new` (another open file
/// description of the same file, as a reopen makes): the new one takes
/// them first, so the image is never unlocked in between, then the old one
/// lets go. Our two descriptions then hold the same shared bytes for a
/// moment, which never conflicts. On failure `new` holds nothing and `old`
/// keeps everything.
pub fn transfer(old: RawFd, new: RawFd, st: &LockState) -> Result<(), String> {
    let mut moved = LockState {
        perms: st.perms,
        ..LockState::default()
    };
    if let Err(e) = apply_bytes(new, &mut moved, st.locked_perm, st.locked_unshared, false) {
        release(new, &mut moved);
        return Err(e);
    }
    let mut left = LockState {
        perms: st.perms,
        locked_perm: st.locked_perm,
        locked_unshared: st.locked_unshared,
    };
    release(old, &mut left);
    Ok(())
}

/// Drops every lock byte `st` says is held.
pub fn release(fd: RawFd, st: &mut LockState) {
    let _ = apply_bytes(fd, st, Perm::empty(), Perm::empty(), true);
    st.perms = PermPair::NONE_ALL_SHARED;
}
