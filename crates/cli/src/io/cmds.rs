//! qemu-io's commands: the table (names, short names, argument counts,
//! one-line help) and what each does.

use super::fmt::{cvtnum, cvtstr, dump_buffer, num_error_text, parse_pattern, report, strerror};
use super::getopt::getopt;
use super::{err, out, OpenSpec, Session, EINVAL, EIO, ENOENT, ENOTSUP, EPERM, PROG};
use sluice_core::graph::MAX_REQUEST_BYTES;
use sluice_core::{DebugEvent, IoBuf, IoBytes, Node, Role, Root, WriteFlags, ZeroFlags};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One command of the table.
pub struct CmdInfo {
    pub name: &'static str,
    pub altname: Option<&'static str>,
    pub argmin: i32,
    pub argmax: i32,
    /// Runs without an open file (`open`, `sleep`, `abort`).
    pub nofile_ok: bool,
    /// Runs always, even without a file (`help`, `quit`).
    pub global: bool,
    /// Needs the write permission.
    pub write: bool,
    pub args: Option<&'static str>,
    pub oneline: &'static str,
}

const fn cmd(
    name: &'static str,
    altname: Option<&'static str>,
    argmin: i32,
    argmax: i32,
    args: Option<&'static str>,
    oneline: &'static str,
) -> CmdInfo {
    CmdInfo {
        name,
        altname,
        argmin,
        argmax,
        nofile_ok: false,
        global: false,
        write: false,
        args,
        oneline,
    }
}

/// The commands, sorted by name as qemu-io lists them.
pub static COMMANDS: &[CmdInfo] = &[
    CmdInfo {
        nofile_ok: true,
        ..cmd(
            "abort",
            None,
            0,
            0,
            None,
            "simulate a program crash using abort(3)",
        )
    },
    cmd(
        "aio_flush",
        None,
        0,
        0,
        None,
        "completes all outstanding aio requests",
    ),
    cmd(
        "aio_read",
        None,
        2,
        -1,
        Some("[-Ciqrv] [-P pattern] off len [len..]"),
        "asynchronously reads a number of bytes",
    ),
    CmdInfo {
        write: true,
        ..cmd(
            "aio_write",
            None,
            2,
            -1,
            Some("[-Cfiqruz] [-P pattern] off len [len..]"),
            "asynchronously writes a number of bytes",
        )
    },
    cmd(
        "alloc",
        Some("a"),
        1,
        2,
        Some("offset [count]"),
        "checks if offset is allocated in the file",
    ),
    cmd(
        "break",
        None,
        2,
        2,
        Some("event tag"),
        "sets a breakpoint on event and tags the stopped request as tag",
    ),
    cmd(
        "close",
        Some("c"),
        0,
        0,
        None,
        "close the current open file",
    ),
    CmdInfo {
        write: true,
        ..cmd(
            "discard",
            Some("d"),
            2,
            -1,
            Some("[-Cq] off len"),
            "discards a number of bytes at a specified offset",
        )
    },
    cmd(
        "flush",
        Some("f"),
        0,
        0,
        None,
        "flush all in-core file state to disk",
    ),
    CmdInfo {
        global: true,
        ..cmd(
            "help",
            Some("?"),
            0,
            1,
            Some("[command]"),
            "help for one or all commands",
        )
    },
    cmd(
        "info",
        Some("i"),
        0,
        0,
        None,
        "prints information about the current file",
    ),
    cmd(
        "length",
        Some("l"),
        0,
        0,
        None,
        "gets the length of the current file",
    ),
    cmd(
        "map",
        None,
        0,
        0,
        Some(""),
        "prints the allocated areas of a file",
    ),
    CmdInfo {
        nofile_ok: true,
        ..cmd(
            "open",
            Some("o"),
            1,
            -1,
            Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
            "open the file specified by path",
        )
    },
    CmdInfo {
        global: true,
        ..cmd("quit", Some("q"), -1, -1, None, "exit the program")
    },
    cmd(
        "read",
        Some("r"),
        2,
        -1,
        Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
        "reads a number of bytes at a specified offset",
    ),
    cmd(
        "readv",
        None,
        2,
        -1,
        Some("[-Cqrv] [-P pattern] off len [len..]"),
        "reads a number of bytes at a specified offset",
    ),
    cmd(
        "remove_break",
        None,
        1,
        1,
        Some("tag"),
        "remove a breakpoint by tag",
    ),
    cmd(
        "resume",
        None,
        1,
        1,
        Some("tag"),
        "resumes the request tagged as tag",
    ),
    CmdInfo {
        nofile_ok: true,
        ..cmd(
            "sleep",
            None,
            1,
            1,
            None,
            "waits for the given value in milliseconds",
        )
    },
    cmd(
        "wait_break",
        None,
        1,
        1,
        Some("tag"),
        "waits for the suspension of a request",
    ),
    CmdInfo {
        write: true,
        ..cmd(
            "write",
            Some("w"),
            2,
            -1,
            Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
            "writes a number of bytes at a specified offset",
        )
    },
    CmdInfo {
        write: true,
        ..cmd(
            "writev",
            None,
            2,
            -1,
            Some("[-Cfqr] [-P pattern] off len [len..]"),
            "writes a number of bytes at a specified offset",
        )
    },
];

