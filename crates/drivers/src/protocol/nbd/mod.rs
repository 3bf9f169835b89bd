//! `nbd`: the NBD client, a protocol node whose bytes live in an export of
//! an NBD server (QEMU's `BlockdevOptionsNbd`: `server`, `export`,
//! `reconnect-delay`, `open-timeout`; or an `nbd://` / `nbd+unix://` URL).
//!
//! * `handshake.rs` negotiates structured replies, `base:allocation` and
//!   the export (`NBD_OPT_GO`, or `NBD_OPT_EXPORT_NAME` from old servers).
//! * `conn.rs` runs one connection: many requests in flight, replies
//!   matched to handles by a reader task.
//! * This file holds the connection state: when the connection breaks,
//!   requests fail at once, or, with `reconnect-delay`, wait up to that many
//!   seconds while a background task redials (with backoff), and are sent
//!   again on the new connection.

mod conn;
mod handshake;
pub mod proto;

use async_trait::async_trait;
use conn::{BoxRead, BoxWrite, Conn, Failure, Outcome};
use handshake::ExportInfo;
use parking_lot::Mutex;
use proto::*;
use serde_json::{json, Value};
use sluice_core::{
    BlockDriver, DriverStatus, Error, IoBytes, Node, ReadBuf, Result, WriteFlags, ZeroFlags,
};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// How long connecting and negotiating may take before the attempt fails,
/// so that a server that accepts but never answers cannot hang an open.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The first and the longest pause between redials.
const REDIAL_FIRST: Duration = Duration::from_millis(50);
const REDIAL_MAX: Duration = Duration::from_secs(2);

/// `driver=nbd` options.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdOptions {
    /// `{"type": "unix", "path": ...}` or `{"type": "inet", "host": ..., "port": ...}`.
    #[serde(default)]
    pub server: Option<Value>,
    #[serde(default)]
    pub export: Option<String>,
    /// An `nbd://` or `nbd+unix://` URL instead of `server` and `export`.
    #[serde(default)]
    pub filename: Option<String>,
    /// Seconds requests wait for a reconnect after the connection broke;
    /// 0 (the default) fails them at once and never reconnects.
    #[serde(default)]
    pub reconnect_delay: Option<u64>,
    /// Seconds to keep retrying the first connection; 0 tries once.
    #[serde(default)]
    pub open_timeout: Option<u64>,
}

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    Unix(PathBuf),
    Inet { host: String, port: u16 },
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ServerAddr::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            ServerAddr::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A server and the export to open on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub server: ServerAddr,
    pub export: String,
}

impl Target {
    /// The URL QEMU would show for this target.
    pub fn uri(&self) -> String {
        let export = percent_encode(&self.export);
        match &self.server {
            ServerAddr::Unix(p) => format!(
                "nbd+unix:///{export}?socket={}",
                percent_encode(&p.to_string_lossy())
            ),
            ServerAddr::Inet { .. } => format!("nbd://{}/{export}", self.server),
        }
    }

    /// The `driver=nbd` options naming this target.
    pub fn to_options(&self) -> Value {
        let server = match &self.server {
            ServerAddr::Unix(p) => json!({"type": "unix", "path": p.to_string_lossy()}),
            ServerAddr::Inet { host, port } => {
                json!({"type": "inet", "host": host, "port": port.to_string()})
            }
        };
        json!({"driver": "nbd", "server": server, "export": self.export})
    }

    fn from_options(o: &NbdOptions) -> Result<Target> {
        let bad = |m: String| Error::invalid_option("nbd", m);
        if let Some(f) = &o.filename {
            if o.server.is_some() || o.export.is_some() {
                return Err(bad(
                    "'filename' cannot be used together with 'server' or 'export'".into(),
                ));
            }
            return match parse_filename(f) {
                Some(t) => t.map_err(bad),
                None => Err(bad(format!("'{f}' is not an NBD URL"))),
            };
        }
        let server = o
            .server
            .as_ref()
            .ok_or_else(|| bad("Parameter 'server' is missing".into()))?;
        Ok(Target {
            server: parse_server(server).map_err(bad)?,
            export: o.export.clone().unwrap_or_default(),
        })
    }
}

