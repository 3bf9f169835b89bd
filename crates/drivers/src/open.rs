//! Opening nodes from QEMU-style block options (`BlockdevOptions`): the one
//! options model behind `--blockdev`, `blockdev-add`, `--image-opts` and
//! `json:{...}` filenames.
//!
//! Children are given either as a node-name (a reference to an existing
//! node) or as nested options (a new implicit node, closed when its parent
//! lets go), as in QEMU.

use crate::filter::blkdebug::{BlkdebugDriver, BlkdebugOptions};
use crate::filter::copy_on_read::{CopyOnReadDriver, CorOptions};
use crate::filter::throttle::{ThrottleDriver, ThrottleMember, ThrottleOptions};
use crate::format::raw::{RawDriver, RawOptions};
use crate::lenient::Lenient;
use crate::protocol::file::{self, CacheMode, FileOptions};
use crate::protocol::memory::{self, MemoryDriver, MemoryOptions};
use crate::protocol::nbd::{self, NbdOptions};
use crate::protocol::null::{NullDriver, NullOptions, DEFAULT_SIZE};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sluice_core::{BlockDriver, Error, GraphWriter, Node, NodeName, NodeSpec, Result, Role};
use sluice_qcow2::detached::{ChildHolder, Detached};
use sluice_qcow2::{Qcow2Driver, Qcow2Options};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Drivers sluice can open, by QEMU name.
pub const DRIVERS: &[&str] = &[
    "blkdebug",
    "copy-on-read",
    "file",
    "memory",
    "nbd",
    "null-aio",
    "null-co",
    "qcow2",
    "raw",
    "throttle",
];

/// Options every node takes, whatever its driver.
#[derive(Clone, Debug, Default)]
pub struct CommonOptions {
    pub driver: String,
    pub node_name: Option<NodeName>,
    pub read_only: bool,
    pub cache: CacheMode,
}

fn take_bool(map: &mut Map<String, Value>, key: &str, driver: &str) -> Result<Option<bool>> {
    match map.remove(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) if s == "on" || s == "true" => Ok(Some(true)),
        Some(Value::String(s)) if s == "off" || s == "false" => Ok(Some(false)),
        Some(v) => Err(Error::invalid_option(
            driver,
            format!("Invalid parameter type for '{key}', expected: boolean, got {v}"),
        )),
    }
}

/// Splits the options every driver shares from the driver's own.
fn split_common(
    opts: Value,
    inherited: &CommonOptions,
) -> Result<(CommonOptions, Map<String, Value>)> {
    let Value::Object(mut map) = opts else {
        return Err(Error::Other(format!(
            "block options must be a JSON object, got {opts}"
        )));
    };
    let driver = match map.remove("driver") {
        Some(Value::String(d)) => d,
        Some(other) => {
            return Err(Error::Other(format!(
                "Invalid parameter type for 'driver', expected: string, got {other}"
            )))
        }
        None => return Err(Error::Other("Parameter 'driver' is missing".into())),
    };
    if !DRIVERS.contains(&driver.as_str()) {
        return Err(Error::Other(format!("Unknown driver '{driver}'")));
    }
    let node_name = match map.remove("node-name") {
        Some(Value::String(n)) => Some(NodeName::new(&n)?),
        Some(other) => {
            return Err(Error::invalid_option(
                &driver,
                format!("Invalid parameter type for 'node-name', expected: string, got {other}"),
            ))
        }
        None => None,
    };
    let read_only = take_bool(&mut map, "read-only", &driver)?.unwrap_or(inherited.read_only);
    let mut cache = inherited.cache;
    match map.remove("cache") {
        None => {}
        Some(Value::Object(mut c)) => {
            if let Some(d) = take_bool(&mut c, "direct", &driver)? {
                cache.direct = d;
            }
            if let Some(n) = take_bool(&mut c, "no-flush", &driver)? {
                cache.no_flush = n;
            }
            if let Some(k) = c.keys().next() {
                return Err(Error::invalid_option(
                    &driver,
                    format!("Invalid parameter 'cache.{k}'"),
                ));
            }
        }
        Some(other) => {
            return Err(Error::invalid_option(
                &driver,
                format!("Invalid parameter type for 'cache', expected: object, got {other}"),
            ))
        }
    }
    // Accepted for compatibility; sluice's behaviour matches their defaults.
    for key in ["discard", "detect-zeroes", "auto-read-only", "force-share"] {
        map.remove(key);
    }
    Ok((
        CommonOptions {
            driver,
            node_name,
            read_only,
            cache,
        },
        map,
    ))
}

