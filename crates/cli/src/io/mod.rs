//! `sluice io`: a qemu-io work-alike. Same command line
//! (`[-f FMT] [-r] [-t CACHE] [-i AIO] [-U] [--image-opts] [-c CMD]... [FILE]`),
//! same command language and output lines, same exit code (1 when any
//! command failed). Without `-c` it reads commands from stdin after a
//! `qemu-io> ` prompt.
//!
//! `aio_*` requests run as tasks on the runtime and print their report
//! when they complete; `aio_flush`, `close` and the end of the session wait
//! for them. `break`/`wait_break`/`resume`/`remove_break` drive the first
//! blkdebug node below the image (`sluice_core::find_debug_control`).

mod cmds;
mod fmt;
mod getopt;
mod help;

use getopt::{getopt, LongOpt};
use serde_json::Value;
use sluice_core::{Graph, Node, PermPair, Root};
use sluice_drivers::protocol::file::{parse_cache_mode, CacheMode};
use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The name qemu-io prints in its prompt and messages.
const PROG: &str = "qemu-io";

pub const EINVAL: i32 = 22;
pub const EIO: i32 = 5;
pub const ENOENT: i32 = 2;
pub const ENOTSUP: i32 = 95;
pub const EPERM: i32 = 1;

#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
pub struct IoArgs {
    /// qemu-io's options, commands (-c) and file, as qemu-io takes them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

/// Writes `s` to stdout at once (so lines of concurrent aio reports do
/// not interleave); a closed stdout is ignored, never a panic.
pub fn out(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

/// One line to stderr.
pub fn err(s: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{s}");
}

/// Locks a mutex, also after a panic elsewhere.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints blkdebug's `Suspended request` line once per suspension; the
/// lock is held while printing so whoever prints first is done first.
pub fn announce(announced: &Mutex<HashSet<String>>, tag: &str) {
    let mut a = lock(announced);
    if a.insert(tag.to_string()) {
        out(&format!("blkdebug: Suspended request '{tag}'\n"));
    }
}

/// [`announce`] if `still()` holds, checked under the lock: a watcher
/// that wakes late does not announce a request already resumed.
pub fn announce_if(announced: &Mutex<HashSet<String>>, tag: &str, still: impl Fn() -> bool) {
    let mut a = lock(announced);
    if !a.contains(tag) && still() {
        a.insert(tag.to_string());
        out(&format!("blkdebug: Suspended request '{tag}'\n"));
    }
}

/// Requests issued by `aio_read`/`aio_write` and not yet waited for.
#[derive(Default)]
pub struct Pending {
    handles: Mutex<Vec<JoinHandle<()>>>,
    count: AtomicUsize,
    idle: Notify,
}

impl Pending {
    /// Starts `fut` and keeps it running in the background. Like a QEMU
    /// coroutine, the request first runs here until it has to wait, so a
    /// breakpoint it reaches has parked it before the command returns.
    pub async fn submit<F>(self: &Arc<Self>, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.count.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        let mut task = Box::pin(async move {
            fut.await;
            if me.count.fetch_sub(1, Ordering::SeqCst) == 1 {
                me.idle.notify_waiters();
            }
        });
        if futures::poll!(task.as_mut()).is_ready() {
            return;
        }
        let h = tokio::spawn(task);
        let mut hs = lock(&self.handles);
        hs.retain(|h| !h.is_finished());
        hs.push(h);
    }

    pub fn in_flight(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until every request issued so far has completed.
    pub async fn wait_all(&self) {
        loop {
            let hs = std::mem::take(&mut *lock(&self.handles));
            if hs.is_empty() {
                return;
            }
            for h in hs {
                let _ = h.await;
            }
        }
    }
}

/// The open image: its graph, the root requests enter through, and the
/// nodes to close.
pub struct OpenImage {
    pub graph: Graph,
    pub root: Arc<Root>,
    /// Nodes opened by the user, closed in this order.
    pub owned: Vec<Arc<Node>>,
    pub writable: bool,
    /// Opened with `-C`: the top node is a copy-on-read filter.
    pub copy_on_read: bool,
}

impl OpenImage {
    pub fn node(&self) -> Arc<Node> {
        self.root.node()
    }
}

/// How to open an image (`qemu-io` options or the `open` command).
#[derive(Default, Clone)]
pub struct OpenSpec {
    pub filename: Option<String>,
    /// Options given as `--image-opts` or `open -o`.
    pub opts: Option<Value>,
    pub format: Option<String>,
    pub read_only: bool,
    pub snapshot: bool,
    pub copy_on_read: bool,
    pub force_share: bool,
    pub cache: Option<CacheMode>,
    pub aio: Option<&'static str>,
}

pub struct Session {
    pub blk: Option<OpenImage>,
    pub image_opts: bool,
    pub quit: bool,
    pub pending: Arc<Pending>,
    /// Breakpoint tags whose suspension was already announced.
    pub announced: Arc<Mutex<HashSet<String>>>,
    /// Tasks that announce a suspension when it happens, as blkdebug
    /// prints it from the request it parks.
    pub watchers: Vec<JoinHandle<()>>,
    /// Tags given to `break`, resumed at the end so no request stays parked.
    pub tags: HashSet<String>,
}

/// The block options for `spec`, and whether the format was probed as raw.
fn image_json(spec: &OpenSpec) -> Result<(Value, bool), String> {
    let mut probed_raw = false;
    let mut extra = spec.opts.clone();
    let format = spec.format.clone().or_else(|| {
        extra
            .as_mut()
            .and_then(|o| o.as_object_mut())
            .and_then(|o| o.remove("driver"))
            .and_then(|d| d.as_str().map(str::to_string))
    });
    let mut v = match &spec.filename {
        None => {
            let mut v = extra
                .take()
                .unwrap_or_else(|| Value::Object(Default::default()));
            if let (Some(f), Some(o)) = (&format, v.as_object_mut()) {
                o.insert("driver".into(), Value::String(f.clone()));
            }
            if let Some(o) = v.as_object_mut() {
                if let Some(Value::String(f)) = o.remove("filename") {
                    // `filename=` in options: a file under the format.
                    let mut base = file_json(&f, format.as_deref(), &mut probed_raw)?;
                    o.remove("driver");
                    sluice_control::keyval::merge(&mut base, Value::Object(o.clone()));
                    return Ok((base, probed_raw));
                }
            }
            v
        }
        Some(name) => file_json(name, format.as_deref(), &mut probed_raw)?,
    };
    if let Some(e) = extra {
        sluice_control::keyval::merge(&mut v, e);
    }
    Ok((v, probed_raw))
}

/// Options for a filename: `json:{...}`, `blkdebug:CONFIG:FILE`, or a file
/// with `format` over it (probed when absent).
fn file_json(name: &str, format: Option<&str>, probed_raw: &mut bool) -> Result<Value, String> {
    if let Some(json) = name.strip_prefix("json:") {
        let mut v: Value = serde_json::from_str(json)
            .map_err(|e| format!("Could not parse the JSON options: {e}"))?;
        if let (Some(f), Some(o)) = (format, v.as_object_mut()) {
            o.insert("driver".into(), Value::String(f.to_string()));
        }
        return Ok(v);
    }
    if let Some(rest) = name.strip_prefix("blkdebug:") {
        let (config, image) = rest.split_once(':').ok_or_else(|| {
            "Could not parse the blkdebug filename: expected blkdebug:CONFIG:FILE".to_string()
        })?;
        let inner = file_json(image, format.or(Some("raw")), probed_raw)?;
        *probed_raw = format.is_none();
        let mut dbg = serde_json::json!({"driver": "blkdebug", "image": inner["file"].clone()});
        if !config.is_empty() {
            dbg["config"] = Value::String(config.to_string());
        }
        let mut v = inner;
        v["file"] = dbg;
        return Ok(v);
    }
    let v = sluice_drivers::open::image_options(name, format)?;
    if format.is_none() && v["driver"] == "raw" {
        *probed_raw = true;
    }
    Ok(v)
}

/// Opens `spec`; the error is the message qemu-io prints after
/// `can't open device NAME: `.
pub async fn open_image(spec: &OpenSpec) -> Result<OpenImage, String> {
    if spec.force_share && !spec.read_only {
        return Err("force-share=on can only be used with read-only images".into());
    }
    let (mut v, probed_raw) = image_json(spec)?;
    if probed_raw {
        let name = spec.filename.as_deref().unwrap_or("");
        err(&format!("WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."));
    }
    if let Some(aio) = spec.aio {
        sluice_drivers::open::set_protocol_option(&mut v, "aio", aio);
    }
    let cache = spec.cache.unwrap_or(CacheMode::WRITETHROUGH);
    let graph = Graph::new();
    let (root, owned) = {
        let w = graph.writer().await;
        let base_ro = spec.read_only || spec.snapshot;
        let base = sluice_drivers::open::open_with(&w, v, cache, base_ro)
            .await
            .map_err(|e| e.to_string())?;
        let mut owned = vec![base.clone()];
        let top = if spec.snapshot {
            let overlay = sluice_drivers::blockdev_add(
                &w,
                serde_json::json!({"driver": "memory", "size": base.size(), "backing": base.name()}),
            )
            .await
            .map_err(|e| e.to_string())?;
            owned.insert(0, overlay.clone());
            overlay
        } else {
            base
        };
        // -C: a copy-on-read filter on top, which `info` looks through.
        let top = if spec.copy_on_read {
            let cor = sluice_drivers::blockdev_add(
                &w,
                serde_json::json!({"driver": "copy-on-read", "file": top.name()}),
            )
            .await
            .map_err(|e| e.to_string())?;
            owned.insert(0, cor.clone());
            cor
        } else {
            top
        };
        let perm = match (spec.read_only, spec.force_share) {
            (false, _) => PermPair::writer(),
            (true, false) => PermPair::reader(),
            (true, true) => PermPair::reader_sharing_all(),
        };
        let root = match w.add_root("block device", "qemu-io", &top, perm).await {
            Ok(r) => r,
            Err(e) => {
                for n in &owned {
                    let d = w.drain(n).await;
                    let _ = w.delete_node(&d, n).await;
                }
                return Err(e.to_string());
            }
        };
        (root, owned)
    };
    Ok(OpenImage {
        graph,
        root: Arc::new(root),
        owned,
        writable: !spec.read_only,
        copy_on_read: spec.copy_on_read,
    })
}

impl Session {
    pub fn new(image_opts: bool) -> Session {
        Session {
            blk: None,
            image_opts,
            quit: false,
            pending: Arc::new(Pending::default()),
            announced: Arc::default(),
            watchers: Vec::new(),
            tags: HashSet::new(),
        }
    }

    /// Opens an image unless one is open; prints qemu-io's messages.
    pub async fn openfile(&mut self, spec: &OpenSpec) -> bool {
        if self.blk.is_some() {
            err(&format!("{PROG}: file open already, try 'help close'"));
            return false;
        }
        match open_image(spec).await {
            Ok(o) => {
                self.blk = Some(o);
                true
            }
            Err(e) => {
                match &spec.filename {
                    Some(n) => err(&format!("{PROG}: can't open device {n}: {e}")),
                    None => err(&format!("{PROG}: can't open: {e}")),
                }
                false
            }
        }
    }

    /// Lets parked requests go, waits for every aio request, and closes.
    pub async fn close(&mut self) {
        self.release_breakpoints();
        self.pending.wait_all().await;
        if let Some(o) = self.blk.take() {
            let OpenImage {
                graph, root, owned, ..
            } = o;
            drop(root);
            let w = graph.writer().await;
            for n in &owned {
                let d = w.drain(n).await;
                let _ = w.delete_node(&d, n).await;
            }
        }
        for w in self.watchers.drain(..) {
            w.abort();
        }
        lock(&self.announced).clear();
        self.tags.clear();
    }

    /// Resumes requests still parked at breakpoints this session set, so
    /// the end of the session never waits forever.
    fn release_breakpoints(&mut self) {
        let Some(o) = &self.blk else { return };
        let Some(dbg) = sluice_core::find_debug_control(&o.node()) else {
            return;
        };
        let Some(ctl) = dbg.driver().debug_control() else {
            return;
        };
        for tag in &self.tags {
            if ctl.is_suspended(tag) {
                let _ = ctl.remove_breakpoint(tag);
            }
        }
    }
}

fn usage() {
    out(&format!(
        "Usage: {PROG} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{PROG} -c help' for information on available commands.
"
    ));
}

/// Parses qemu-io's `-i` values.
pub fn parse_aio(s: &str) -> Option<&'static str> {
    match s {
        "threads" => Some("threads"),
        "native" | "io_uring" => Some("io_uring"),
        _ => None,
    }
}

/// Parses qemu-io's `-d` values (accepted; discard is passed down as is).
pub fn parse_discard(s: &str) -> bool {
    matches!(s, "ignore" | "off" | "unmap" | "on")
}

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;

pub fn run(args: IoArgs) -> Result<ExitCode, String> {
    let c = |ch: char| ch as u32;
    let longopts = [
        LongOpt {
            name: "help",
            has_arg: false,
            code: c('h'),
        },
        LongOpt {
            name: "version",
            has_arg: false,
            code: c('V'),
        },
        LongOpt {
            name: "cmd",
            has_arg: true,
            code: c('c'),
        },
        LongOpt {
            name: "format",
            has_arg: true,
            code: c('f'),
        },
        LongOpt {
            name: "read-only",
            has_arg: false,
            code: c('r'),
        },
        LongOpt {
            name: "snapshot",
            has_arg: false,
            code: c('s'),
        },
        LongOpt {
            name: "nocache",
            has_arg: false,
            code: c('n'),
        },
        LongOpt {
            name: "copy-on-read",
            has_arg: false,
            code: c('C'),
        },
        LongOpt {
            name: "misalign",
            has_arg: false,
            code: c('m'),
        },
        LongOpt {
            name: "native-aio",
            has_arg: false,
            code: c('k'),
        },
        LongOpt {
            name: "aio",
            has_arg: true,
            code: c('i'),
        },
        LongOpt {
            name: "discard",
            has_arg: true,
            code: c('d'),
        },
        LongOpt {
            name: "cache",
            has_arg: true,
            code: c('t'),
        },
        LongOpt {
            name: "trace",
            has_arg: true,
            code: c('T'),
        },
        LongOpt {
            name: "object",
            has_arg: true,
            code: OPT_OBJECT,
        },
        LongOpt {
            name: "image-opts",
            has_arg: false,
            code: OPT_IMAGE_OPTS,
        },
        LongOpt {
            name: "force-share",
            has_arg: false,
            code: c('U'),
        },
    ];
    let p = getopt(PROG, &args.args, "hVc:d:f:rsnCmki:t:T:U", &longopts);
    let mut spec = OpenSpec::default();
    let mut cmds: Vec<String> = Vec::new();
    let mut image_opts = false;
    for (code, val) in &p.opts {
        let v = val.clone().unwrap_or_default();
        match char::from_u32(*code).unwrap_or('\0') {
            's' => spec.snapshot = true,
            'n' => spec.cache = Some(CacheMode::NONE),
            'C' => spec.copy_on_read = true,
            'd' if !parse_discard(&v) => {
                err(&format!("{PROG}: Invalid discard option: {v}"));
                return Ok(ExitCode::FAILURE);
            }
            'f' => spec.format = Some(v),
            'c' => cmds.push(v),
            'r' => spec.read_only = true,
            'm' | 'T' => {}
            'k' => spec.aio = Some("io_uring"),
            'i' => match parse_aio(&v) {
                Some(a) => spec.aio = Some(a),
                None => {
                    err(&format!("{PROG}: Invalid aio option: {v}"));
                    return Ok(ExitCode::FAILURE);
                }
            },
            't' => match parse_cache_mode(&v) {
                Ok(m) => spec.cache = Some(m),
                Err(_) => {
                    err(&format!("{PROG}: Invalid cache option: {v}"));
                    return Ok(ExitCode::FAILURE);
                }
            },
            'V' => {
                out(&format!(
                    "{PROG} version {} (sluice io)\n",
                    env!("CARGO_PKG_VERSION")
                ));
                return Ok(ExitCode::SUCCESS);
            }
            'h' => {
                usage();
                return Ok(ExitCode::SUCCESS);
            }
            'U' => spec.force_share = true,
            _ if *code == OPT_IMAGE_OPTS => image_opts = true,
            _ => {}
        }
    }
    if let Some(e) = p.error {
        err(&e.0);
        usage();
        return Ok(ExitCode::FAILURE);
    }
    if p.operands.len() > 1 {
        usage();
        return Ok(ExitCode::FAILURE);
    }
    if spec.format.is_some() && image_opts {
        err(&format!(
            "{PROG}: --image-opts and -f are mutually exclusive"
        ));
        return Ok(ExitCode::FAILURE);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let code = rt.block_on(async move {
        let mut s = Session::new(image_opts);
        if let Some(file) = p.operands.first() {
            if image_opts {
                match sluice_control::keyval::parse(file, Some("file")) {
                    Ok(v) => spec.opts = Some(v),
                    Err(e) => {
                        err(&format!("{PROG}: {e}"));
                        return 1u8;
                    }
                }
            } else {
                spec.filename = Some(file.clone());
            }
            if !s.openfile(&spec).await {
                return 1;
            }
        }
        let mut last_error = 0;
        if !cmds.is_empty() {
            for c in &cmds {
                if s.quit {
                    break;
                }
                let r = cmds::command(&mut s, c).await;
                if r < 0 {
                    last_error = r;
                }
            }
        } else {
            last_error = interactive(&mut s).await;
        }
        s.close().await;
        u8::from(last_error < 0)
    });
    // Background work (I/O engine threads) must not keep the process up.
    rt.shutdown_background();
    Ok(ExitCode::from(code))
}

/// The prompt loop: one command per line of stdin until EOF or `quit`.
async fn interactive(s: &mut Session) -> i32 {
    use std::io::IsTerminal;
    let tty = std::io::stdin().is_terminal();
    let mut last_error = 0;
    while !s.quit {
        out(&format!("{PROG}> "));
        let line = tokio::task::spawn_blocking(|| {
            use std::io::BufRead;
            let mut buf = Vec::new();
            match std::io::stdin().lock().read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => None,
                Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
            }
        })
        .await
        .ok()
        .flatten();
        let Some(line) = line else {
            if tty {
                out("\n");
            }
            break;
        };
        let line = line.strip_suffix('\n').unwrap_or(&line);
        let r = cmds::command(s, line).await;
        if r < 0 {
            last_error = r;
        }
    }
    last_error
}
