//! QMP `blockdev-reopen`: `{"options": [BlockdevOptions, ...]}` changes
//! existing nodes, all entries as one or none at all, with QEMU's checks
//! and messages for what sluice can change: `read-only` (left out, it
//! takes its default, false) and `backing` (another node or `null`).
//!
//! Each entry names a node by `node-name` and repeats its `driver`; a
//! child reference (`file`, `image`) must name the node's current child;
//! other options sluice cannot change are refused ("Cannot change the
//! option ..."), unknown ones as QAPI refuses them. Read-only switches go
//! through `GraphWriter::reopen_read_only`, backing changes through one
//! transaction; if anything fails, what was switched is switched back.

use crate::qmp::{BoxFuture, Extension, Qmp, QmpError};
use serde_json::{json, Map, Value};
use sluice_core::{Error, Graph, Node, Role};
use std::sync::Arc;

/// `blockdev-reopen`.
pub struct ReopenCommands;

impl ReopenCommands {
    pub fn new() -> Arc<ReopenCommands> {
        Arc::new(ReopenCommands)
    }
}

impl Extension for ReopenCommands {
    fn commands(&self) -> Vec<&'static str> {
        vec!["blockdev-reopen"]
    }

    fn execute<'a>(
        &'a self,
        qmp: &'a Qmp,
        _name: &'a str,
        args: Map<String, Value>,
    ) -> BoxFuture<'a, Result<Value, QmpError>> {
        Box::pin(blockdev_reopen(qmp.graph(), args))
    }
}

/// Options every driver takes that a reopen accepts as they are: sluice
/// ignores them at open too.
const IGNORED_COMMON: &[&str] = &["discard", "detect-zeroes", "auto-read-only"];

/// Per driver (QAPI's `BlockdevOptions` members sluice knows): the child
/// references, the options required by the schema, and the other
/// options, which a reopen may not change.
struct DriverSchema {
    children: &'static [&'static str],
    required: &'static [&'static str],
    fixed: &'static [&'static str],
    backing: bool,
}

fn schema(driver: &str) -> Option<DriverSchema> {
    let s = |children, required, fixed, backing| DriverSchema {
        children,
        required,
        fixed,
        backing,
    };
    Some(match driver {
        "file" => s(
            &[],
            &["filename"],
            &[
                "filename",
                "pr-manager",
                "locking",
                "aio",
                "aio-max-batch",
                "drop-cache",
                "x-check-cache-dropped",
            ],
            false,
        ),
        "qcow2" => s(
            &["file", "data-file"],
            &["file"],
            &[
                "lazy-refcounts",
                "pass-discard-request",
                "pass-discard-snapshot",
                "pass-discard-other",
                "discard-no-unref",
                "overlap-check",
                "cache-size",
                "l2-cache-size",
                "l2-cache-entry-size",
                "refcount-cache-size",
                "cache-clean-interval",
                "encrypt",
                "data-file-raw",
            ],
            true,
        ),
        "raw" => s(&["file"], &["file"], &["offset", "size"], false),
        "blkdebug" => s(
            &["image"],
            &["image"],
            &[
                "config",
                "align",
                "max-transfer",
                "opt-write-zero",
                "max-write-zero",
                "opt-discard",
                "max-discard",
                "inject-error",
                "set-state",
                "take-child-perms",
                "unshare-child-perms",
            ],
            false,
        ),
        "copy-on-read" => s(&["file"], &["file"], &["bottom"], false),
        "throttle" => s(
            &["file"],
            &["file", "throttle-group"],
            &["throttle-group", "limits"],
            false,
        ),
        "null-co" | "null-aio" => s(&[], &[], &["size", "latency-ns", "read-zeroes"], false),
        "memory" => s(&[], &["size"], &["size"], true),
        "nbd" => s(
            &[],
            &["server"],
            &[
                "server",
                "export",
                "tls-creds",
                "tls-hostname",
                "x-dirty-bitmap",
                "reconnect-delay",
                "open-timeout",
            ],
            false,
        ),
        _ => return None,
    })
}

/// What one entry asks for, checked against the graph.
struct Entry {
    node: Arc<Node>,
    read_only: bool,
    /// `None`: leave the backing link; `Some(None)`: remove it.
    backing: Option<Option<Arc<Node>>>,
}