fn driver_opts<T: DeserializeOwned>(driver: &str, map: Map<String, Value>) -> Result<T> {
    T::deserialize(Lenient(Value::Object(map)))
        .map_err(|e| Error::invalid_option(driver, e.to_string()))
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens a node the user names and owns (`blockdev-add`): it stays in the
/// graph until deleted.
pub async fn blockdev_add(w: &GraphWriter<'_>, opts: Value) -> Result<Arc<Node>> {
    open_node(w, opts, false, &CommonOptions::default()).await
}

/// Opens a node from options; `implicit` nodes go when their parent does.
pub fn open_node<'a>(
    w: &'a GraphWriter<'_>,
    opts: Value,
    implicit: bool,
    inherited: &'a CommonOptions,
) -> BoxFut<'a, Result<Arc<Node>>> {
    Box::pin(async move {
        let mut created = Vec::new();
        let res = open_node_inner(w, opts, implicit, inherited, &mut created).await;
        if res.is_err() {
            delete_created(w, created).await;
        }
        res
    })
}

/// Nested children opened for a node that then failed go again.
async fn delete_created(w: &GraphWriter<'_>, created: Vec<Arc<Node>>) {
    for node in created.into_iter().rev() {
        let drained = w.drain(&node).await;
        let _ = w.delete_node(&drained, &node).await;
    }
}

/// What a node's children inherit from it.
fn child_inherit(common: &CommonOptions) -> CommonOptions {
    CommonOptions {
        driver: String::new(),
        node_name: None,
        read_only: common.read_only,
        cache: common.cache,
    }
}

/// Opens a qcow2 image from options as [`open_with`] does (the same
/// options, children and messages), but hands its one qcow2 driver to
/// the caller, for a change of the image's whole metadata
/// ([`sluice_qcow2::detached`]): the image's node in the graph only holds
/// its children.
pub async fn open_qcow2_detached(
    w: &GraphWriter<'_>,
    opts: Value,
    cache: CacheMode,
    read_only: bool,
) -> Result<Detached> {
    let inherited = CommonOptions {
        read_only,
        cache,
        ..CommonOptions::default()
    };
    let mut created = Vec::new();
    let res = detached_inner(w, opts, &inherited, &mut created).await;
    if res.is_err() {
        delete_created(w, created).await;
    }
    res
}

async fn detached_inner(
    w: &GraphWriter<'_>,
    opts: Value,
    inherited: &CommonOptions,
    created: &mut Vec<Arc<Node>>,
) -> Result<Detached> {
    let (common, map) = split_common(opts, inherited)?;
    if common.driver != "qcow2" {
        return Err(Error::Other(format!(
            "a qcow2 image was expected, not '{}'",
            common.driver
        )));
    }
    let (driver, options, children) =
        qcow2_parts(w, map, &common, &child_inherit(&common), created).await?;
    let node = w
        .add_node(NodeSpec {
            name: common.node_name,
            driver: Box::new(ChildHolder),
            size: driver.size(),
            read_only: common.read_only,
            children,
            implicit: false,
        })
        .await?;
    Ok(Detached {
        driver,
        options,
        node,
    })
}

/// A qcow2 image's driver, its options and its children (file, data
/// file, backing chain), opened as its node is.
async fn qcow2_parts(
    w: &GraphWriter<'_>,
    map: Map<String, Value>,
    common: &CommonOptions,
    child_inherit: &CommonOptions,
    created: &mut Vec<Arc<Node>>,
) -> Result<(Qcow2Driver, Qcow2Options, Vec<(Role, Arc<Node>)>)> {
    let mut children = Vec::new();
    let o = Qcow2Options::parse(map)?;
    let f = child(w, &o.file, child_inherit, false, created).await?;
    let d = Qcow2Driver::open(&f, &o, common.read_only).await?;
    let image = d.filename();
    children.push((Role::File, f));
    let data_file = match (&o.data_file, d.header().has_data_file()) {
        (Some(_), false) => {
            return Err(Error::invalid_option(
                "qcow2",
                "'data-file' can only be set for images with an external data file",
            ))
        }
        (Some(v), true) => Some(v.clone()),
        (None, true) => match &d.header().data_file {
            Some(name) => {
                let path = sluice_qcow2::chain::backing_path(image.as_deref(), name)?;
                Some(serde_json::json!({"driver": "file", "filename": path}))
            }
            None => {
                return Err(Error::invalid_option(
                    "qcow2",
                    "Could not open data file: the image names no external data file and no 'data-file' was given",
                ))
            }
        },
        (None, false) => None,
    };
    if let Some(v) = data_file {
        children.push((
            Role::Data,
            child(w, &v, child_inherit, false, created).await?,
        ));
    }
    match &o.backing {
        Some(Value::Null) => {}
        Some(b) => children.push((
            Role::Backing,
            child(w, b, child_inherit, true, created).await?,
        )),
        None => {
            let links = sluice_qcow2::chain::resolve(image.as_deref(), d.header())?;
            if !links.is_empty() {
                let b = open_header_chain(w, &links, child_inherit).await?;
                created.push(b.clone());
                children.push((Role::Backing, b));
            }
        }
    }
    Ok((d, o, children))
}