/// QEMU's `SocketAddress` for `server` (the `unix` and `inet` types).
fn parse_server(v: &Value) -> std::result::Result<ServerAddr, String> {
    let Some(o) = v.as_object() else {
        return Err(format!(
            "Invalid parameter type for 'server', expected: object, got {v}"
        ));
    };
    let string = |k: &str| -> std::result::Result<Option<String>, String> {
        match o.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if k == "port" => Ok(Some(n.to_string())),
            Some(other) => Err(format!(
                "Invalid parameter type for 'server.{k}', expected: string, got {other}"
            )),
        }
    };
    let only = |keys: &[&str]| match o.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(format!("Invalid parameter 'server.{k}'")),
        None => Ok(()),
    };
    let missing = |k: &str| format!("Parameter 'server.{k}' is missing");
    match string("type")?.as_deref() {
        Some("unix") => {
            only(&["type", "path"])?;
            Ok(ServerAddr::Unix(
                string("path")?.ok_or(missing("path"))?.into(),
            ))
        }
        Some("inet") => {
            only(&["type", "host", "port"])?;
            let host = string("host")?.ok_or(missing("host"))?;
            let port = string("port")?.ok_or(missing("port"))?;
            let port = port
                .parse()
                .map_err(|_| format!("'server.port' must be a port number, got '{port}'"))?;
            Ok(ServerAddr::Inet { host, port })
        }
        Some(other) => Err(format!(
            "'server.type' must be 'unix' or 'inet', got '{other}'"
        )),
        None => Err(missing("type")),
    }
}

/// Parses an NBD filename: `nbd[+tcp]://host[:port][/export]`,
/// `nbd+unix:///[export]?socket=path`, or QEMU's older
/// `nbd:unix:path[:exportname=name]` and `nbd:host:port[:exportname=name]`.
/// `None` when `s` is not an NBD filename at all.
pub fn parse_filename(s: &str) -> Option<std::result::Result<Target, String>> {
    if let Some(rest) = s
        .strip_prefix("nbd://")
        .or_else(|| s.strip_prefix("nbd+tcp://"))
    {
        return Some(parse_tcp_url(s, rest));
    }
    if let Some(rest) = s.strip_prefix("nbd+unix://") {
        return Some(parse_unix_url(s, rest));
    }
    let rest = s.strip_prefix("nbd:")?;
    Some(parse_legacy(s, rest))
}

fn parse_tcp_url(s: &str, rest: &str) -> std::result::Result<Target, String> {
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if path.contains('?') {
        return Err(format!("'{s}': an nbd:// URL takes no query"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("'{s}': unterminated IPv6 address"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("'{s}': no host"));
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("'{s}': invalid port '{p}'"))?,
        None => DEFAULT_PORT,
    };
    Ok(Target {
        server: ServerAddr::Inet {
            host: percent_decode(host)?,
            port,
        },
        export: percent_decode(path.strip_prefix('/').unwrap_or(path))?,
    })
}

fn parse_unix_url(s: &str, rest: &str) -> std::result::Result<Target, String> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.is_empty() && !path.starts_with('/') {
        return Err(format!("'{s}': an nbd+unix:// URL takes no host"));
    }
    let mut socket = None;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("socket", v)) => socket = Some(percent_decode(v)?),
            _ => return Err(format!("'{s}': unknown query parameter '{kv}'")),
        }
    }
    let socket = socket.ok_or_else(|| format!("'{s}': missing '?socket=' parameter"))?;
    Ok(Target {
        server: ServerAddr::Unix(socket.into()),
        export: percent_decode(path.strip_prefix('/').unwrap_or(path))?,
    })
}

fn parse_legacy(s: &str, rest: &str) -> std::result::Result<Target, String> {
    let (addr, export) = match rest.split_once(":exportname=") {
        Some((a, e)) => (a, e.to_string()),
        None => (rest, String::new()),
    };
    let server = if let Some(path) = addr.strip_prefix("unix:") {
        ServerAddr::Unix(path.into())
    } else {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}': expected nbd:HOST:PORT or nbd:unix:PATH"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port
            .parse()
            .map_err(|_| format!("'{s}': invalid port '{port}'"))?;
        ServerAddr::Inet {
            host: host.to_string(),
            port,
        }
    };
    Ok(Target { server, export })
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8 once decoded"))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// Connects and negotiates once.
async fn dial(target: &Target) -> io::Result<(BoxRead, BoxWrite, ExportInfo)> {
    let attempt = async {
        let (mut r, mut w): (BoxRead, BoxWrite) = match &target.server {
            ServerAddr::Unix(p) => {
                let (r, w) = tokio::net::UnixStream::connect(p).await?.into_split();
                (Box::new(r), Box::new(w))
            }
            ServerAddr::Inet { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let info = handshake::negotiate(&mut r, &mut w, &target.export)
            .await
            .map_err(io::Error::other)?;
        Ok((r, w, info))
    };
    tokio::time::timeout(DIAL_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the server did not complete negotiation within {} s",
                    DIAL_TIMEOUT.as_secs()
                ),
            ))
        })
}