fn find_command(name: &str) -> Option<&'static CmdInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.altname == Some(name))
}

fn usage_line(ct: &CmdInfo) -> String {
    format!(
        "{} {} -- {}\n",
        ct.name,
        ct.args.unwrap_or("(null)"),
        ct.oneline
    )
}

fn help_oneline(name: &str, ct: &CmdInfo) -> String {
    match ct.args {
        Some(a) => format!("{name} {a} -- {}\n", ct.oneline),
        None => format!("{name} -- {}\n", ct.oneline),
    }
}

/// Runs one command line; returns 0 or a negative errno, as qemu-io's
/// commands do.
pub async fn command(s: &mut Session, line: &str) -> i32 {
    let argv: Vec<String> = line
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    let Some(name) = argv.first() else { return 0 };
    let Some(ct) = find_command(name) else {
        err(&format!("command \"{name}\" not found"));
        return -EINVAL;
    };
    if !ct.global && !ct.nofile_ok && s.blk.is_none() {
        err("no file open, try 'help open'");
        return -EINVAL;
    }
    let argc = argv.len() as i32 - 1;
    if argc < ct.argmin || (ct.argmax != -1 && argc > ct.argmax) {
        if ct.argmax == -1 {
            err(&format!(
                "bad argument count {argc} to {name}, expected at least {} arguments",
                ct.argmin
            ));
        } else if ct.argmin == ct.argmax {
            err(&format!(
                "bad argument count {argc} to {name}, expected {} arguments",
                ct.argmin
            ));
        } else {
            err(&format!(
                "bad argument count {argc} to {name}, expected between {} and {} arguments",
                ct.argmin, ct.argmax
            ));
        }
        return -EINVAL;
    }
    if ct.write {
        if let Some(b) = &s.blk {
            if !b.writable {
                err(&format!("{PROG}: Block node is read-only"));
                return -EPERM;
            }
        }
    }
    let args = &argv[1..];
    match ct.name {
        "abort" => std::process::abort(),
        "aio_flush" => {
            s.pending.wait_all().await;
            0
        }
        "aio_read" => aio_read(s, ct, name, args).await,
        "aio_write" => aio_write(s, ct, name, args).await,
        "alloc" => alloc(s, args).await,
        "break" => break_cmd(s, args),
        "close" => {
            s.close().await;
            0
        }
        "discard" => discard(s, ct, name, args).await,
        "flush" => match root(s).flush().await {
            Ok(()) => 0,
            Err(e) => -e.errno(),
        },
        "help" => help(args),
        "info" => info(s).await,
        "length" => {
            out(&format!("{}\n", cvtstr(root(s).size() as f64)));
            0
        }
        "map" => map(s).await,
        "open" => open_cmd(s, ct, name, args).await,
        "quit" => {
            s.quit = true;
            0
        }
        "read" => read(s, ct, name, args).await,
        "readv" => readv(s, ct, name, args).await,
        "remove_break" => remove_break(s, &args[0]),
        "resume" => resume(s, &args[0]),
        "sleep" => match super::fmt::strtol0(&args[0]) {
            Some(ms) if ms >= 0 => {
                tokio::time::sleep(Duration::from_millis(ms as u64)).await;
                0
            }
            _ => {
                out(&format!("{} is not a valid number\n", args[0]));
                -EINVAL
            }
        },
        "wait_break" => wait_break(s, &args[0]).await,
        "write" => write(s, ct, name, args).await,
        "writev" => writev(s, ct, name, args).await,
        _ => -EINVAL,
    }
}

fn root(s: &Session) -> Arc<Root> {
    s.blk.as_ref().expect("checked by command()").root.clone()
}

fn help(args: &[String]) -> i32 {
    match args.first() {
        None => {
            let mut t = String::new();
            for ct in COMMANDS {
                t.push_str(&help_oneline(ct.name, ct));
            }
            t.push_str("\nUse 'help commandname' for extended help.\n");
            out(&t);
            0
        }
        Some(name) => match find_command(name) {
            None => {
                out(&format!("command {name} not found\n"));
                -EINVAL
            }
            Some(ct) => {
                let mut t = help_oneline(name, ct);
                if let Some(x) = super::help::extended(ct.name) {
                    t.push_str(x);
                }
                out(&t);
                0
            }
        },
    }
}

/// Parses a number argument, printing qemu-io's message on failure.
/// The `offset length` operands of read and discard, as qemu-io checks them.
fn offset_and_length(operands: &[String]) -> Result<(u64, u64), i32> {
    let offset = num(&operands[0])?;
    let len = num(&operands[1])?;
    if len > MAX_REQUEST_BYTES {
        out(&format!(
            "length cannot exceed {MAX_REQUEST_BYTES}, given {}\n",
            operands[1]
        ));
        return Err(-EINVAL);
    }
    Ok((offset, len))
}