async fn open_node_inner(
    w: &GraphWriter<'_>,
    opts: Value,
    implicit: bool,
    inherited: &CommonOptions,
    created: &mut Vec<Arc<Node>>,
) -> Result<Arc<Node>> {
    {
        let (common, map) = split_common(opts, inherited)?;
        let child_inherit = child_inherit(&common);
        let mut children: Vec<(Role, Arc<Node>)> = Vec::new();
        let (driver, size): (Box<dyn BlockDriver>, u64) = match common.driver.as_str() {
            "file" => {
                let o: FileOptions = driver_opts("file", map)?;
                let (d, size) = file::open(&o, common.cache, common.read_only).await?;
                (Box::new(d), size)
            }
            "memory" => {
                let o: MemoryOptions = driver_opts("memory", map)?;
                memory::validate(&o)?;
                if let Some(b) = &o.backing {
                    if !b.is_null() {
                        children.push((
                            Role::Backing,
                            child(w, b, &child_inherit, true, created).await?,
                        ));
                    }
                }
                (Box::new(MemoryDriver::new()), o.size)
            }
            "nbd" => {
                let o: NbdOptions = driver_opts("nbd", map)?;
                let (d, size) = nbd::open(&o, common.read_only).await?;
                (Box::new(d), size)
            }
            d @ ("null-co" | "null-aio") => {
                let o: NullOptions = driver_opts(d, map)?;
                (
                    Box::new(NullDriver::new(d == "null-aio", &o)),
                    o.size.unwrap_or(DEFAULT_SIZE),
                )
            }
            "raw" => {
                let o: RawOptions = driver_opts("raw", map)?;
                let f = child(w, &o.file, &child_inherit, false, created).await?;
                let (d, size) = RawDriver::open(&o, f.size())?;
                children.push((Role::File, f));
                (Box::new(d), size)
            }
            "qcow2" => {
                let (d, _, kids) = qcow2_parts(w, map, &common, &child_inherit, created).await?;
                children.extend(kids);
                let size = d.size();
                (Box::new(d), size)
            }
            "blkdebug" => {
                let o: BlkdebugOptions = driver_opts("blkdebug", map)?;
                let d = BlkdebugDriver::open(&o)?;
                let f = child(w, &o.image, &child_inherit, false, created).await?;
                let size = f.size();
                children.push((Role::File, f));
                (Box::new(d), size)
            }
            "copy-on-read" => {
                let o: CorOptions = driver_opts("copy-on-read", map)?;
                if let Some(b) = &o.bottom {
                    w.graph().node(b)?;
                }
                let f = child(w, &o.file, &child_inherit, false, created).await?;
                let size = f.size();
                children.push((Role::File, f));
                (Box::new(CopyOnReadDriver::new(o.bottom.clone())), size)
            }
            "throttle" => {
                let o: ThrottleOptions = driver_opts("throttle", map)?;
                let group = o.group_name()?;
                let f = child(w, &o.file, &child_inherit, false, created).await?;
                let member = ThrottleMember::join(group)?;
                let size = f.size();
                children.push((Role::File, f));
                (Box::new(ThrottleDriver::new(member)), size)
            }
            other => return Err(Error::Other(format!("Unknown driver '{other}'"))),
        };
        w.add_node(NodeSpec {
            name: common.node_name,
            driver,
            size,
            read_only: common.read_only,
            children,
            implicit,
        })
        .await
    }
}