/// Whether a new connection serves the same export the node was opened
/// with: a reconnect must not change what the node's users see.
fn same_export(old: &ExportInfo, new: &ExportInfo) -> bool {
    old.size == new.size
        && old.flags == new.flags
        && old.min_block == new.min_block
        && old.max_payload == new.max_payload
        && old.structured == new.structured
        && old.base_allocation.is_some() == new.base_allocation.is_some()
}

#[derive(Clone)]
enum State {
    Up(u64, Arc<Conn>),
    /// The connection broke: why, and until when requests wait for a
    /// reconnect (`None`: they fail at once).
    Down(Arc<str>, Option<Instant>),
    Closed,
}

struct Shared {
    target: Target,
    uri: String,
    /// What the first connection negotiated; later ones must match.
    info: ExportInfo,
    reconnect_delay: Duration,
    state: watch::Sender<State>,
    next_conn: AtomicU64,
    supervisor: Mutex<Option<AbortHandle>>,
}

impl Shared {
    /// Starts a negotiated connection and makes it the current one.
    fn publish(self: &Arc<Shared>, r: BoxRead, w: BoxWrite, info: ExportInfo) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let weak = Arc::downgrade(self);
        let on_lost = Box::new(move |why: &Arc<str>| {
            if let Some(s) = weak.upgrade() {
                s.lost(id, why);
            }
        });
        let conn = Conn::start(info, r, w, on_lost);
        let published = self.state.send_if_modified(|s| {
            if matches!(s, State::Closed) {
                return false;
            }
            *s = State::Up(id, conn.clone());
            true
        });
        if !published {
            conn.disconnect();
        }
        // A connection that broke before it was published found nothing
        // to mark down: mark it now, or requests would wait on it forever.
        if let Some(why) = conn.failure() {
            self.lost(id, &why);
        }
    }

    /// Connection `id` broke.
    fn lost(&self, id: u64, why: &Arc<str>) {
        let until =
            (!self.reconnect_delay.is_zero()).then(|| Instant::now() + self.reconnect_delay);
        let changed = self.state.send_if_modified(|s| match s {
            State::Up(cur, _) if *cur == id => {
                *s = State::Down(why.clone(), until);
                true
            }
            _ => false,
        });
        if changed {
            tracing::warn!("NBD server {}: connection lost: {why}", self.target.server);
        }
    }

    fn close(&self) {
        if let Some(t) = self.supervisor.lock().take() {
            t.abort();
        }
        if let State::Up(_, conn) = self.state.send_replace(State::Closed) {
            conn.disconnect();
        }
    }
}