fn num(arg: &str) -> Result<u64, i32> {
    cvtnum(arg).map_err(|e| {
        out(&format!("{}\n", num_error_text(e, arg)));
        match e {
            super::fmt::NumError::Invalid => -EINVAL,
            super::fmt::NumError::TooLarge => -34,
        }
    })
}

/// getopt for a command (errors are reported by `bad_usage`).
fn opts(name: &str, args: &[String], spec: &str) -> super::getopt::Parsed {
    getopt(name, args, spec, &[])
}

fn bad_usage(ct: &CmdInfo, e: Option<&super::getopt::GetoptError>) -> i32 {
    if let Some(e) = e {
        err(&e.0);
    }
    out(&usage_line(ct));
    -EINVAL
}

/// Requests of length zero succeed without reaching the graph, as in
/// QEMU, unless they start past the end.
fn zero_len_check(r: &Root, offset: u64) -> Result<(), i32> {
    if offset > r.size() {
        Err(-EIO)
    } else {
        Ok(())
    }
}

async fn do_read(r: &Root, offset: u64, count: u64) -> Result<IoBuf, i32> {
    let buf = IoBuf::filled(count as usize, 0xab);
    if count == 0 {
        zero_len_check(r, offset)?;
        return Ok(buf);
    }
    r.read_into(offset, buf).await.map_err(|e| -e.errno())
}

async fn do_write(r: &Root, offset: u64, data: IoBytes, flags: WriteFlags) -> Result<(), i32> {
    if data.is_empty() {
        return zero_len_check(r, offset);
    }
    r.write(offset, data, flags).await.map_err(|e| -e.errno())
}

async fn do_zeroes(r: &Root, offset: u64, count: u64, flags: ZeroFlags) -> Result<(), i32> {
    if count == 0 {
        return zero_len_check(r, offset);
    }
    r.write_zeroes(offset, count, flags)
        .await
        .map_err(|e| -e.errno())
}

fn pattern_mismatch(buf: &[u8], pattern: u8) -> bool {
    buf.iter().any(|&b| b != pattern)
}

async fn read(s: &mut Session, ct: &CmdInfo, name: &str, args: &[String]) -> i32 {
    let p = opts(name, args, "bCl:pP:qrs:v");
    let (mut b, mut cflag, mut q, mut v) = (false, false, false, false);
    let (mut pattern, mut poff, mut pcount): (Option<u8>, Option<u64>, Option<u64>) =
        (None, None, None);
    for (c, val) in &p.opts {
        let val = val.as_deref().unwrap_or("");
        match char::from_u32(*c).unwrap_or('\0') {
            'b' => b = true,
            'C' => cflag = true,
            'l' => match num(val) {
                Ok(n) => pcount = Some(n),
                Err(e) => return e,
            },
            'p' | 'r' => {}
            'P' => match parse_pattern(val) {
                Ok(x) => pattern = Some(x),
                Err(m) => {
                    out(&format!("{m}\n"));
                    return -EINVAL;
                }
            },
            'q' => q = true,
            's' => match num(val) {
                Ok(n) => poff = Some(n),
                Err(e) => return e,
            },
            'v' => v = true,
            _ => {}
        }
    }
    if p.error.is_some() || p.operands.len() != 2 {
        return bad_usage(ct, p.error.as_ref());
    }
    let (offset, count) = match offset_and_length(&p.operands) {
        Ok(x) => x,
        Err(e) => return e,
    };
    if pattern.is_none() && (pcount.is_some() || poff.is_some()) {
        return bad_usage(ct, None);
    }
    let poff_v = poff.unwrap_or(0) as i128;
    let pcount_v = pcount.map(|c| c as i128).unwrap_or(count as i128 - poff_v);
    if pcount_v < 0 || pcount_v + poff_v > count as i128 {
        out("pattern verification range exceeds end of read data\n");
        return -EINVAL;
    }
    if b {
        if offset % 512 != 0 {
            out(&format!(
                "{offset} is not a sector-aligned value for 'offset'\n"
            ));
            return -EINVAL;
        }
        if count % 512 != 0 {
            out(&format!(
                "{count} is not a sector-aligned value for 'count'\n"
            ));
            return -EINVAL;
        }
    }
    let r = root(s);
    let t = Instant::now();
    let res = if b {
        Err(-ENOTSUP)
    } else {
        do_read(&r, offset, count).await
    };
    let elapsed = t.elapsed();
    let buf = match res {
        Ok(buf) => buf,
        Err(e) => {
            out(&format!("read failed: {}\n", strerror(-e)));
            return e;
        }
    };
    let mut ret = 0;
    let mut text = String::new();
    if let Some(pat) = pattern {
        let (o, n) = (poff_v as usize, pcount_v as usize);
        if pattern_mismatch(&buf[o..o + n], pat) {
            text.push_str(&format!(
                "Pattern verification failed at offset {}, {} bytes\n",
                offset + o as u64,
                n
            ));
            ret = -EINVAL;
        }
    }
    if !q {
        if v {
            text.push_str(&dump_buffer(&buf, offset));
        }
        text.push_str(&report("read", elapsed, offset, count, count, 1, cflag));
    }
    out(&text);
    ret
}