/// Resolves a child given as a node-name or as nested options.
async fn child(
    w: &GraphWriter<'_>,
    v: &Value,
    inherited: &CommonOptions,
    backing: bool,
    created: &mut Vec<Arc<Node>>,
) -> Result<Arc<Node>> {
    match v {
        Value::String(name) => w.graph().node(name),
        Value::Object(_) => {
            // A backing file is opened read-only unless asked otherwise.
            let inherit = CommonOptions {
                read_only: inherited.read_only || backing,
                ..inherited.clone()
            };
            let node = open_node(w, v.clone(), true, &inherit).await?;
            created.push(node.clone());
            Ok(node)
        }
        other => Err(Error::Other(format!(
            "a child must be a node-name or an options object, got {other}"
        ))),
    }
}

/// Opens the backing chain an image header names, bottom up, as implicit
/// read-only nodes (QEMU's `bdrv_open_backing_file`); returns its top.
/// On failure, what was opened goes again.
async fn open_header_chain(
    w: &GraphWriter<'_>,
    links: &[sluice_qcow2::chain::ChainLink],
    inherited: &CommonOptions,
) -> Result<Arc<Node>> {
    let mut below: Option<Arc<Node>> = None;
    for link in links.iter().rev() {
        let mut opts = serde_json::json!({
            "driver": link.format,
            "file": {"driver": "file", "filename": link.filename},
        });
        if link.format == "qcow2" {
            opts["backing"] = match &below {
                Some(n) => Value::String(n.name().to_string()),
                None => Value::Null,
            };
        }
        let mut opened = Vec::new();
        match child(w, &opts, inherited, true, &mut opened).await {
            Ok(n) => below = Some(n),
            Err(e) => {
                // The node below is implicit: deleting the partial chain's
                // top closes it all.
                if let Some(n) = below {
                    let drained = w.drain(&n).await;
                    let _ = w.delete_node(&drained, &n).await;
                }
                return Err(e);
            }
        }
    }
    below.ok_or_else(|| Error::Other("empty backing chain".into()))
}

/// The magic number at the start of a qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Guesses an image file's format from its first bytes, as QEMU's probe
/// does. A file that is not a known format is raw; sluice never guesses a
/// raw file to be anything else.
pub fn probe_format(filename: &str) -> Result<&'static str> {
    use std::io::Read;
    let mut f = std::fs::File::open(filename).map_err(|e| Error::Open {
        file: filename.to_string(),
        source: e,
    })?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| Error::Open {
        file: filename.to_string(),
        source: e,
    })?;
    if n == 4 && &magic == QCOW2_MAGIC {
        return Ok("qcow2");
    }
    Ok("raw")
}

/// The options `qemu-img` builds for a plain filename: `format` (probed
/// when absent) over a `file` node.
///
/// An NBD URL (`nbd://host:port/export`, `nbd+unix:///export?socket=path`)
/// is an `nbd` node under the format, `raw` unless given: sluice does not
/// probe over the network.
pub fn image_options(filename: &str, format: Option<&str>) -> std::result::Result<Value, String> {
    if let Some(target) = nbd::parse_filename(filename) {
        let format = format.unwrap_or("raw");
        if !DRIVERS.contains(&format) {
            return Err(format!("Unknown driver '{format}'"));
        }
        return Ok(serde_json::json!({"driver": format, "file": target?.to_options()}));
    }
    let format = match format {
        Some(f) => f.to_string(),
        None => probe_format(filename)
            .map_err(|e| e.to_string())?
            .to_string(),
    };
    if !DRIVERS.contains(&format.as_str()) {
        return Err(format!("Unknown driver '{format}'"));
    }
    Ok(serde_json::json!({"driver": format, "file": {"driver": "file", "filename": filename}}))
}

/// Sets `key` on the protocol (`driver=file`) node of nested options.
pub fn set_protocol_option(opts: &mut Value, key: &str, value: &str) {
    let mut cur = opts;
    loop {
        let is_file = cur.get("driver").and_then(Value::as_str) == Some("file");
        if is_file {
            if let Some(map) = cur.as_object_mut() {
                map.insert(key.to_string(), Value::String(value.to_string()));
            }
            return;
        }
        let next = ["file", "image"]
            .into_iter()
            .find(|k| cur.get(k).is_some_and(Value::is_object));
        match next {
            Some(k) => cur = cur.get_mut(k).expect("checked"),
            None => return,
        }
    }
}

/// Opens options with a cache mode and read-only flag that children inherit.
pub async fn open_with(
    w: &GraphWriter<'_>,
    opts: Value,
    cache: CacheMode,
    read_only: bool,
) -> Result<Arc<Node>> {
    let inherited = CommonOptions {
        read_only,
        cache,
        ..CommonOptions::default()
    };
    open_node(w, opts, false, &inherited).await
}