/// An entry as QAPI sees it: well-typed, with only known members.
struct Parsed {
    driver: String,
    node_name: Option<String>,
    read_only: bool,
    backing: Option<Value>,
    children: Vec<(&'static str, Value)>,
    rest: Map<String, Value>,
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

fn type_error(what: &str, expected: &str) -> QmpError {
    generic(format!(
        "Invalid parameter type for '{what}', expected: {expected}"
    ))
}

/// The QAPI visit of `options[i]`: the discriminator, the common members,
/// the driver's members, then anything left over.
fn parse_entry(i: usize, v: Value) -> Result<Parsed, QmpError> {
    let at = |k: &str| format!("options[{i}].{k}");
    let Value::Object(mut m) = v else {
        return Err(type_error(&format!("options[{i}]"), "object"));
    };
    let driver = match m.remove("driver") {
        None => return Err(generic(format!("Parameter '{}' is missing", at("driver")))),
        Some(Value::String(d)) => d,
        Some(_) => return Err(type_error(&at("driver"), "string")),
    };
    let Some(sch) = schema(&driver) else {
        return Err(generic(format!(
            "Parameter 'driver' does not accept value '{driver}'"
        )));
    };
    let node_name = match m.remove("node-name") {
        None => None,
        Some(Value::String(n)) => Some(n),
        Some(_) => return Err(type_error(&at("node-name"), "string")),
    };
    let bool_member = |m: &mut Map<String, Value>, k: &str| match m.remove(k) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(type_error(&at(k), "boolean")),
    };
    let read_only = bool_member(&mut m, "read-only")?.unwrap_or(false);
    if bool_member(&mut m, "force-share")?.unwrap_or(false) {
        return Err(generic("Cannot change the option 'force-share'"));
    }
    bool_member(&mut m, "auto-read-only")?;
    if let Some(c) = m.remove("cache") {
        let Value::Object(mut c) = c else {
            return Err(type_error(&at("cache"), "object"));
        };
        for k in ["direct", "no-flush"] {
            match c.remove(k) {
                None | Some(Value::Bool(false)) => {}
                Some(Value::Bool(true)) => {
                    return Err(generic(format!("Cannot change the option 'cache.{k}'")))
                }
                Some(_) => return Err(type_error(&at(&format!("cache.{k}")), "boolean")),
            }
        }
        if let Some(k) = c.keys().next() {
            return Err(generic(format!(
                "Parameter '{}' is unexpected",
                at(&format!("cache.{k}"))
            )));
        }
    }
    for k in IGNORED_COMMON {
        if let Some(v) = m.remove(*k) {
            if !v.is_string() && !v.is_boolean() {
                return Err(type_error(&at(k), "string"));
            }
        }
    }
    let mut children = Vec::new();
    for k in sch.children {
        match m.remove(*k) {
            None if sch.required.contains(k) => {
                return Err(generic(format!("Parameter '{}' is missing", at(k))))
            }
            None => {}
            Some(v @ (Value::String(_) | Value::Object(_))) => children.push((*k, v)),
            Some(_) => return Err(type_error(k, "BlockdevRef")),
        }
    }
    for k in sch.required {
        if !sch.children.contains(k) && !m.contains_key(*k) {
            return Err(generic(format!("Parameter '{}' is missing", at(k))));
        }
    }
    let backing = if sch.backing {
        match m.remove("backing") {
            None => None,
            Some(v @ (Value::String(_) | Value::Object(_) | Value::Null)) => Some(v),
            Some(_) => return Err(type_error("backing", "BlockdevRefOrNull")),
        }
    } else {
        None
    };
    let mut rest = Map::new();
    for k in sch.fixed {
        if let Some(v) = m.remove(*k) {
            rest.insert(k.to_string(), v);
        }
    }
    if let Some(k) = m.keys().next() {
        return Err(generic(format!("Parameter '{}' is unexpected", at(k))));
    }
    Ok(Parsed {
        driver,
        node_name,
        read_only,
        backing,
        children,
        rest,
    })
}

/// A reference to another node, as QEMU resolves it.
fn lookup(graph: &Graph, name: &str) -> Result<Arc<Node>, QmpError> {
    graph
        .node(name)
        .map_err(|_| generic(format!("Cannot find device='' nor node-name='{name}'")))
}

/// The checks of QEMU's `bdrv_reopen_prepare` for one entry.
fn check_entry(graph: &Graph, node: &Arc<Node>, p: Parsed) -> Result<Entry, QmpError> {
    let name = node.name();
    if node.driver().supports_backing()
        && p.backing.is_none()
        && node.child(Role::Backing).is_some()
    {
        return Err(generic(format!("backing is missing for '{name}'")));
    }
    if p.driver != node.driver_name() {
        return Err(generic("Cannot change the option 'driver'"));
    }
    for (key, v) in &p.children {
        let role = match *key {
            "data-file" => Role::Data,
            _ => Role::File,
        };
        let Value::String(child) = v else {
            return Err(generic(format!(
                "Cannot change the option '{key}': give the node-name of the current child"
            )));
        };
        let child = lookup(graph, child)?;
        match node.child(role) {
            Some(cur) if Arc::ptr_eq(&cur, &child) => {}
            _ => return Err(generic(format!("Cannot change the option '{key}'"))),
        }
    }
    for (key, v) in &p.rest {
        let unchanged = match key.as_str() {
            "filename" => node.driver().filename().as_deref() == v.as_str(),
            "size" => v.as_u64() == Some(node.size()),
            "drop-cache" | "x-check-cache-dropped" => true,
            _ => false,
        };
        if !unchanged {
            return Err(generic(format!("Cannot change the option '{key}'")));
        }
    }
    let backing = match p.backing {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(b)) => {
            let b = lookup(graph, &b)?;
            if creates_cycle(node, &b) {
                return Err(generic(format!(
                    "Making '{}' a backing child of '{name}' would create a cycle",
                    b.name()
                )));
            }
            Some(Some(b))
        }
        Some(_) => {
            return Err(generic(
                "Cannot change the option 'backing': give a node-name or null",
            ))
        }
    };
    Ok(Entry {
        node: node.clone(),
        read_only: p.read_only,
        backing,
    })
}

