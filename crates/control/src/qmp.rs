//! QMP, the QEMU Machine Protocol: a JSON monitor over a socket.
//!
//! A connection gets the greeting, must negotiate with `qmp_capabilities`,
//! then sends `{"execute": NAME, "arguments": {...}, "id": ...}` objects
//! and gets `{"return": ...}` or `{"error": {"class", "desc"}}` back, with
//! `id` echoed; events (`{"event", "data", "timestamp"}`) go to every
//! negotiated connection. Malformed input gets an error and the
//! connection stays usable, as in QEMU.
//!
//! Commands on the graph (`blockdev-add`, `blockdev-del`,
//! `query-named-block-nodes`) are built in. Commands of layers below
//! control (the NBD server's `nbd-server-start`, `block-export-add`, ...)
//! come in through [`Extension`], so this crate does not depend on them.

use serde_json::{json, Map, Value};
use sluice_core::{Graph, Node, Role};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// Largest QMP message accepted; larger input is discarded with an error.
pub const MAX_MESSAGE: usize = 16 << 20;

/// A QMP error: QEMU's error class and a description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }

    pub fn device_not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "DeviceNotFound",
            desc: desc.into(),
        }
    }
}

impl From<sluice_core::Error> for QmpError {
    fn from(e: sluice_core::Error) -> Self {
        QmpError::generic(e.to_string())
    }
}

/// A boxed future, as [`Extension::execute`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Commands provided by another layer.
pub trait Extension: Send + Sync {
    /// The command names this extension answers.
    fn commands(&self) -> Vec<&'static str>;
    fn execute<'a>(
        &'a self,
        qmp: &'a Qmp,
        name: &'a str,
        args: Map<String, Value>,
    ) -> BoxFuture<'a, Result<Value, QmpError>>;

    /// Runs when `quit` arrives, before its reply: what the extension must
    /// wind down while the monitor can still report it (QEMU's storage
    /// daemon cancels its jobs, and their events reach the client before
    /// the reply to `quit`).
    fn before_quit<'a>(&'a self, _qmp: &'a Qmp) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Built-in commands.
const BUILTIN: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
];

struct QmpInner {
    graph: Graph,
    extensions: Vec<Arc<dyn Extension>>,
    events: broadcast::Sender<Value>,
    quit: watch::Sender<bool>,
}

/// The monitor state shared by every QMP connection. Cheap to clone.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<QmpInner>,
}

impl Qmp {
    pub fn new(graph: Graph, extensions: Vec<Arc<dyn Extension>>) -> Qmp {
        Qmp {
            inner: Arc::new(QmpInner {
                graph,
                extensions,
                events: broadcast::channel(1024).0,
                quit: watch::Sender::new(false),
            }),
        }
    }

    pub fn graph(&self) -> &Graph {
        &self.inner.graph
    }

