//! `sluice daemon`: qemu-storage-daemon's command line. Nodes from
//! `--blockdev`, an NBD server from `--nbd-server`, exports from
//! `--export`, applied in the order given; then it serves until SIGINT or
//! SIGTERM, and shuts down cleanly (stop listening, answer what is in
//! flight, close clients, remove sockets and the pid file).
//!
//! With no options it serves a built-in default: a 64 MiB RAM disk over
//! NBD on a Unix socket, and a QMP monitor on another, in a temporary
//! directory, and prints how to connect.
//!
//! `--chardev socket,...` with `--monitor` serves QMP (`sluice_control::qmp`);
//! the NBD commands come from [`NbdCommands`], the QMP extension here, and
//! the block job commands from `sluice_control::jobs`, the object
//! commands (`object-add`, ...; `--object` on the command line) from
//! `sluice_control::objects`.
//!
//! `--daemonize` forks once the command line is read ([`daemonize`]).

mod daemonize;
mod options;

use options::{DaemonOpt, ExportOpts, Located, NbdServerOpts, Parsed, USAGE};
use serde_json::{json, Map, Value};
use sluice_control::jobs::JobCommands;
use sluice_control::objects::{self, ObjectCommands};
use sluice_control::qmp::{self, BoxFuture, MonitorListener, Qmp, QmpError};
use sluice_control::reopen::ReopenCommands;
use sluice_core::Graph;
use sluice_drivers::blockdev_add;
use sluice_exports::{ExportConfig, ListenAddr, NbdServer, RemoveMode, ServerConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
pub struct DaemonArgs {
    /// qemu-storage-daemon options: --blockdev, --nbd-server, --export,
    /// --pidfile (see `sluice daemon --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

/// Size of the built-in RAM disk.
const DEFAULT_SIZE: u64 = 64 << 20;

pub fn run(args: DaemonArgs) -> Result<ExitCode, String> {
    let (opts, default_dir) = if args.args.is_empty() {
        let dir = make_temp_dir()?;
        (default_options(&dir), Some(dir))
    } else {
        match options::parse_args(&args.args)? {
            Parsed::Help => {
                print!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            Parsed::Run(opts) => (opts, None),
        }
    };
    if opts.iter().any(|o| o.opt == DaemonOpt::Daemonize) {
        let mut opts = opts;
        absolute_paths(&mut opts)?;
        let ready = daemonize::daemonize()?;
        return run_daemon(opts, None, Some(ready));
    }
    run_daemon(opts, default_dir, None)
}

/// Runs the daemon on a new runtime; `ready` is told once it is set up.
fn run_daemon(
    opts: Vec<Located>,
    default_dir: Option<PathBuf>,
    ready: Option<daemonize::Ready>,
) -> Result<ExitCode, String> {
    // Request buffers are large: keep them in the heap between requests.
    sluice_exports::alloc::tune_for_large_buffers();
    // Before any thread starts, so that every thread inherits the mask and
    // only the waiter thread takes SIGINT/SIGTERM.
    sluice_exports::signals::block_termination_signals()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let res = rt.block_on(serve(opts, default_dir.clone(), ready));
    if let Some(dir) = default_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    res
}

/// A daemon works in `/`: paths it creates and later removes (sockets, the
/// pid file) are made absolute before it moves there.
fn absolute_paths(opts: &mut [Located]) -> Result<(), String> {
    let abs = |p: &mut PathBuf| -> Result<(), String> {
        *p = std::path::absolute(&*p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(())
    };
    for o in opts {
        match &mut o.opt {
            DaemonOpt::Pidfile(p) | DaemonOpt::Chardev { path: p, .. } => abs(p)?,
            DaemonOpt::NbdServer(NbdServerOpts {
                addr: ListenAddr::Unix(p),
                ..
            }) => abs(p)?,
            _ => {}
        }
    }
    Ok(())
}

fn make_temp_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let dir = base.join(format!(
            "sluice-daemon-{}-{:08x}",
            std::process::id(),
            nanos.wrapping_add(attempt)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(format!(
                    "cannot create a directory in {}: {e}",
                    base.display()
                ))
            }
        }
    }
    Err(format!("cannot create a directory in {}", base.display()))
}

fn default_options(dir: &std::path::Path) -> Vec<Located> {
    let sock = dir.join("nbd.sock");
    let opt = |opt: DaemonOpt| Located {
        opt,
        text: "(built-in default)".into(),
    };
    vec![
        opt(DaemonOpt::Blockdev(
            json!({"driver": "memory", "node-name": "disk0", "size": DEFAULT_SIZE}),
        )),
        opt(DaemonOpt::NbdServer(options::NbdServerOpts {
            addr: ListenAddr::Unix(sock),
            max_connections: 0,
        })),
        opt(DaemonOpt::Export(options::ExportOpts {
            node_name: "disk0".into(),
            config: ExportConfig {
                id: "disk0".into(),
                name: "disk0".into(),
                description: Some("sluice built-in RAM disk".into()),
                writable: true,
                allocation_depth: true,
                multi_conn: true,
            },
        })),
        opt(DaemonOpt::Chardev {
            id: "qmp0".into(),
            path: dir.join("qmp.sock"),
        }),
        opt(DaemonOpt::Monitor {
            chardev: "qmp0".into(),
        }),
    ]
}

fn print_default_banner(dir: &std::path::Path) {
    let sock = dir.join("nbd.sock");
    let qmp = dir.join("qmp.sock");
    let s = sock.display();
    let q = qmp.display();
    let uri = format!("nbd+unix:///disk0?socket={s}");
    println!(
        "sluice daemon: serving a {} MiB RAM disk (node 'disk0') as NBD export 'disk0', writable",
        DEFAULT_SIZE >> 20
    );
    println!("NBD socket: {s}");
    println!("Connect with:");
    println!("  qemu-io -f raw '{uri}' -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k'");
    println!("  qemu-img map --output=json -f raw '{uri}'");
    println!("  nbdinfo --map '{uri}'");
    println!("  nbdinfo --map=qemu:allocation-depth '{uri}'");
    println!("QMP socket: {q}");
    println!("  socat - UNIX-CONNECT:{q}   then {{\"execute\": \"qmp_capabilities\"}}");
    println!("The same with explicit options:");
    println!(
        "  sluice daemon --blockdev driver=memory,node-name=disk0,size={DEFAULT_SIZE} \\\n      --nbd-server addr.type=unix,addr.path={s} \\\n      --export type=nbd,id=disk0,node-name=disk0,writable=on,allocation-depth=on \\\n      --chardev socket,id=qmp0,path={q},server=on,wait=off --monitor chardev=qmp0"
    );
    println!("Stop with Ctrl-C (SIGINT) or SIGTERM.");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// Removes the pid file when dropped.
struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The NBD server and its exports, for the command line and for QMP.
struct NbdCommands {
    graph: Graph,
    server: tokio::sync::Mutex<Option<NbdServer>>,
}

impl NbdCommands {
    async fn start(&self, o: &NbdServerOpts) -> Result<(), String> {
        let mut server = self.server.lock().await;
        if server.is_some() {
            return Err("NBD server already running".into());
        }
        let s = NbdServer::new(ServerConfig {
            max_connections: o.max_connections,
        });
        s.listen(&o.addr).await.map_err(|e| e.to_string())?;
        *server = Some(s);
        Ok(())
    }

    /// Stops the server; returns the ids of the exports that went with it.
    async fn stop(&self) -> Result<Vec<String>, String> {
        let Some(s) = self.server.lock().await.take() else {
            return Err("NBD server not running".into());
        };
        let ids = s.exports().into_iter().map(|e| e.id).collect();
        s.shutdown().await;
        Ok(ids)
    }

    async fn add_export(&self, e: &ExportOpts) -> Result<(), String> {
        // QEMU looks the node up before the server.
        let node = self
            .graph
            .node(&e.node_name)
            .map_err(|_| format!("Cannot find device='' nor node-name='{}'", e.node_name))?;
        let server = self.server.lock().await;
        let Some(s) = server.as_ref() else {
            return Err("NBD server not running".into());
        };
        let w = self.graph.writer().await;
        s.add_export(&w, e.config.clone(), &node)
            .await
            .map_err(|err| err.to_string())
    }

    async fn qmp(
        &self,
        qmp: &Qmp,
        name: &str,
        mut args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match name {
            "nbd-server-start" => {
                let o = options::nbd_server_from_map(args, true).map_err(QmpError::generic)?;
                self.start(&o).await.map_err(QmpError::generic)?;
            }
            "nbd-server-stop" => {
                qmp::no_args(&args)?;
                for id in self.stop().await.map_err(QmpError::generic)? {
                    qmp.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
                }
            }
            "block-export-add" => {
                let e = options::export_from_map(args).map_err(QmpError::generic)?;
                self.add_export(&e).await.map_err(QmpError::generic)?;
            }
            "block-export-del" => {
                let id = qmp::take_string(&mut args, "id")?
                    .ok_or_else(|| QmpError::generic("Parameter 'id' is missing"))?;
                let mode = match qmp::take_string(&mut args, "mode")?.as_deref() {
                    None | Some("safe") => RemoveMode::Safe,
                    Some("hard") => RemoveMode::Hard,
                    Some(other) => {
                        return Err(QmpError::generic(format!(
                            "Parameter 'mode' does not accept value '{other}'"
                        )))
                    }
                };
                qmp::no_args(&args)?;
                let server = self.server.lock().await.clone();
                let Some(s) = server else {
                    return Err(QmpError::generic(format!("Export '{id}' is not found")));
                };
                s.remove_export(&id, mode).await?;
                qmp.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
            }
            "query-block-exports" => {
                qmp::no_args(&args)?;
                let server = self.server.lock().await.clone();
                let list: Vec<Value> = server
                    .map(|s| s.exports())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| {
                        json!({"type": "nbd", "id": e.id, "node-name": e.node_name,
                               "shutting-down": false})
                    })
                    .collect();
                return Ok(Value::Array(list));
            }
            _ => {
                return Err(QmpError::command_not_found(format!(
                    "The command {name} has not been found"
                )))
            }
        }
        Ok(json!({}))
    }
}

impl qmp::Extension for NbdCommands {
    fn commands(&self) -> Vec<&'static str> {
        vec![
            "nbd-server-start",
            "nbd-server-stop",
            "block-export-add",
            "block-export-del",
            "query-block-exports",
        ]
    }

    fn execute<'a>(
        &'a self,
        qmp: &'a Qmp,
        name: &'a str,
        args: Map<String, Value>,
    ) -> BoxFuture<'a, Result<Value, QmpError>> {
        Box::pin(self.qmp(qmp, name, args))
    }
}

