//! qemu-storage-daemon's command line: options in the order given, each
//! value in QEMU's key=value syntax (or JSON for `--blockdev {...}`).

use serde_json::{Map, Value};
use sluice_control::keyval;
use sluice_exports::{ExportConfig, ListenAddr};
use std::path::PathBuf;

/// One command-line option, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum DaemonOpt {
    Blockdev(Value),
    NbdServer(NbdServerOpts),
    Export(ExportOpts),
    Pidfile(PathBuf),
    /// `--chardev socket,id=ID,path=PATH,server=on[,wait=off]`.
    Chardev {
        id: String,
        path: PathBuf,
    },
    /// `--monitor [chardev=]ID[,mode=control][,pretty=on|off]`.
    Monitor {
        chardev: String,
    },
    /// `--object [qom-type=]TYPE,id=ID,...`: `object-add`'s arguments, as text.
    Object(Map<String, Value>),
    /// `--daemonize`: fork once the options are read, detach, and let the
    /// parent exit when the daemon is set up.
    Daemonize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NbdServerOpts {
    pub addr: ListenAddr,
    pub max_connections: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExportOpts {
    pub node_name: String,
    pub config: ExportConfig,
}

/// An option with the text it came from, for error messages
/// (`--export type=nbd,...: NBD server not running`).
#[derive(Clone, Debug)]
pub struct Located {
    pub opt: DaemonOpt,
    pub text: String,
}

pub const USAGE: &str = "\
Usage: sluice daemon [options]
sluice daemon: qemu-storage-daemon work-alike

  -h, --help                display this help and exit
  --blockdev [driver=]<driver>[,node-name=<N>][,<prop>=<value>,...]
  --blockdev '{\"driver\": ..., ...}'
                            configure a block backend
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,description=<descr>][,writable=on|off][,allocation-depth=on|off]
           [,multi-conn=on|off|auto]
                            export the specified block node over NBD
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
                            start an NBD server for exporting block nodes
  --chardev socket,id=<id>,path=<path>,server=on[,wait=off]
                            a Unix socket for a monitor
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                            serve QMP on the chardev <id>
  --object throttle-group,id=<id>[,limits.<limit>=<value>,...]
                            create a throttle group for driver=throttle nodes
                            (limits: bps-total, iops-read-max, iops-size, ...)
  --pidfile <path>          write process ID to a file after startup
  --daemonize               daemonize the process, and have the parent exit
                            once startup is complete

With no options, serves a 64 MiB RAM disk over NBD on a Unix socket and a
QMP monitor on another, in a temporary directory, and prints how to connect.
";

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed {
    Help,
    Run(Vec<Located>),
}

/// Splits `args` into options in order; values are parsed as they come.
pub fn parse_args(args: &[String]) -> Result<Parsed, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        let Some(stripped) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(format!("Unexpected argument: {arg}"));
        };
        let (name, inline) = match stripped.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (stripped, None),
        };
        if name == "daemonize" {
            if inline.is_some() {
                return Err("option '--daemonize' doesn't allow an argument".into());
            }
            out.push(Located {
                opt: DaemonOpt::Daemonize,
                text: "--daemonize".into(),
            });
            continue;
        }
        let known = [
            "blockdev",
            "nbd-server",
            "export",
            "pidfile",
            "chardev",
            "monitor",
            "object",
        ];
        if !known.contains(&name) {
            return Err(format!("unrecognized option '{arg}'"));
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let Some(v) = args.get(i) else {
                    return Err(format!("option '--{name}' requires an argument"));
                };
                i += 1;
                v.clone()
            }
        };
        let text = format!("--{name} {value}");
        let opt = parse_option(name, &value).map_err(|e| format!("{text}: {e}"))?;
        out.push(Located { opt, text });
    }
    Ok(Parsed::Run(out))
}

