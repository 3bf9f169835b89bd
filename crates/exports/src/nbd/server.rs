//! The server: listeners, exports, connection bookkeeping, shutdown.

use super::conn;
use super::proto::*;
use parking_lot::Mutex;
use sluice_core::{Error, GraphWriter, Node, Perm, PermPair, Result, Root};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// Requests of one connection processed at once (as qemu-nbd's 16).
pub const MAX_IN_FLIGHT: usize = 16;

/// Request buffer memory (read and write payloads) of all connections
/// together; requests beyond it wait for others to finish.
pub const BUFFER_BUDGET: u64 = 1 << 30;

/// Where the server listens (`addr.type=unix|inet`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Inet { host: String, port: u16 },
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// Clients connected at once; 0 is unlimited (`max-connections`).
    pub max_connections: u32,
}

/// One export's settings (`block-export-add type=nbd` / `--export`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// The export id (`id=`), unique among exports.
    pub id: String,
    /// The NBD export name clients ask for (`name=`).
    pub name: String,
    pub description: Option<String>,
    pub writable: bool,
    /// Offer the `qemu:allocation-depth` metadata context.
    pub allocation_depth: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`. sluice keeps no per-connection
    /// cache: a flush on one connection flushes the node for all of them.
    pub multi_conn: bool,
}

impl ExportConfig {
    /// An export named `name` with id `name`, read-only, defaults elsewhere.
    pub fn new(name: &str) -> ExportConfig {
        ExportConfig {
            id: name.to_string(),
            name: name.to_string(),
            description: None,
            writable: false,
            allocation_depth: true,
            multi_conn: true,
        }
    }
}

/// How `block-export-del` treats connected clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while any client is connected.
    Safe,
    /// Close client connections (in-flight requests finish first).
    Hard,
}

/// What `query-block-exports` shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExportInfo {
    pub id: String,
    pub name: String,
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub writable: bool,
    pub clients: usize,
}

pub(crate) struct Export {
    pub(crate) config: ExportConfig,
    pub(crate) root: Root,
    /// Connected clients (transmission phase).
    clients: Arc<watch::Sender<usize>>,
    /// Set to close every client (hard removal).
    pub(crate) close: watch::Sender<bool>,
}

impl Export {
    pub(crate) fn flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if self.config.writable {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        } else {
            f |= FLAG_READ_ONLY;
        }
        if structured {
            f |= FLAG_SEND_DF;
        }
        if self.config.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        f
    }

    pub(crate) fn min_block(&self) -> u32 {
        self.root.node().request_alignment().clamp(1, 1 << 16) as u32
    }

    fn view(&self) -> ExportView {
        ExportView {
            name: self.config.name.clone(),
            description: self.config.description.clone(),
            size: self.root.size(),
            flags_plain: self.flags(false),
            flags_structured: self.flags(true),
            min_block: self.min_block(),
            allocation_depth: self.config.allocation_depth,
        }
    }
}

/// A copy of what the handshake needs to know of an export, so that a
/// client in negotiation holds no reference to the export itself.
#[derive(Clone, Debug)]
pub(crate) struct ExportView {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) size: u64,
    pub(crate) flags_plain: u16,
    pub(crate) flags_structured: u16,
    pub(crate) min_block: u32,
    pub(crate) allocation_depth: bool,
}

/// A client attached to an export; dropping it lets the export go.
pub(crate) struct ClientGuard {
    export: Option<Arc<Export>>,
    clients: Arc<watch::Sender<usize>>,
}

impl ClientGuard {
    pub(crate) fn export(&self) -> &Arc<Export> {
        self.export.as_ref().expect("attached")
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        // The export reference goes before the count drops, so that a
        // removal waiting for zero clients holds the last reference.
        drop(self.export.take());
        self.clients.send_modify(|n| *n = n.saturating_sub(1));
    }
}

struct Listening {
    task: JoinHandle<()>,
    unix_path: Option<PathBuf>,
}

pub(crate) struct ServerInner {
    exports: Mutex<Vec<Arc<Export>>>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Every connection, in negotiation or transmission.
    connections: watch::Sender<usize>,
    slots: Option<Arc<Semaphore>>,
    listeners: Mutex<Vec<Listening>>,
    /// Budget of request buffers, in units of `conn::BUDGET_UNIT` bytes.
    pub(crate) buffers: Arc<Semaphore>,
}

/// An NBD server. Cheap to clone; clones share the server.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<ServerInner>,
}

/// Counts a connection for as long as it lives.
pub(crate) struct ConnTrack(Arc<ServerInner>);

impl Drop for ConnTrack {
    fn drop(&mut self) {
        self.0.connections.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl NbdServer {
    pub fn new(config: ServerConfig) -> NbdServer {
        let slots = (config.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(config.max_connections as usize)));
        NbdServer {
            inner: Arc::new(ServerInner {
                exports: Mutex::new(Vec::new()),
                shutdown: watch::Sender::new(false),
                connections: watch::Sender::new(0),
                slots,
                listeners: Mutex::new(Vec::new()),
                buffers: Arc::new(Semaphore::new(
                    (BUFFER_BUDGET / conn::BUDGET_UNIT as u64) as usize,
                )),
            }),
        }
    }

    /// Starts listening on `addr`; returns the bound TCP address (useful
    /// with port 0) for `inet` addresses. Must run inside a tokio runtime.
    pub async fn listen(&self, addr: &ListenAddr) -> Result<Option<SocketAddr>> {
        match addr {
            ListenAddr::Unix(path) => {
                let l = UnixListener::bind(path).map_err(|e| {
                    Error::Other(format!(
                        "Failed to bind socket to {}: {}",
                        path.display(),
                        sluice_core::error::os_text(&e)
                    ))
                })?;
                let inner = self.inner.clone();
                let task = tokio::spawn(accept_loop(inner, AnyListener::Unix(l)));
                self.inner.listeners.lock().push(Listening {
                    task,
                    unix_path: Some(path.clone()),
                });
                Ok(None)
            }
            ListenAddr::Inet { host, port } => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let l = TcpListener::bind((host, *port)).await.map_err(|e| {
                    Error::Other(format!(
                        "Failed to bind socket: {}",
                        sluice_core::error::os_text(&e)
                    ))
                })?;
                let local = l.local_addr().ok();
                let inner = self.inner.clone();
                let task = tokio::spawn(accept_loop(inner, AnyListener::Tcp(l)));
                self.inner.listeners.lock().push(Listening {
                    task,
                    unix_path: None,
                });
                Ok(local)
            }
        }
    }

    /// Serves one already-connected stream (tests, socket activation).
    pub fn serve_stream<R, W>(&self, r: R, w: W)
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let track = self.inner.track();
        tokio::spawn(conn::serve(self.inner.clone(), track, r, w, None));
    }

    /// Adds an export of `node`: attaches a root named after the export id
    /// (read, plus write when writable; sharing everything, as QEMU does).
    pub async fn add_export(
        &self,
        w: &GraphWriter<'_>,
        config: ExportConfig,
        node: &Arc<Node>,
    ) -> Result<()> {
        if config.name.len() > MAX_STRING {
            return Err(Error::Other(format!(
                "export name '{}' is too long",
                config.name
            )));
        }
        {
            let exports = self.inner.exports.lock();
            if exports.iter().any(|e| e.config.id == config.id) {
                return Err(Error::Other(format!(
                    "Block export id '{}' is already in use",
                    config.id
                )));
            }
            if exports.iter().any(|e| e.config.name == config.name) {
                return Err(Error::Other(format!(
                    "NBD server already has export named '{}'",
                    config.name
                )));
            }
        }
        let mut perm = Perm::CONSISTENT_READ;
        if config.writable {
            perm |= Perm::WRITE;
        }
        let root = w
            .add_root("export", &config.id, node, PermPair::new(perm, Perm::ALL))
            .await?;
        let export = Arc::new(Export {
            config,
            root,
            clients: Arc::new(watch::Sender::new(0)),
            close: watch::Sender::new(false),
        });
        let mut exports = self.inner.exports.lock();
        // Checked again: the graph writer does not serialise the server.
        if exports
            .iter()
            .any(|e| e.config.id == export.config.id || e.config.name == export.config.name)
        {
            return Err(Error::Other(format!(
                "Block export id '{}' is already in use",
                export.config.id
            )));
        }
        exports.push(export);
        Ok(())
    }

    /// Removes export `id`. `Safe` refuses while clients are connected;
    /// `Hard` closes their connections. Returns once the export's root is
    /// detached from its node.
    pub async fn remove_export(&self, id: &str, mode: RemoveMode) -> Result<()> {
        let export = {
            let mut exports = self.inner.exports.lock();
            let Some(i) = exports.iter().position(|e| e.config.id == id) else {
                return Err(Error::Other(format!("Export '{id}' is not found")));
            };
            let clients = *exports[i].clients.borrow();
            if mode == RemoveMode::Safe && clients > 0 {
                // QEMU's words; its hint: use mode 'hard' to force
                // client disconnect.
                return Err(Error::Other(format!("export '{id}' still in use")));
            }
            exports.remove(i)
        };
        export.close.send_replace(true);
        let mut rx = export.clients.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
        drop(export);
        Ok(())
    }

    /// Every export, in the order added.
    pub fn exports(&self) -> Vec<ExportInfo> {
        self.inner
            .exports
            .lock()
            .iter()
            .map(|e| ExportInfo {
                id: e.config.id.clone(),
                name: e.config.name.clone(),
                node_name: e.root.node().name().to_string(),
                writable: e.config.writable,
                clients: *e.clients.borrow(),
            })
            .collect()
    }

    /// Connections open now (negotiating or attached).
    pub fn connections(&self) -> usize {
        *self.inner.connections.borrow()
    }

    /// Stops listening, closes every connection once its in-flight
    /// requests are answered, and removes every export.
    pub async fn shutdown(&self) {
        let listeners: Vec<Listening> = std::mem::take(&mut *self.inner.listeners.lock());
        for l in listeners {
            l.task.abort();
            let _ = l.task.await;
            if let Some(p) = l.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
        self.inner.shutdown.send_replace(true);
        let mut rx = self.inner.connections.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
        let exports: Vec<Arc<Export>> = std::mem::take(&mut *self.inner.exports.lock());
        for e in exports {
            e.close.send_replace(true);
            let mut rx = e.clients.subscribe();
            let _ = rx.wait_for(|n| *n == 0).await;
        }
    }
}

impl ServerInner {
    pub(crate) fn track(self: &Arc<Self>) -> ConnTrack {
        self.connections.send_modify(|n| *n += 1);
        ConnTrack(self.clone())
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.exports.lock();
        if let Some(e) = exports.iter().find(|e| e.config.name == name) {
            return Some(e.clone());
        }
        // The empty name is the default export: the only one, if there is
        // just one.
        if name.is_empty() && exports.len() == 1 {
            return Some(exports[0].clone());
        }
        None
    }

    pub(crate) fn view(&self, name: &str) -> Option<ExportView> {
        self.find(name).map(|e| e.view())
    }

    pub(crate) fn list(&self) -> Vec<(String, Option<String>)> {
        self.exports
            .lock()
            .iter()
            .map(|e| (e.config.name.clone(), e.config.description.clone()))
            .collect()
    }

    /// Attaches a client to export `name` (`NBD_OPT_GO`, `EXPORT_NAME`).
    pub(crate) fn attach(&self, name: &str) -> Option<ClientGuard> {
        let exports = self.exports.lock();
        let export = match exports.iter().find(|e| e.config.name == name) {
            Some(e) => e.clone(),
            None if name.is_empty() && exports.len() == 1 => exports[0].clone(),
            None => return None,
        };
        // Under the exports lock: a removal either sees this client or
        // has already taken the export out of the list.
        export.clients.send_modify(|n| *n += 1);
        Some(ClientGuard {
            clients: export.clients.clone(),
            export: Some(export),
        })
    }
}

enum AnyListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

async fn accept_loop(inner: Arc<ServerInner>, listener: AnyListener) {
    loop {
        // With max-connections, stop accepting while the server is full.
        let permit = match &inner.slots {
            Some(s) => match s.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => return,
            },
            None => None,
        };
        let res = match &listener {
            AnyListener::Unix(l) => l.accept().await.map(|(s, _)| {
                let (r, w) = s.into_split();
                let track = inner.track();
                tokio::spawn(conn::serve(inner.clone(), track, r, w, permit));
            }),
            AnyListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                let track = inner.track();
                tokio::spawn(conn::serve(inner.clone(), track, r, w, permit));
            }),
        };
        if let Err(e) = res {
            tracing::warn!("NBD server: accept failed: {e}");
            // EMFILE and the like: back off a little rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