async fn serve(
    opts: Vec<Located>,
    default_dir: Option<PathBuf>,
    ready: Option<daemonize::Ready>,
) -> Result<ExitCode, String> {
    let graph = Graph::new();
    let nbd = Arc::new(NbdCommands {
        graph: graph.clone(),
        server: tokio::sync::Mutex::new(None),
    });
    let jobs = JobCommands::new(graph.clone());
    let qmp = Qmp::new(
        graph.clone(),
        vec![
            nbd.clone() as Arc<dyn qmp::Extension>,
            jobs.clone() as Arc<dyn qmp::Extension>,
            ObjectCommands::new() as Arc<dyn qmp::Extension>,
            ReopenCommands::new() as Arc<dyn qmp::Extension>,
        ],
    );
    let _events = jobs.forward_events(&qmp);
    let mut monitors: Vec<MonitorListener> = Vec::new();
    let mut pidfile: Option<PathBuf> = None;
    let res = setup(&graph, &opts, &nbd, &qmp, &mut monitors, &mut pidfile).await;
    if let Err(e) = res {
        shutdown(&nbd, monitors).await;
        return Err(e);
    }
    // The pid file is written once everything is up: its presence means
    // the daemon is ready.
    let _pid_guard = match pidfile {
        Some(p) => {
            if let Err(e) = std::fs::write(&p, format!("{}\n", std::process::id())) {
                shutdown(&nbd, monitors).await;
                return Err(format!("cannot create PID file: {e}"));
            }
            Some(PidFile(p))
        }
        None => None,
    };
    if let Some(r) = ready {
        if let Err(e) = r.done() {
            shutdown(&nbd, monitors).await;
            return Err(e);
        }
    }
    if let Some(dir) = &default_dir {
        print_default_banner(dir);
    }
    let waiter = sluice_exports::signals::termination_waiter()
        .map_err(|e| format!("cannot wait for signals: {e}"))?;
    tokio::select! {
        sig = waiter => tracing::info!("sluice daemon: signal {}, shutting down", sig.unwrap_or(15)),
        _ = qmp.wait_quit() => tracing::info!("sluice daemon: quit, shutting down"),
    }
    if default_dir.is_some() {
        eprintln!("sluice daemon: shutting down");
    }
    // As qemu-storage-daemon does: exports close, then running jobs are
    // cancelled (their filters leave the graph, concluded jobs are
    // dismissed) while the monitors can still report it, then the
    // monitors close and the nodes are flushed.
    let _ = nbd.stop().await;
    jobs.cancel_all(&qmp).await;
    shutdown(&nbd, monitors).await;
    // Nodes go with the graph; flush them first so that file nodes are
    // durable on a clean exit.
    for node in graph.nodes() {
        if let Err(e) = node.flush().await {
            eprintln!("sluice: flushing '{}' failed: {e}", node.name());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown(nbd: &NbdCommands, monitors: Vec<MonitorListener>) {
    for m in monitors {
        m.close().await;
    }
    let _ = nbd.stop().await;
}

async fn setup(
    graph: &Graph,
    opts: &[Located],
    nbd: &NbdCommands,
    qmp: &Qmp,
    monitors: &mut Vec<MonitorListener>,
    pidfile: &mut Option<PathBuf>,
) -> Result<(), String> {
    let mut chardevs: HashMap<String, PathBuf> = HashMap::new();
    for Located { opt, text } in opts {
        let fail = |e: String| format!("{text}: {e}");
        match opt {
            DaemonOpt::Blockdev(v) => {
                let w = graph.writer().await;
                blockdev_add(&w, v.clone())
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            }
            DaemonOpt::NbdServer(o) => nbd.start(o).await.map_err(fail)?,
            DaemonOpt::Export(e) => nbd.add_export(e).await.map_err(fail)?,
            DaemonOpt::Pidfile(p) => *pidfile = Some(p.clone()),
            DaemonOpt::Object(args) => {
                objects::object_add(args.clone(), true).map_err(|e| fail(e.desc))?
            }
            DaemonOpt::Daemonize => {}
            DaemonOpt::Chardev { id, path } => {
                if chardevs.contains_key(id) {
                    return Err(fail(format!("Duplicate chardev id '{id}'")));
                }
                chardevs.insert(id.clone(), path.clone());
            }
            DaemonOpt::Monitor { chardev } => {
                let Some(path) = chardevs.get(chardev) else {
                    return Err(fail(format!("chardev \"{chardev}\" not found")));
                };
                let m = MonitorListener::bind(qmp.clone(), path).map_err(|e| {
                    fail(format!(
                        "Failed to bind socket to {}: {}",
                        path.display(),
                        sluice_core::error::os_text(&e)
                    ))
                })?;
                monitors.push(m);
            }
        }
    }
    Ok(())
}