/// The lengths of a vectored request (`create_iovec`).
fn iovec_len(args: &[String]) -> Result<u64, i32> {
    let mut total = 0u64;
    for a in args {
        let n = num(a)?;
        if n > MAX_REQUEST_BYTES {
            out(&format!(
                "Argument '{a}' exceeds maximum size {MAX_REQUEST_BYTES}\n"
            ));
            return Err(-EINVAL);
        }
        if total > MAX_REQUEST_BYTES - n {
            out(&format!(
                "The total number of bytes exceed the maximum size {MAX_REQUEST_BYTES}\n"
            ));
            return Err(-EINVAL);
        }
        total += n;
    }
    Ok(total)
}

struct VecOpts {
    cflag: bool,
    q: bool,
    v: bool,
    fua: bool,
    z: bool,
    u: bool,
    i: bool,
    pattern: Option<u8>,
}

fn vec_opts(
    ct: &CmdInfo,
    name: &str,
    args: &[String],
    spec: &str,
) -> Result<(VecOpts, Vec<String>), i32> {
    let p = opts(name, args, spec);
    let mut o = VecOpts {
        cflag: false,
        q: false,
        v: false,
        fua: false,
        z: false,
        u: false,
        i: false,
        pattern: None,
    };
    for (c, val) in &p.opts {
        match char::from_u32(*c).unwrap_or('\0') {
            'C' => o.cflag = true,
            'q' => o.q = true,
            'v' => o.v = true,
            'f' => o.fua = true,
            'z' => o.z = true,
            'u' => o.u = true,
            'i' => {
                o.i = true;
                // qemu-io acts on -i at once and ignores the rest.
                return Ok((o, Vec::new()));
            }
            'P' => match parse_pattern(val.as_deref().unwrap_or("")) {
                Ok(x) => o.pattern = Some(x),
                Err(m) => {
                    out(&format!("{m}\n"));
                    return Err(-EINVAL);
                }
            },
            _ => {}
        }
    }
    if p.error.is_some() || p.operands.len() < 2 {
        return Err(bad_usage(ct, p.error.as_ref()));
    }
    Ok((o, p.operands))
}

/// `offset len [len...]` of the vectored commands.
fn offset_and_iovec(ops: &[String]) -> Result<(u64, u64), i32> {
    Ok((num(&ops[0])?, iovec_len(&ops[1..])?))
}

/// What readv and aio_read print for a completed read: a pattern mismatch,
/// the `-v` dump and the report line. Returns -EINVAL on a mismatch.
fn read_report(buf: &[u8], offset: u64, count: u64, o: &VecOpts, elapsed: Duration) -> i32 {
    let mut ret = 0;
    let mut text = String::new();
    if let Some(pat) = o.pattern {
        if pattern_mismatch(buf, pat) {
            text.push_str(&format!(
                "Pattern verification failed at offset {offset}, {count} bytes\n"
            ));
            ret = -EINVAL;
        }
    }
    if !o.q {
        if o.v {
            text.push_str(&dump_buffer(buf, offset));
        }
        text.push_str(&report("read", elapsed, offset, count, count, 1, o.cflag));
    }
    out(&text);
    ret
}

async fn readv(s: &mut Session, ct: &CmdInfo, name: &str, args: &[String]) -> i32 {
    let (o, ops) = match vec_opts(ct, name, args, "CP:qrv") {
        Ok(x) => x,
        Err(e) => return e,
    };
    let (offset, count) = match offset_and_iovec(&ops) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let r = root(s);
    let t = Instant::now();
    let res = do_read(&r, offset, count).await;
    let elapsed = t.elapsed();
    let buf = match res {
        Ok(b) => b,
        Err(e) => {
            out(&format!("readv failed: {}\n", strerror(-e)));
            return e;
        }
    };
    read_report(&buf, offset, count, &o, elapsed)
}

async fn writev(s: &mut Session, ct: &CmdInfo, name: &str, args: &[String]) -> i32 {
    let (o, ops) = match vec_opts(ct, name, args, "CfP:qr") {
        Ok(x) => x,
        Err(e) => return e,
    };
    let (offset, count) = match offset_and_iovec(&ops) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let r = root(s);
    let data = IoBuf::filled(count as usize, o.pattern.unwrap_or(0xcd)).freeze();
    let t = Instant::now();
    let res = do_write(
        &r,
        offset,
        data,
        WriteFlags {
            fua: o.fua,
            ..Default::default()
        },
    )
    .await;
    let elapsed = t.elapsed();
    if let Err(e) = res {
        out(&format!("writev failed: {}\n", strerror(-e)));
        return e;
    }
    if !o.q {
        out(&report("wrote", elapsed, offset, count, count, 1, o.cflag));
    }
    0
}