/// Whether `node` is `child` or lies below it.
fn creates_cycle(node: &Arc<Node>, child: &Arc<Node>) -> bool {
    let mut stack = vec![child.clone()];
    let mut seen = 0;
    while let Some(n) = stack.pop() {
        if Arc::ptr_eq(&n, node) {
            return true;
        }
        seen += 1;
        if seen > 4096 {
            return true;
        }
        stack.extend(n.children().iter().map(|e| e.child().clone()));
    }
    false
}

/// A failed read-only switch, in QEMU's words: a node being made
/// read-only that a writer still needs, or a writer over a node that stays
/// read-only.
fn reopen_error(e: Error, targets: &[(Arc<Node>, bool)]) -> QmpError {
    match e {
        Error::ReadOnly { node, .. } if targets.iter().any(|(n, ro)| *ro && n.name() == node) => {
            generic(format!(
                "Read-only block node '{node}' cannot support read-write users"
            ))
        }
        Error::ReadOnly { .. } => generic("Block node is read-only"),
        other => other.into(),
    }
}

async fn blockdev_reopen(graph: &Graph, mut args: Map<String, Value>) -> Result<Value, QmpError> {
    let options = match args.remove("options") {
        None => return Err(generic("Parameter 'options' is missing")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(type_error("options", "array")),
    };
    if let Some(k) = args.keys().next() {
        return Err(generic(format!("Parameter '{k}' is unexpected")));
    }
    let parsed = options
        .into_iter()
        .enumerate()
        .map(|(i, v)| parse_entry(i, v))
        .collect::<Result<Vec<_>, _>>()?;
    let w = graph.writer().await;
    let mut nodes = Vec::new();
    for p in &parsed {
        let name = p
            .node_name
            .as_deref()
            .ok_or_else(|| generic("node-name not specified"))?;
        let node = graph
            .node(name)
            .map_err(|_| generic(format!("Failed to find node with node-name='{name}'")))?;
        nodes.push(node);
    }
    let entries = nodes
        .iter()
        .zip(parsed)
        .map(|(n, p)| check_entry(graph, n, p))
        .collect::<Result<Vec<_>, _>>()?;
    let drained = w.drain_all().await;
    // The read-only switches as one step, undone if the backing changes
    // fail.
    let targets: Vec<(Arc<Node>, bool)> = entries
        .iter()
        .map(|e| (e.node.clone(), e.read_only))
        .collect();
    let before: Vec<(Arc<Node>, bool)> = entries
        .iter()
        .map(|e| (e.node.clone(), e.node.is_read_only()))
        .collect();
    w.reopen_nodes(&drained, targets.clone())
        .await
        .map_err(|e| reopen_error(e, &targets))?;
    let mut tx = w.transaction();
    let staged = entries.iter().try_for_each(|e| match &e.backing {
        Some(b) => tx.set_backing(&drained, &e.node, b.as_ref()),
        None => Ok(()),
    });
    let result = match staged {
        Ok(()) => tx.commit().await.map_err(QmpError::from),
        Err(err) => Err(err.into()),
    };
    if result.is_err() {
        if let Err(e) = w.reopen_nodes(&drained, before).await {
            tracing::warn!("could not switch back after a failed blockdev-reopen: {e}");
        }
    }
    result.map(|()| json!({}))
}