fn parse_option(name: &str, value: &str) -> Result<DaemonOpt, String> {
    match name {
        "blockdev" => {
            let v = if value.trim_start().starts_with('{') {
                serde_json::from_str::<Value>(value)
                    .map_err(|e| format!("JSON parse error, {e}"))?
            } else {
                keyval::parse(value, Some("driver")).map_err(|e| e.to_string())?
            };
            if !v.is_object() {
                return Err("Invalid parameter type, expected: object".into());
            }
            Ok(DaemonOpt::Blockdev(v))
        }
        "nbd-server" => parse_nbd_server(value).map(DaemonOpt::NbdServer),
        "export" => {
            let v = keyval::parse(value, Some("type")).map_err(|e| e.to_string())?;
            match v {
                Value::Object(map) => export_from_map(map).map(DaemonOpt::Export),
                _ => Err("Invalid parameter type, expected: object".into()),
            }
        }
        "pidfile" => Ok(DaemonOpt::Pidfile(PathBuf::from(value))),
        "chardev" => parse_chardev(value),
        "monitor" => parse_monitor(value),
        "object" => match keyval::parse(value, Some("qom-type")).map_err(|e| e.to_string())? {
            Value::Object(map) => Ok(DaemonOpt::Object(map)),
            _ => Err("Invalid parameter type, expected: object".into()),
        },
        _ => Err(format!("unrecognized option '--{name}'")),
    }
}

fn take_str(
    map: &mut Map<String, Value>,
    key: &str,
    prefix: &str,
) -> Result<Option<String>, String> {
    match map.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!(
            "Invalid parameter type for '{prefix}{key}', expected: string"
        )),
    }
}

fn require(v: Option<String>, key: &str) -> Result<String, String> {
    v.ok_or_else(|| format!("Parameter '{key}' is missing"))
}

/// A boolean given as JSON (QMP) or as on/off text (command line).
fn take_bool(map: &mut Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match map.remove(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) => match s.as_str() {
            "on" | "yes" | "true" | "y" => Ok(Some(true)),
            "off" | "no" | "false" | "n" => Ok(Some(false)),
            _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
        },
        Some(_) => Err(format!(
            "Invalid parameter type for '{key}', expected: boolean"
        )),
    }
}

fn no_leftovers(map: &Map<String, Value>, prefix: &str) -> Result<(), String> {
    match map.keys().next() {
        Some(k) => Err(format!("Parameter '{prefix}{k}' is unexpected")),
        None => Ok(()),
    }
}

fn parse_nbd_server(value: &str) -> Result<NbdServerOpts, String> {
    let v = keyval::parse(value, None).map_err(|e| e.to_string())?;
    let Value::Object(map) = v else {
        return Err("Invalid parameter type, expected: object".into());
    };
    nbd_server_from_map(map, false)
}

/// `--nbd-server` options (flat `addr`) or `nbd-server-start` arguments
/// (`legacy`: QMP's `{"type", "data"}` address).
pub fn nbd_server_from_map(
    mut map: Map<String, Value>,
    legacy: bool,
) -> Result<NbdServerOpts, String> {
    let addr = match map.remove("addr") {
        Some(Value::Object(a)) if legacy => legacy_addr(Value::Object(a))?,
        Some(Value::Object(a)) => socket_addr(a, "addr.")?,
        Some(_) => return Err("Invalid parameter type for 'addr', expected: object".into()),
        None => return Err("Parameter 'addr' is missing".into()),
    };
    let max_connections = match map.remove("max-connections") {
        None => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| "Parameter 'max-connections' expects uint32_t".to_string())?,
        Some(Value::String(s)) => s
            .parse::<u32>()
            .map_err(|_| "Parameter 'max-connections' expects uint32_t".to_string())?,
        Some(_) => {
            return Err("Invalid parameter type for 'max-connections', expected: integer".into())
        }
    };
    if let Some(tls) = take_str(&mut map, "tls-creds", "")? {
        return Err(format!(
            "TLS is not supported by sluice's NBD server (tls-creds={tls})"
        ));
    }
    map.remove("tls-authz");
    no_leftovers(&map, "")?;
    Ok(NbdServerOpts {
        addr,
        max_connections,
    })
}