async fn aio_read(s: &mut Session, ct: &CmdInfo, name: &str, args: &[String]) -> i32 {
    let (o, ops) = match vec_opts(ct, name, args, "CiP:qrv") {
        Ok(x) => x,
        Err(e) => return e,
    };
    if o.i {
        out("injecting invalid read request\n");
        return 0;
    }
    let (offset, count) = match offset_and_iovec(&ops) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let r = root(s);
    s.pending
        .submit(async move {
            let t = Instant::now();
            let res = do_read(&r, offset, count).await;
            let elapsed = t.elapsed();
            let buf = match res {
                Ok(b) => b,
                Err(e) => {
                    out(&format!("readv failed: {}\n", strerror(-e)));
                    return;
                }
            };
            read_report(&buf, offset, count, &o, elapsed);
        })
        .await;
    announce_suspended(s);
    0
}

async fn aio_write(s: &mut Session, ct: &CmdInfo, name: &str, args: &[String]) -> i32 {
    let (o, ops) = match vec_opts(ct, name, args, "CfiP:qruz") {
        Ok(x) => x,
        Err(e) => return e,
    };
    if o.i {
        out("injecting invalid write request\n");
        return 0;
    }
    if o.z && ops.len() != 2 {
        out("-z supports only a single length parameter\n");
        return -EINVAL;
    }
    if o.u && !o.z {
        out("-u requires -z to be specified\n");
        return -EINVAL;
    }
    let offset = match num(&ops[0]) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let count = if o.z {
        match num(&ops[1]) {
            Ok(n) => n,
            Err(e) => return e,
        }
    } else {
        match iovec_len(&ops[1..]) {
            Ok(n) => n,
            Err(e) => return e,
        }
    };
    let r = root(s);
    s.pending
        .submit(async move {
            let t = Instant::now();
            let res = if o.z {
                let flags = ZeroFlags {
                    may_unmap: o.u,
                    fua: o.fua,
                    ..Default::default()
                };
                do_zeroes(&r, offset, count, flags).await
            } else {
                let data = IoBuf::filled(count as usize, o.pattern.unwrap_or(0xcd)).freeze();
                do_write(
                    &r,
                    offset,
                    data,
                    WriteFlags {
                        fua: o.fua,
                        ..Default::default()
                    },
                )
                .await
            };
            let elapsed = t.elapsed();
            match res {
                Err(e) => out(&format!("aio_write failed: {}\n", strerror(-e))),
                Ok(()) if !o.q => out(&report("wrote", elapsed, offset, count, count, 1, o.cflag)),
                Ok(()) => {}
            }
        })
        .await;
    announce_suspended(s);
    0
}

/// Fills `len` bytes with the contents of `file`, repeated.
fn buffer_from_file(file: &str, len: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(file)
        .map_err(|e| format!("{file}: {}", sluice_core::error::os_text(&e)))?;
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("{file}: {}", sluice_core::error::os_text(&e))),
        }
    }
    if n == 0 && len > 0 {
        return Err(format!("{file}: file is empty"));
    }
    let mut p = n;
    while p < len {
        let k = n.min(len - p);
        buf.copy_within(0..k, p);
        p += k;
    }
    Ok(buf)
}