    /// Sends an event to every negotiated connection.
    pub fn emit(&self, event: &str, data: Value) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut e = json!({
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
            "event": event,
        });
        if !data.is_null() {
            e["data"] = data;
        }
        let _ = self.inner.events.send(e);
    }

    /// Resolves once a client has sent `quit`.
    pub async fn wait_quit(&self) {
        let mut rx = self.inner.quit.subscribe();
        let _ = rx.wait_for(|q| *q).await;
    }

    pub fn greeting() -> Value {
        json!({"QMP": {"version": version(), "capabilities": ["oob"]}})
    }

    fn all_commands(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = BUILTIN.to_vec();
        for e in &self.inner.extensions {
            v.extend(e.commands());
        }
        v
    }

    /// Runs one command (after negotiation).
    pub async fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "qmp_capabilities" => Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-version" => {
                no_args(&args)?;
                Ok(version())
            }
            "query-commands" => {
                no_args(&args)?;
                Ok(Value::Array(
                    self.all_commands()
                        .into_iter()
                        .map(|n| json!({"name": n}))
                        .collect(),
                ))
            }
            "quit" => {
                no_args(&args)?;
                for ext in &self.inner.extensions {
                    ext.before_quit(self).await;
                }
                self.inner.quit.send_replace(true);
                Ok(json!({}))
            }
            "blockdev-add" => self.blockdev_add(args).await,
            "blockdev-del" => self.blockdev_del(args).await,
            "query-named-block-nodes" => {
                let mut args = args;
                if let Some(v) = args.remove("flat") {
                    if !v.is_boolean() {
                        return Err(QmpError::generic(
                            "Invalid parameter type for 'flat', expected: boolean",
                        ));
                    }
                }
                no_args(&args)?;
                Ok(self.named_block_nodes())
            }
            _ => {
                for e in &self.inner.extensions {
                    if e.commands().contains(&name) {
                        return e.execute(self, name, args).await;
                    }
                }
                Err(QmpError::command_not_found(format!(
                    "The command {name} has not been found"
                )))
            }
        }
    }

    async fn blockdev_add(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        if !args.contains_key("node-name") {
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let w = self.inner.graph.writer().await;
        sluice_drivers::blockdev_add(&w, Value::Object(args)).await?;
        Ok(json!({}))
    }

    async fn blockdev_del(&self, mut args: Map<String, Value>) -> Result<Value, QmpError> {
        let name = take_string(&mut args, "node-name")?
            .ok_or_else(|| QmpError::generic("Parameter 'node-name' is missing"))?;
        no_args(&args)?;
        let w = self.inner.graph.writer().await;
        let node = w.graph().node(&name).map_err(|_| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
        if node.is_implicit() {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if let Some(e) = busy_as_backing(&node) {
            return Err(e);
        }
        let parents = node.parents();
        if parents.iter().any(|e| e.parent().node().is_none()) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        if !parents.is_empty() {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        let drained = w.drain(&node).await;
        w.delete_node(&drained, &node).await?;
        Ok(json!({}))
    }

    fn named_block_nodes(&self) -> Value {
        let mut out = Vec::new();
        for node in self.inner.graph.nodes() {
            let filename = node
                .driver()
                .filename()
                .or_else(|| node.child(Role::File).and_then(|f| f.driver().filename()))
                .unwrap_or_else(|| {
                    format!(
                        "json:{{\"driver\": \"{}\", \"size\": {}}}",
                        node.driver_name(),
                        node.size()
                    )
                });
            let mut depth = 0u32;
            let mut cur = node.child(Role::Backing);
            let backing_file = cur.as_ref().map(|b| b.name().to_string());
            while let Some(b) = cur {
                depth += 1;
                cur = b.child(Role::Backing);
                if depth > 4096 {
                    break;
                }
            }
            let mut image = json!({
                "virtual-size": node.size(),
                "filename": filename,
                "format": node.driver_name(),
            });
            if let Some(b) = &backing_file {
                image["backing-filename"] = json!(b);
            }
            let mut n = json!({
                "node-name": node.name(),
                "drv": node.driver_name(),
                "ro": node.is_read_only(),
                "encrypted": false,
                "file": filename,
                "backing_file_depth": depth,
                "image": image,
                "active": true,
                "detect_zeroes": "off",
                "cache": {"writeback": true, "direct": false, "no-flush": false},
                "bps": 0, "bps_rd": 0, "bps_wr": 0,
                "iops": 0, "iops_rd": 0, "iops_wr": 0,
                "write_threshold": 0,
            });
            if let Some(b) = backing_file {
                n["backing_file"] = json!(b);
            }
            out.push(n);
        }
        Value::Array(out)
    }

    /// Serves one QMP connection until the client leaves or `quit`.
    pub async fn serve<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut r, mut w) = tokio::io::split(stream);
        if send(&mut w, &Qmp::greeting()).await.is_err() {
            return;
        }
        let mut negotiated = false;
        let mut events = self.inner.events.subscribe();
        let mut splitter = Splitter::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::select! {
                res = r.read(&mut buf) => match res {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                ev = events.recv(), if negotiated => {
                    match ev {
                        Ok(ev) => if send(&mut w, &ev).await.is_err() { return },
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    continue;
                }
            };
            for msg in splitter.feed(&buf[..n]) {
                let reply = match msg {
                    Err(e) => error_reply(&e, None),
                    Ok(bytes) => self.handle_message(&bytes, &mut negotiated).await,
                };
                // Events raised by the command go out before its reply,
                // as QEMU orders them.
                if negotiated {
                    while let Ok(ev) = events.try_recv() {
                        if send(&mut w, &ev).await.is_err() {
                            return;
                        }
                    }
                }
                if send(&mut w, &reply).await.is_err() {
                    return;
                }
                if *self.inner.quit.borrow() {
                    return;
                }
            }
        }
    }

    async fn handle_message(&self, bytes: &[u8], negotiated: &mut bool) -> Value {
        let v: Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                return error_reply(&QmpError::generic(format!("JSON parse error, {e}")), None)
            }
        };
        let Value::Object(mut obj) = v else {
            return error_reply(&QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = obj.remove("id");
        let name = match obj.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => {
                return error_reply(
                    &QmpError::generic("QMP input member 'execute' must be a string"),
                    id,
                )
            }
            None => {
                if let Some(k) = obj.keys().next() {
                    return error_reply(
                        &QmpError::generic(format!("QMP input member '{k}' is unexpected")),
                        id,
                    );
                }
                return error_reply(&QmpError::generic("QMP input lacks member 'execute'"), id);
            }
        };
        let args = match obj.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(a)) => a,
            Some(_) => {
                return error_reply(
                    &QmpError::generic("QMP input member 'arguments' must be an object"),
                    id,
                )
            }
        };
        if let Some(k) = obj.keys().next() {
            return error_reply(
                &QmpError::generic(format!("QMP input member '{k}' is unexpected")),
                id,
            );
        }
        let res = if !*negotiated {
            if name == "qmp_capabilities" {
                match args.get("enable") {
                    Some(Value::Array(a)) if !a.is_empty() => Err(QmpError::generic(format!(
                        "Capability '{}' not available",
                        a[0].as_str().unwrap_or("")
                    ))),
                    _ => {
                        *negotiated = true;
                        Ok(json!({}))
                    }
                }
            } else {
                Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ))
            }
        } else {
            self.execute(&name, args).await
        };
        match res {
            Ok(v) => {
                let mut r = json!({"return": v});
                if let Some(id) = id {
                    r["id"] = id;
                }
                r
            }
            Err(e) => error_reply(&e, id),
        }
    }
}