/// `--export` options or `block-export-add` arguments.
pub fn export_from_map(mut map: Map<String, Value>) -> Result<ExportOpts, String> {
    let ty = require(take_str(&mut map, "type", "")?, "type")?;
    if ty != "nbd" {
        return Err(format!("Parameter 'type' does not accept value '{ty}'"));
    }
    let id = require(take_str(&mut map, "id", "")?, "id")?;
    let node_name = require(take_str(&mut map, "node-name", "")?, "node-name")?;
    let name = take_str(&mut map, "name", "")?.unwrap_or_else(|| node_name.clone());
    let description = take_str(&mut map, "description", "")?;
    let writable = take_bool(&mut map, "writable")?.unwrap_or(false);
    let allocation_depth = take_bool(&mut map, "allocation-depth")?.unwrap_or(false);
    let _writethrough = take_bool(&mut map, "writethrough")?;
    let _fixed_iothread = take_bool(&mut map, "fixed-iothread")?;
    let multi_conn = match take_str(&mut map, "multi-conn", "")?.as_deref() {
        // sluice keeps no per-connection cache, so auto means on.
        None | Some("auto") | Some("on") => true,
        Some("off") => false,
        Some(other) => {
            return Err(format!(
                "Parameter 'multi-conn' does not accept value '{other}'"
            ))
        }
    };
    // Accepted, as QEMU does, and without effect in sluice.
    map.remove("iothread");
    no_leftovers(&map, "")?;
    if name.len() > 4096 {
        return Err(format!("export name '{name}' too long"));
    }
    Ok(ExportOpts {
        node_name,
        config: ExportConfig {
            id,
            name,
            description,
            writable,
            allocation_depth,
            multi_conn,
        },
    })
}

/// `nbd-server-start`'s `addr`: QMP's legacy socket address
/// (`{"type": "unix", "data": {"path": ...}}`).
pub fn legacy_addr(v: Value) -> Result<ListenAddr, String> {
    let Value::Object(mut addr) = v else {
        return Err("Invalid parameter type for 'addr', expected: object".into());
    };
    let ty = require(take_str(&mut addr, "type", "addr.")?, "addr.type")?;
    let data = match addr.remove("data") {
        Some(Value::Object(d)) => d,
        Some(_) => return Err("Invalid parameter type for 'addr.data', expected: object".into()),
        None => return Err("Parameter 'addr.data' is missing".into()),
    };
    no_leftovers(&addr, "addr.")?;
    let mut flat = data;
    flat.insert("type".into(), Value::String(ty));
    socket_addr(flat, "addr.data.")
}

/// A flat socket address (`--nbd-server addr.*`), type included.
fn socket_addr(mut addr: Map<String, Value>, prefix: &str) -> Result<ListenAddr, String> {
    let ty = require(take_str(&mut addr, "type", prefix)?, "addr.type")?;
    let key = |k: &str| format!("{prefix}{k}");
    let listen = match ty.as_str() {
        "unix" => {
            let path = require(take_str(&mut addr, "path", prefix)?, &key("path"))?;
            // QEMU's unix addresses also take these; sluice has no use for them.
            for k in ["abstract", "tight"] {
                addr.remove(k);
            }
            ListenAddr::Unix(PathBuf::from(path))
        }
        "inet" => {
            let host = require(take_str(&mut addr, "host", prefix)?, &key("host"))?;
            let port = require(take_str(&mut addr, "port", prefix)?, &key("port"))?;
            let port: u16 = port.parse().map_err(|_| {
                format!(
                    "Parameter '{}' expects a port number, got '{port}'",
                    key("port")
                )
            })?;
            for k in ["numeric", "ipv4", "ipv6", "to", "keep-alive"] {
                addr.remove(k);
            }
            ListenAddr::Inet { host, port }
        }
        other => return Err(format!("Parameter 'type' does not accept value '{other}'")),
    };
    no_leftovers(&addr, prefix)?;
    Ok(listen)
}