async fn write(s: &mut Session, ct: &CmdInfo, name: &str, args: &[String]) -> i32 {
    let p = opts(name, args, "bcCfnpP:qrs:uz");
    let (mut b, mut c, mut cflag, mut fua, mut n, mut q, mut u, mut z, mut r) = (
        false, false, false, false, false, false, false, false, false,
    );
    let mut pattern: Option<u8> = None;
    let mut source: Option<String> = None;
    for (ch, val) in &p.opts {
        match char::from_u32(*ch).unwrap_or('\0') {
            'b' => b = true,
            'c' => c = true,
            'C' => cflag = true,
            'f' => fua = true,
            'n' => n = true,
            'p' => {}
            'P' => match parse_pattern(val.as_deref().unwrap_or("")) {
                Ok(x) => pattern = Some(x),
                Err(m) => {
                    out(&format!("{m}\n"));
                    return -EINVAL;
                }
            },
            'q' => q = true,
            'r' => r = true,
            's' => source = val.clone(),
            'u' => u = true,
            'z' => z = true,
            _ => {}
        }
    }
    if p.error.is_some() || p.operands.len() != 2 {
        return bad_usage(ct, p.error.as_ref());
    }
    let fail = |m: &str| {
        out(&format!("{m}\n"));
        -EINVAL
    };
    if b && z {
        return fail("-b and -z cannot be specified at the same time");
    }
    if fua && (b || c) {
        return fail("-f and -b or -c cannot be specified at the same time");
    }
    if n && !z {
        return fail("-n requires -z to be specified");
    }
    if u && !z {
        return fail("-u requires -z to be specified");
    }
    if u8::from(z) + u8::from(pattern.is_some()) + u8::from(source.is_some()) > 1 {
        return fail("Only one of -z, -P, and -s can be specified at the same time");
    }
    let offset = match num(&p.operands[0]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let count = match num(&p.operands[1]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if count > MAX_REQUEST_BYTES && !n {
        return fail(&format!(
            "length cannot exceed {MAX_REQUEST_BYTES} without -n, given {}",
            p.operands[1]
        ));
    }
    if b || c {
        if offset % 512 != 0 {
            return fail(&format!(
                "{offset} is not a sector-aligned value for 'offset'"
            ));
        }
        if count % 512 != 0 {
            return fail(&format!(
                "{count} is not a sector-aligned value for 'count'"
            ));
        }
    }
    if z && r {
        return fail("cannot combine zero write with registered I/O buffer");
    }
    let data = if z || count > MAX_REQUEST_BYTES {
        None
    } else if let Some(file) = &source {
        match buffer_from_file(file, count as usize) {
            Ok(v) => Some(IoBytes::copy_from(&v)),
            Err(m) => {
                err(&m);
                return -EINVAL;
            }
        }
    } else {
        Some(IoBuf::filled(count as usize, pattern.unwrap_or(0xcd)).freeze())
    };
    let rt = root(s);
    let t = Instant::now();
    let res = if b || c {
        Err(-ENOTSUP)
    } else if z {
        let flags = ZeroFlags {
            may_unmap: u,
            no_fallback: n,
            fua,
        };
        do_zeroes(&rt, offset, count, flags).await
    } else {
        let data = data.unwrap_or_else(|| IoBytes::copy_from(&[]));
        do_write(
            &rt,
            offset,
            data,
            WriteFlags {
                fua,
                ..Default::default()
            },
        )
        .await
    };
    let elapsed = t.elapsed();
    if let Err(e) = res {
        out(&format!("write failed: {}\n", strerror(-e)));
        return e;
    }
    if !q {
        out(&report("wrote", elapsed, offset, count, count, 1, cflag));
    }
    0
}

async fn discard(s: &mut Session, ct: &CmdInfo, name: &str, args: &[String]) -> i32 {
    let p = opts(name, args, "Cq");
    let (mut cflag, mut q) = (false, false);
    for (c, _) in &p.opts {
        match char::from_u32(*c).unwrap_or('\0') {
            'C' => cflag = true,
            'q' => q = true,
            _ => {}
        }
    }
    if p.error.is_some() || p.operands.len() != 2 {
        return bad_usage(ct, p.error.as_ref());
    }
    let (offset, bytes) = match offset_and_length(&p.operands) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let r = root(s);
    let t = Instant::now();
    let res = if bytes == 0 {
        zero_len_check(&r, offset)
    } else {
        r.discard(offset, bytes).await.map_err(|e| -e.errno())
    };
    let elapsed = t.elapsed();
    if let Err(e) = res {
        out(&format!("discard failed: {}\n", strerror(-e)));
        return e;
    }
    if !q {
        out(&report("discard", elapsed, offset, bytes, bytes, 1, cflag));
    }
    0
}

/// Whether `[offset, offset + bytes)` starts allocated in the top layer,
/// and for how many bytes (QEMU's `bdrv_is_allocated`): 0 at the end.
async fn is_allocated(node: &Arc<Node>, offset: u64, bytes: u64) -> Result<(bool, u64), i32> {
    let size = node.size();
    if offset >= size || bytes == 0 {
        return Ok((false, 0));
    }
    let len = bytes.min(size - offset).min(1 << 30);
    let e = sluice_core::status::block_status_chain(node, offset, len)
        .await
        .map_err(|e| -e.errno())?;
    Ok((e.depth == 0 && e.present, e.length.min(len)))
}

async fn alloc(s: &mut Session, args: &[String]) -> i32 {
    let start = match num(&args[0]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut count = match args.get(1) {
        Some(a) => match num(a) {
            Ok(v) => v,
            Err(e) => return e,
        },
        None => 512,
    };
    let node = root(s).node();
    let (mut offset, mut remaining, mut sum) = (start, count, 0u64);
    while remaining > 0 {
        let (alloc, n) = match is_allocated(&node, offset, remaining).await {
            Ok(x) => x,
            Err(e) => {
                out(&format!("is_allocated failed: {}\n", strerror(-e)));
                return e;
            }
        };
        offset += n;
        remaining -= n;
        if alloc {
            sum += n;
        }
        if n == 0 {
            count -= remaining;
            remaining = 0;
        }
    }
    out(&format!(
        "{sum}/{count} bytes allocated at offset {}\n",
        cvtstr(start as f64)
    ));
    0
}

async fn map(s: &mut Session) -> i32 {
    let node = root(s).node();
    let mut bytes = node.size();
    let mut offset = 0u64;
    let mut text = String::new();
    while bytes > 0 {
        // Runs of the same allocation status, merged (map_is_allocated).
        let first = is_allocated(&node, offset, bytes).await;
        let (alloc, mut num) = match first {
            Ok(x) => x,
            Err(e) => {
                out(&text);
                out(&format!(
                    "Failed to get allocation status: {}\n",
                    strerror(-e)
                ));
                return e;
            }
        };
        if num == 0 {
            out(&text);
            out("Unexpected end of image\n");
            return -EIO;
        }
        while num < bytes {
            match is_allocated(&node, offset + num, bytes - num).await {
                Ok((a, n)) if a == alloc && n > 0 => num += n,
                _ => break,
            }
        }
        text.push_str(&format!(
            "{} (0x{num:x}) bytes {} at offset {} (0x{offset:x})\n",
            cvtstr(num as f64),
            if alloc {
                "    allocated"
            } else {
                "not allocated"
            },
            cvtstr(offset as f64)
        ));
        offset += num;
        bytes -= num;
    }
    out(&text);
    0
}

/// What `bdrv_get_info` answers for a node: `Err` where QEMU's driver
/// has no answer (null drivers).
fn get_info(node: &Arc<Node>, depth: u32) -> Result<(), i32> {
    match node.driver_name() {
        "null-co" | "null-aio" => Err(-ENOTSUP),
        "blkdebug" | "copy-on-read" if depth < 64 => match node.child(Role::File) {
            Some(c) => get_info(&c, depth + 1),
            None => Err(-ENOTSUP),
        },
        _ => Ok(()),
    }
}

async fn info(s: &mut Session) -> i32 {
    let mut node = root(s).node();
    // qemu-io's -C is a flag on the image, not a node: look through ours.
    if s.blk.as_ref().is_some_and(|b| b.copy_on_read) {
        if let Some(c) = node.child(Role::File) {
            node = c;
        }
    }
    let name = node.driver_name();
    let mut text = format!("format name: {name}\n");
    // Protocol drivers have a protocol name too, and qemu-io prints both.
    if matches!(name, "file" | "null-co" | "null-aio" | "blkdebug") {
        text.push_str(&format!("format name: {name}\n"));
    }
    let ret = match get_info(&node, 0) {
        Ok(()) => match crate::img::info::qcow2_io_info(&node).await {
            Ok(Some((cluster, vm_state, specific))) => {
                text.push_str(&format!(
                    "cluster size: {}\nvm state offset: {}\n{specific}",
                    cvtstr(cluster as f64),
                    cvtstr(vm_state as f64)
                ));
                0
            }
            Ok(None) => {
                text.push_str("cluster size: 0 bytes\nvm state offset: 0 bytes\n");
                0
            }
            Err(_) => -EIO,
        },
        Err(e) => e,
    };
    out(&text);
    ret
}

/// The blkdebug node's breakpoint controls, or `-ENOTSUP` without one.
fn debug_node(s: &Session) -> Result<Arc<Node>, i32> {
    let node = root(s).node();
    sluice_core::find_debug_control(&node).ok_or(-ENOTSUP)
}

fn break_cmd(s: &mut Session, args: &[String]) -> i32 {
    let res = debug_node(s).and_then(|n| {
        let event = DebugEvent::from_name(&args[0]).ok_or(-ENOENT)?;
        let ctl = n.driver().debug_control().ok_or(-ENOTSUP)?;
        ctl.set_breakpoint(event, &args[1]).map_err(|_| -EINVAL)
    });
    match res {
        Ok(()) => {
            let tag = args[1].clone();
            s.tags.insert(tag.clone());
            super::lock(&s.announced).remove(&tag);
            if let Ok(node) = debug_node(s) {
                let announced = s.announced.clone();
                s.watchers.retain(|w| !w.is_finished());
                s.watchers.push(tokio::spawn(async move {
                    if let Some(ctl) = node.driver().debug_control() {
                        ctl.wait_suspended(&tag).await;
                        super::announce_if(&announced, &tag, || ctl.is_suspended(&tag));
                    }
                }));
            }
            0
        }
        Err(e) => {
            out(&format!("Could not set breakpoint: {}\n", strerror(-e)));
            e
        }
    }
}

/// Announces the requests parked at breakpoints this session set.
fn announce_suspended(s: &Session) {
    let Ok(node) = debug_node(s) else { return };
    let Some(ctl) = node.driver().debug_control() else {
        return;
    };
    for tag in &s.tags {
        if ctl.is_suspended(tag) {
            announce(s, tag);
        }
    }
}

fn announce(s: &Session, tag: &str) {
    super::announce(&s.announced, tag);
}

fn resume(s: &mut Session, tag: &str) -> i32 {
    let node = match debug_node(s) {
        Ok(n) => n,
        Err(e) => {
            out(&format!("Could not resume request: {}\n", strerror(-e)));
            return e;
        }
    };
    let Some(ctl) = node.driver().debug_control() else {
        return -ENOTSUP;
    };
    if !ctl.is_suspended(tag) {
        out(&format!("Could not resume request: {}\n", strerror(ENOENT)));
        return -ENOENT;
    }
    announce(s, tag);
    // Printed before the request runs on, as blkdebug prints it from the
    // resumed request before it continues.
    out(&format!("blkdebug: Resuming request '{tag}'\n"));
    let ret = match ctl.resume(tag) {
        Ok(()) => 0,
        Err(_) => -ENOENT,
    };
    // Only now, with nothing parked under `tag`, may a later suspension
    // be announced again.
    super::lock(&s.announced).remove(tag);
    ret
}

fn remove_break(s: &mut Session, tag: &str) -> i32 {
    let res = debug_node(s).and_then(|node| {
        let ctl = node.driver().debug_control().ok_or(-ENOTSUP)?;
        if ctl.is_suspended(tag) {
            announce(s, tag);
            out(&format!("blkdebug: Resuming request '{tag}'\n"));
        }
        let r = ctl.remove_breakpoint(tag).map_err(|_| -ENOENT);
        super::lock(&s.announced).remove(tag);
        r
    });
    match res {
        Ok(()) => 0,
        Err(e) => {
            out(&format!(
                "Could not remove breakpoint {tag}: {}\n",
                strerror(-e)
            ));
            e
        }
    }
}

/// Waits until a request is parked under `tag`. qemu-io waits forever when
/// none ever will be; here the wait ends with an error once no aio request
/// is left that could be parked.
async fn wait_break(s: &mut Session, tag: &str) -> i32 {
    let node = match debug_node(s) {
        Ok(n) => n,
        Err(e) => {
            out(&format!("Could not wait for break: {}\n", strerror(-e)));
            return e;
        }
    };
    let Some(ctl) = node.driver().debug_control() else {
        return -ENOTSUP;
    };
    let pending = s.pending.clone();
    let suspended = loop {
        let idle = pending.idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        if ctl.is_suspended(tag) {
            break true;
        }
        if pending.in_flight() == 0 {
            break ctl.is_suspended(tag);
        }
        tokio::select! {
            _ = ctl.wait_suspended(tag) => break true,
            _ = &mut idle => {}
        }
    };
    if suspended {
        announce(s, tag);
        0
    } else {
        out(&format!(
            "Could not wait for break: no request in flight can stop at '{tag}'\n"
        ));
        -ENOENT
    }
}

async fn open_cmd(s: &mut Session, ct: &CmdInfo, name: &str, args: &[String]) -> i32 {
    let p = opts(name, args, "snCro:ki:t:d:U");
    let mut spec = OpenSpec::default();
    let mut o_opts: Option<serde_json::Value> = None;
    for (c, val) in &p.opts {
        let v = val.as_deref().unwrap_or("");
        match char::from_u32(*c).unwrap_or('\0') {
            's' => spec.snapshot = true,
            'n' => spec.cache = Some(sluice_drivers::protocol::file::CacheMode::NONE),
            'C' => spec.copy_on_read = true,
            'r' => spec.read_only = true,
            'k' => spec.aio = Some("io_uring"),
            't' => match sluice_drivers::protocol::file::parse_cache_mode(v) {
                Ok(m) => spec.cache = Some(m),
                Err(_) => {
                    err(&format!("{PROG}: Invalid cache option: {v}"));
                    return -EINVAL;
                }
            },
            'd' if !super::parse_discard(v) => {
                err(&format!("{PROG}: Invalid discard option: {v}"));
                return -EINVAL;
            }
            'i' => match super::parse_aio(v) {
                Some(a) => spec.aio = Some(a),
                None => {
                    err(&format!("{PROG}: Invalid aio option: {v}"));
                    return -EINVAL;
                }
            },
            'o' => {
                if s.image_opts {
                    out("--image-opts and 'open -o' are mutually exclusive\n");
                    return -EINVAL;
                }
                match sluice_control::keyval::parse(v, None) {
                    Ok(parsed) => match &mut o_opts {
                        Some(existing) => sluice_control::keyval::merge(existing, parsed),
                        None => o_opts = Some(parsed),
                    },
                    Err(e) => {
                        err(&format!("{PROG}: {e}"));
                        return -EINVAL;
                    }
                }
            }
            'U' => spec.force_share = true,
            _ => {}
        }
    }
    if p.error.is_some() {
        return bad_usage(ct, p.error.as_ref());
    }
    let mut operands = p.operands;
    if s.image_opts && operands.len() == 1 {
        match sluice_control::keyval::parse(&operands[0], Some("file")) {
            Ok(v) => o_opts = Some(v),
            Err(e) => {
                err(&format!("{PROG}: {e}"));
                return -EINVAL;
            }
        }
        operands.clear();
    }
    spec.opts = o_opts;
    match operands.len() {
        0 | 1 => {
            spec.filename = operands.pop();
            if s.openfile(&spec).await {
                0
            } else {
                -EINVAL
            }
        }
        _ => bad_usage(ct, None),
    }
}