/// Redials whenever the connection is down, with backoff, until the node
/// closes.
async fn supervise(shared: Arc<Shared>) {
    let mut rx = shared.state.subscribe();
    let mut pause = REDIAL_FIRST;
    let mut up_since = Instant::now();
    loop {
        if rx.wait_for(|s| !matches!(s, State::Up(..))).await.is_err() {
            return;
        }
        if matches!(*rx.borrow(), State::Closed) {
            return;
        }
        // A server that keeps dropping fresh connections is not redialled
        // in a tight loop: the backoff only resets after a connection that
        // lasted.
        if up_since.elapsed() < REDIAL_MAX {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(REDIAL_MAX);
        } else {
            pause = REDIAL_FIRST;
        }
        loop {
            match dial(&shared.target).await {
                Ok((r, w, info)) if same_export(&shared.info, &info) => {
                    tracing::info!("NBD server {}: reconnected", shared.target.server);
                    shared.publish(r, w, info);
                    up_since = Instant::now();
                    break;
                }
                Ok(_) => tracing::warn!(
                    "NBD server {}: export '{}' changed its size or flags; not reconnecting to it",
                    shared.target.server,
                    shared.target.export
                ),
                Err(e) => {
                    tracing::debug!("NBD server {}: redial failed: {e}", shared.target.server)
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(REDIAL_MAX);
        }
    }
}

/// Opens `driver=nbd`: connects (retrying up to `open-timeout` seconds),
/// negotiates, and returns the driver and the export's size.
pub async fn open(o: &NbdOptions, read_only: bool) -> Result<(NbdDriver, u64)> {
    let target = Target::from_options(o)?;
    let uri = target.uri();
    let deadline = Instant::now() + Duration::from_secs(o.open_timeout.unwrap_or(0));
    let mut pause = REDIAL_FIRST;
    let (r, w, info) = loop {
        match dial(&target).await {
            Ok(c) => break c,
            Err(e) if Instant::now() + pause < deadline => {
                tracing::debug!(
                    "NBD server {}: connecting failed, retrying: {e}",
                    target.server
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(REDIAL_MAX);
            }
            Err(e) => {
                return Err(Error::Open {
                    file: uri,
                    source: e,
                })
            }
        }
    };
    if info.has(FLAG_READ_ONLY) && !read_only {
        return Err(Error::Open {
            file: uri,
            source: io::Error::other(
                "the NBD export is read-only; open the node with read-only=on",
            ),
        });
    }
    let size = info.size;
    let shared = Arc::new(Shared {
        target,
        uri,
        info: info.clone(),
        reconnect_delay: Duration::from_secs(o.reconnect_delay.unwrap_or(0)),
        state: watch::Sender::new(State::Down("not connected yet".into(), None)),
        next_conn: AtomicU64::new(1),
        supervisor: Mutex::new(None),
    });
    shared.publish(r, w, info);
    if !shared.reconnect_delay.is_zero() {
        let t = tokio::spawn(supervise(shared.clone()));
        *shared.supervisor.lock() = Some(t.abort_handle());
    }
    Ok((NbdDriver { shared }, size))
}

/// The `nbd` driver of one node.
pub struct NbdDriver {
    shared: Arc<Shared>,
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// `[offset, offset + len)` in pieces of at most `max` bytes.
fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let max = max.max(1);
    (0..len.div_ceil(max)).map(move |i| {
        let at = i * max;
        (offset + at, (len - at).min(max))
    })
}

impl NbdDriver {
    fn info(&self) -> &ExportInfo {
        &self.shared.info
    }

    /// The largest length of a request without payload, in whole blocks.
    fn max_len(&self) -> u64 {
        u64::from(u32::MAX) & !(u64::from(self.info().min_block) - 1)
    }

    /// The current connection; waits for a reconnect while one may come
    /// (until `give_up`, if the request already lost a connection).
    async fn connection(&self, give_up: Option<Instant>) -> std::result::Result<Arc<Conn>, String> {
        let mut rx = self.shared.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            let until = match state {
                // A broken connection is about to be replaced by `Down`.
                State::Up(_, c) if c.is_failed() => None,
                State::Up(_, c) => return Ok(c),
                State::Closed => return Err("the node is closed".into()),
                State::Down(why, None) => return Err(why.to_string()),
                State::Down(why, Some(until)) => {
                    let until = give_up.map_or(until, |g| g.min(until));
                    if Instant::now() >= until {
                        return Err(format!(
                            "{why}; no reconnect within {} s",
                            self.shared.reconnect_delay.as_secs()
                        ));
                    }
                    Some(until)
                }
            };
            let changed = match until {
                Some(t) => match tokio::time::timeout_at(t, rx.changed()).await {
                    Ok(r) => r,
                    Err(_) => continue,
                },
                None => rx.changed().await,
            };
            if changed.is_err() {
                return Err("the node is closed".into());
            }
        }
    }

    /// Sends one request, again on a new connection if the connection
    /// broke and `reconnect-delay` allows.
    async fn request(
        &self,
        node: &Node,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<IoBytes>,
    ) -> Result<Outcome> {
        let lost = |why: &str| {
            Error::io(
                node.name(),
                cmd_name(ty),
                offset,
                len,
                io::Error::other(format!("NBD server {}: {why}", self.shared.target.server)),
            )
        };
        let wire_len = u32::try_from(len).map_err(|_| lost("request too long"))?;
        let mut give_up: Option<Instant> = None;
        let mut last_loss = String::new();
        loop {
            // A server that keeps breaking new connections does not keep
            // a request going past the delay.
            if give_up.is_some_and(|t| Instant::now() >= t) {
                return Err(lost(&format!(
                    "{last_loss}; not served within {} s of reconnecting",
                    self.shared.reconnect_delay.as_secs()
                )));
            }
            let conn = self.connection(give_up).await.map_err(|w| lost(&w))?;
            match conn
                .submit(ty, flags, offset, wire_len, payload.clone())
                .await
            {
                Ok(outcome) => return Ok(outcome),
                Err(Failure::Server { errno, message }) => {
                    if !message.is_empty() {
                        tracing::debug!(
                            "{}: NBD server {}: {} at offset {offset}: {message}",
                            node.name(),
                            self.shared.target.server,
                            cmd_name(ty)
                        );
                    }
                    return Err(Error::io(
                        node.name(),
                        cmd_name(ty),
                        offset,
                        len,
                        io::Error::from_raw_os_error(errno),
                    ));
                }
                Err(Failure::Lost(why)) if self.shared.reconnect_delay.is_zero() => {
                    return Err(lost(&why))
                }
                // Sent again once reconnected, within the delay from the
                // first loss (QEMU resends too; reads and writes are
                // idempotent).
                Err(Failure::Lost(why)) => {
                    give_up.get_or_insert_with(|| Instant::now() + self.shared.reconnect_delay);
                    last_loss = why.to_string();
                }
            }
        }
    }

    /// A write that needs FUA: the flag when the server takes it, else a
    /// flush afterwards.
    fn fua_flag(&self, fua: bool) -> (u16, bool) {
        match (fua, self.info().has(FLAG_SEND_FUA)) {
            (true, true) => (CMD_FLAG_FUA, false),
            (true, false) => (0, true),
            _ => (0, false),
        }
    }
}

#[async_trait]
impl BlockDriver for NbdDriver {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn request_alignment(&self) -> u32 {
        self.info().min_block
    }

    fn filename(&self) -> Option<String> {
        Some(self.shared.uri.clone())
    }

    async fn read(&self, node: &Node, offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        let max = u64::from(self.info().max_payload);
        for (at, n) in pieces(offset, buf.len() as u64, max) {
            let Outcome::Read(data) = self.request(node, CMD_READ, 0, at, n, None).await? else {
                return Err(Error::Other(format!(
                    "{}: NBD read at offset {at} got no data",
                    node.name()
                )));
            };
            let start = (at - offset) as usize;
            buf.reborrow()
                .slice(start..start + n as usize)
                .copy_from(&data);
        }
        Ok(())
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        let (fua, flush_after) = self.fua_flag(flags.fua);
        let max = u64::from(self.info().max_payload);
        for (at, n) in pieces(offset, data.len() as u64, max) {
            let start = (at - offset) as usize;
            let payload = data.slice(start..start + n as usize);
            self.request(node, CMD_WRITE, fua, at, n, Some(payload))
                .await?;
        }
        if flush_after {
            self.flush(node).await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        let info = self.info();
        let unsupported = |what| Error::NotSupported {
            node: node.name().to_string(),
            driver: "nbd",
            what,
        };
        if !info.has(FLAG_SEND_WRITE_ZEROES) {
            return Err(unsupported("write-zeroes (the server does not offer it)"));
        }
        if flags.no_fallback && !info.has(FLAG_SEND_FAST_ZERO) {
            return Err(unsupported(
                "fast write-zeroes (the server does not offer it)",
            ));
        }
        let (mut cmd_flags, flush_after) = self.fua_flag(flags.fua);
        if !flags.may_unmap {
            cmd_flags |= CMD_FLAG_NO_HOLE;
        }
        if flags.no_fallback {
            cmd_flags |= CMD_FLAG_FAST_ZERO;
        }
        for (at, n) in pieces(offset, len, self.max_len()) {
            match self
                .request(node, CMD_WRITE_ZEROES, cmd_flags, at, n, None)
                .await
            {
                Err(e) if e.errno() == libc::ENOTSUP => {
                    return Err(unsupported("write-zeroes (the server refused it)"))
                }
                other => other?,
            };
        }
        if flush_after {
            self.flush(node).await?;
        }
        Ok(())
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        if !self.info().has(FLAG_SEND_TRIM) {
            return Ok(());
        }
        for (at, n) in pieces(offset, len, self.max_len()) {
            self.request(node, CMD_TRIM, 0, at, n, None).await?;
        }
        Ok(())
    }

    async fn flush(&self, node: &Node) -> Result<()> {
        if !self.info().has(FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(node, CMD_FLUSH, 0, 0, 0, None).await?;
        Ok(())
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        if self.info().base_allocation.is_none() {
            // Without metadata everything may hold data, as in QEMU.
            return Ok(DriverStatus::Data {
                len,
                offset: Some(offset),
            });
        }
        // The request is widened to whole blocks; the answer is for `offset`.
        let align = u64::from(self.info().min_block);
        let start = offset & !(align - 1);
        let end = (offset + len)
            .div_ceil(align)
            .saturating_mul(align)
            .min(self.info().size)
            .min(start + self.max_len());
        let Outcome::Status(ext_len, flags) = self
            .request(
                node,
                CMD_BLOCK_STATUS,
                CMD_FLAG_REQ_ONE,
                start,
                end - start,
                None,
            )
            .await?
        else {
            return Err(Error::Other(format!(
                "{}: NBD block status at offset {offset} got no extent",
                node.name()
            )));
        };
        let ext_end = start + u64::from(ext_len);
        // A server extent ending inside the first block says nothing about
        // the rest of it: report that block as data.
        let n = if ext_end > offset {
            (ext_end - offset).min(len)
        } else {
            (start + align - offset).min(len)
        };
        let zero = ext_end > offset && flags & STATE_ZERO != 0;
        Ok(if zero {
            DriverStatus::Zero {
                len: n,
                offset: Some(offset),
            }
        } else {
            DriverStatus::Data {
                len: n,
                offset: Some(offset),
            }
        })
    }

    fn close(&self) {
        self.shared.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str, export: &str) -> Target {
        Target {
            server: ServerAddr::Unix(path.into()),
            export: export.into(),
        }
    }

    fn inet(host: &str, port: u16, export: &str) -> Target {
        Target {
            server: ServerAddr::Inet {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn urls_parse_as_qemu_reads_them() {
        let p = |s| parse_filename(s).unwrap();
        assert_eq!(
            p("nbd+unix:///disk?socket=/tmp/s.sock"),
            Ok(unix("/tmp/s.sock", "disk"))
        );
        assert_eq!(p("nbd+unix://?socket=/tmp/s"), Ok(unix("/tmp/s", "")));
        assert_eq!(
            p("nbd://localhost/a%20b"),
            Ok(inet("localhost", 10809, "a b"))
        );
        assert_eq!(p("nbd+tcp://h:1234"), Ok(inet("h", 1234, "")));
        assert_eq!(p("nbd://[::1]:99/e"), Ok(inet("::1", 99, "e")));
        assert_eq!(p("nbd:unix:/tmp/s:exportname=x"), Ok(unix("/tmp/s", "x")));
        assert_eq!(p("nbd:h:10:exportname=x"), Ok(inet("h", 10, "x")));
        assert!(p("nbd+unix:///disk").is_err());
        assert!(p("nbd://h:notaport/").is_err());
        assert!(p("nbd://:1/").is_err());
        assert!(p("nbd+unix:///d?socket=/s&x=1").is_err());
        assert!(parse_filename("/tmp/disk.img").is_none());
    }

    #[test]
    fn uris_round_trip() {
        for t in [
            unix("/tmp/a b.sock", "e/x"),
            inet("::1", 7, ""),
            inet("h", 10809, "d"),
        ] {
            assert_eq!(parse_filename(&t.uri()).unwrap(), Ok(t));
        }
    }

    #[test]
    fn server_options_are_checked() {
        let ok = |v: Value| parse_server(&v);
        assert_eq!(
            ok(json!({"type": "inet", "host": "h", "port": 10809})),
            Ok(ServerAddr::Inet {
                host: "h".into(),
                port: 10809
            })
        );
        assert!(ok(json!({"type": "unix"})).is_err());
        assert!(ok(json!({"type": "unix", "path": "/s", "x": 1})).is_err());
        assert!(ok(json!({"type": "vsock", "cid": "1"})).is_err());
        assert!(ok(json!({"type": "inet", "host": "h", "port": "http"})).is_err());
    }

    #[test]
    fn pieces_cover_the_range() {
        let v: Vec<_> = pieces(10, 25, 10).collect();
        assert_eq!(v, vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(pieces(0, 0, 10).count(), 0);
    }
}