fn parse_chardev(value: &str) -> Result<DaemonOpt, String> {
    let v = keyval::parse(value, Some("backend")).map_err(|e| e.to_string())?;
    let Value::Object(mut map) = v else {
        return Err("Invalid parameter type, expected: object".into());
    };
    let backend = require(take_str(&mut map, "backend", "")?, "backend")?;
    if backend != "socket" {
        return Err(format!(
            "chardev backend '{backend}' is not supported by sluice (only 'socket')"
        ));
    }
    let id = require(take_str(&mut map, "id", "")?, "id")?;
    let Some(path) = take_str(&mut map, "path", "")? else {
        return Err("sluice supports only Unix socket chardevs: path=... is required".into());
    };
    if take_bool(&mut map, "server")? != Some(true) {
        return Err("sluice supports only server=on socket chardevs".into());
    }
    // wait=on would hold start-up until a client connects; sluice serves
    // monitors from the start either way.
    let _ = take_bool(&mut map, "wait")?;
    no_leftovers(&map, "")?;
    Ok(DaemonOpt::Chardev {
        id,
        path: PathBuf::from(path),
    })
}

fn parse_monitor(value: &str) -> Result<DaemonOpt, String> {
    let v = keyval::parse(value, Some("chardev")).map_err(|e| e.to_string())?;
    let Value::Object(mut map) = v else {
        return Err("Invalid parameter type, expected: object".into());
    };
    let chardev = require(take_str(&mut map, "chardev", "")?, "chardev")?;
    match take_str(&mut map, "mode", "")?.as_deref() {
        None | Some("control") => {}
        Some(_) => return Err("Only QMP is supported".into()),
    }
    let _ = take_bool(&mut map, "pretty")?;
    map.remove("id");
    no_leftovers(&map, "")?;
    Ok(DaemonOpt::Monitor { chardev })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn run(a: &[&str]) -> Result<Vec<DaemonOpt>, String> {
        match parse_args(&args(a))? {
            Parsed::Run(v) => Ok(v.into_iter().map(|l| l.opt).collect()),
            Parsed::Help => Err("help".into()),
        }
    }

    #[test]
    fn parses_the_qemu_storage_daemon_options_in_order() {
        let opts = run(&[
            "--blockdev",
            "driver=memory,node-name=m,size=1048576",
            "--blockdev={\"driver\":\"null-co\",\"node-name\":\"n\"}",
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=4",
            "--export",
            "type=nbd,id=e,node-name=m,writable=on",
            "--pidfile",
            "/tmp/p",
        ])
        .unwrap();
        assert_eq!(opts.len(), 5);
        assert!(matches!(&opts[0], DaemonOpt::Blockdev(v) if v["size"] == "1048576"));
        assert!(matches!(&opts[1], DaemonOpt::Blockdev(v) if v["driver"] == "null-co"));
        assert_eq!(
            opts[2],
            DaemonOpt::NbdServer(NbdServerOpts {
                addr: ListenAddr::Inet {
                    host: "127.0.0.1".into(),
                    port: 10809
                },
                max_connections: 4
            })
        );
        match &opts[3] {
            DaemonOpt::Export(e) => {
                assert_eq!(e.node_name, "m");
                assert_eq!(e.config.name, "m");
                assert!(e.config.writable);
                assert!(!e.config.allocation_depth);
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn errors_use_qemus_wording() {
        let e = |a: &[&str]| run(a).unwrap_err();
        assert_eq!(e(&["--bogus"]), "unrecognized option '--bogus'");
        assert_eq!(
            e(&["--nbd-server", "addr.type=unix"]),
            "--nbd-server addr.type=unix: Parameter 'addr.path' is missing"
        );
        assert_eq!(
            e(&["--nbd-server", "addr.type=foo"]),
            "--nbd-server addr.type=foo: Parameter 'type' does not accept value 'foo'"
        );
        assert_eq!(
            e(&["--export", "type=nbd,id=e"]),
            "--export type=nbd,id=e: Parameter 'node-name' is missing"
        );
        assert_eq!(
            e(&["--export", "type=vhost,id=e,node-name=n"]),
            "--export type=vhost,id=e,node-name=n: Parameter 'type' does not accept value 'vhost'"
        );
        assert_eq!(
            e(&["--export", "type=nbd,id=e,node-name=n,bogus=1"]),
            "--export type=nbd,id=e,node-name=n,bogus=1: Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            e(&["--blockdev"]),
            "option '--blockdev' requires an argument"
        );
    }
}