fn version() -> Value {
    let v = env!("CARGO_PKG_VERSION");
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    json!({
        "qemu": {
            "major": parts.next().unwrap_or(0),
            "minor": parts.next().unwrap_or(0),
            "micro": parts.next().unwrap_or(0),
        },
        "package": format!("sluice {v}"),
    })
}

fn error_reply(e: &QmpError, id: Option<Value>) -> Value {
    let mut r = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

/// Formats JSON the way QEMU's monitor does: `{"a": 1, "b": [1, 2]}`.
struct QemuStyle;

impl serde_json::ser::Formatter for QemuStyle {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// One message as QEMU writes it (without the line end).
pub fn to_qemu_json(v: &Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuStyle);
    let _ = v.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, v: &Value) -> std::io::Result<()> {
    let mut s = to_qemu_json(v).into_bytes();
    s.extend_from_slice(b"\r\n");
    w.write_all(&s).await?;
    w.flush().await
}

/// Rejects any argument left in `args`.
pub fn no_args(args: &Map<String, Value>) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

/// Takes a string argument.
pub fn take_string(args: &mut Map<String, Value>, key: &str) -> Result<Option<String>, QmpError> {
    match args.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{key}', expected: string"
        ))),
    }
}

/// Takes a boolean argument.
pub fn take_bool(args: &mut Map<String, Value>, key: &str) -> Result<Option<bool>, QmpError> {
    match args.remove(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{key}', expected: boolean"
        ))),
    }
}

/// Splits a byte stream into top-level JSON values, as QEMU's streaming
/// parser does: objects and arrays by bracket depth (outside strings),
/// other tokens up to whitespace.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_str: bool,
    esc: bool,
    scalar: bool,
    /// Discarding the rest of an oversized message.
    skipping: bool,
}

impl Splitter {
    /// Feeds bytes; returns every complete message (or an error for an
    /// oversized one, whose bytes are dropped up to its end).
    pub fn feed(&mut self, data: &[u8]) -> Vec<Result<Vec<u8>, QmpError>> {
        let mut out = Vec::new();
        for &b in data {
            let started = self.depth > 0 || self.scalar;
            if !started {
                if b.is_ascii_whitespace() {
                    continue;
                }
                match b {
                    b'{' | b'[' => self.depth = 1,
                    _ => self.scalar = true,
                }
                if !self.skipping {
                    self.buf.push(b);
                }
                continue;
            }
            if self.scalar {
                if b.is_ascii_whitespace() || b == b'{' || b == b'[' {
                    self.scalar = false;
                    self.finish(&mut out);
                    if b == b'{' || b == b'[' {
                        self.depth = 1;
                        self.buf.push(b);
                    }
                    continue;
                }
            } else if self.in_str {
                if self.esc {
                    self.esc = false;
                } else if b == b'\\' {
                    self.esc = true;
                } else if b == b'"' {
                    self.in_str = false;
                }
            } else {
                match b {
                    b'"' => self.in_str = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => self.depth -= 1,
                    _ => {}
                }
            }
            if !self.skipping {
                self.buf.push(b);
                if self.buf.len() > MAX_MESSAGE {
                    self.buf = Vec::new();
                    self.skipping = true;
                }
            }
            if !self.scalar && self.depth == 0 {
                self.finish(&mut out);
            }
        }
        out
    }

    fn finish(&mut self, out: &mut Vec<Result<Vec<u8>, QmpError>>) {
        if self.skipping {
            self.skipping = false;
            out.push(Err(QmpError::generic(format!(
                "JSON parse error, message larger than {MAX_MESSAGE} bytes"
            ))));
        } else {
            out.push(Ok(std::mem::take(&mut self.buf)));
        }
        self.in_str = false;
        self.esc = false;
    }
}

/// A QMP monitor listening on a Unix socket (`--chardev socket,...,server=on`
/// with `--monitor`). Every client is served concurrently.
pub struct MonitorListener {
    task: JoinHandle<()>,
    path: PathBuf,
}

impl MonitorListener {
    pub fn bind(qmp: Qmp, path: &Path) -> std::io::Result<MonitorListener> {
        let l = UnixListener::bind(path)?;
        let task = tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        let qmp = qmp.clone();
                        tokio::spawn(async move { qmp.serve(s).await });
                    }
                    Err(e) => {
                        tracing::warn!("QMP accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(MonitorListener {
            task,
            path: path.to_path_buf(),
        })
    }

    /// Stops listening and removes the socket.
    pub async fn close(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// QEMU's op blocker on a backing node: most operations on a node that is
/// some overlay's backing file are refused, naming the overlay.
pub(crate) fn busy_as_backing(node: &Node) -> Option<QmpError> {
    node.parents().iter().find_map(|e| {
        let overlay = e.parent().node().filter(|_| e.role() == Role::Backing)?;
        Some(QmpError::generic(format!(
            "Node '{}' is busy: node is used as backing hd of '{}'",
            node.name(),
            overlay.name()
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_spaced_like_qemus() {
        assert_eq!(
            to_qemu_json(&json!({"return": {}, "x": [1, {"a": "b"}]})),
            r#"{"return": {}, "x": [1, {"a": "b"}]}"#
        );
    }

    #[test]
    fn splitter_finds_messages_across_reads_and_strings() {
        let mut s = Splitter::default();
        assert!(s.feed(br#"{"execute": "a}{", "x": ["#).is_empty());
        let out = s.feed(b"1]}\n  {\"b\":\"\\\"}\"}5 [1]");
        let got: Vec<String> = out
            .into_iter()
            .map(|r| String::from_utf8(r.unwrap()).unwrap())
            .collect();
        assert_eq!(
            got,
            [
                r#"{"execute": "a}{", "x": [1]}"#,
                r#"{"b":"\"}"}"#,
                "5",
                "[1]"
            ]
        );
    }
}
