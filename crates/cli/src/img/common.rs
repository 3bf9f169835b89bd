//! What every `sluice img` subcommand shares: qemu-img's error line and
//! exit codes, opening an image the way qemu-img does, the runtime, and
//! QEMU's way of printing sizes.

use serde_json::Value;
use sluice_core::{Graph, Node, PermPair, Role, Root};
use sluice_drivers::protocol::file::{parse_cache_mode, CacheMode};
use std::process::ExitCode;
use std::sync::Arc;

/// Prints `qemu-img: MSG` to stderr, as qemu-img's `error_report` does.
pub fn error(msg: &str) {
    eprintln!("qemu-img: {msg}");
}

/// A usage error of `qemu-img CMD`: the message, qemu-img's hint line,
/// exit code 1.
pub fn usage(cmd: &str, msg: &str) -> ExitCode {
    error(msg);
    eprintln!("Try 'qemu-img {cmd} --help' for more info");
    ExitCode::from(1)
}

/// Prints the error and returns exit code `code`.
pub fn fail(code: u8, msg: &str) -> ExitCode {
    error(msg);
    ExitCode::from(code)
}

/// Keeps the multi-MiB I/O buffers of copy loops on the heap: by default
/// glibc maps each one afresh and unmaps it when freed, and the page
/// faults of zero-filling new mappings cost more than the copy itself.
fn keep_buffers_on_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// For the commands whose writes are one bulk copy (convert, commit,
/// rebase): see `sluice_drivers::protocol::file::set_bulk_copy`.
pub fn bulk_copy_writes() {
    sluice_drivers::protocol::file::set_bulk_copy(true);
}

/// Runs `fut` on a small multi-threaded runtime; I/O engine threads left
/// behind never keep the process up.
pub fn block_on<F: std::future::Future>(fut: F) -> Result<F::Output, String> {
    keep_buffers_on_heap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let out = rt.block_on(fut);
    rt.shutdown_background();
    Ok(out)
}

/// Parses a `-t`/`-T` cache mode, with qemu-img's message.
pub fn cache_mode(s: Option<&str>) -> Result<CacheMode, String> {
    match s {
        None => Ok(CacheMode::WRITEBACK),
        Some(s) => parse_cache_mode(s).map_err(|_| format!("Invalid cache option: {s}")),
    }
}

/// How to open one image.
#[derive(Clone, Default)]
pub struct OpenSpec {
    /// A file name, `json:{...}`, or with `image_opts` a key=value string.
    pub name: String,
    pub format: Option<String>,
    pub image_opts: bool,
    pub force_share: bool,
    pub writable: bool,
    /// Open without the backing chain (`qemu-img info`, `rebase -u`).
    pub no_backing: bool,
    pub cache: Option<CacheMode>,
    /// Extra options merged on top (`backing` overrides and the like).
    pub extra: Option<Value>,
}

/// An open image: its graph and the root the tool's requests enter by.
pub struct Image {
    pub graph: Graph,
    pub root: Arc<Root>,
    /// The name the user gave, for messages.
    pub name: String,
    pub(crate) top: Arc<Node>,
}

impl Image {
    pub fn node(&self) -> Arc<Node> {
        self.root.node()
    }

    pub fn size(&self) -> u64 {
        self.root.size()
    }

    /// Flushes and closes the image; a failed flush is an error (data may
    /// not have reached the disk).
    pub async fn close(self) -> Result<(), String> {
        let Image {
            graph,
            root,
            top,
            name,
        } = self;
        let flushed = if root.perm().perm.contains(sluice_core::Perm::WRITE) {
            root.flush().await.map_err(|e| format!("{name}: {e}"))
        } else {
            Ok(())
        };
        drop(root);
        let w = graph.writer().await;
        let d = w.drain(&top).await;
        let _ = w.delete_node(&d, &top).await;
        flushed
    }
}

/// For the commands that work on an image's own metadata without its
/// backing chain (check, resize, snapshot): qemu-img opens the chain all
/// the same, so a backing file that cannot be opened fails them too
/// (amend, which opens it, fails first with qemu-img's message).
/// Images named by options, and headers that cannot be read, pass (the
/// command's own open reports those).
pub fn backing_chain_opens(spec: &OpenSpec) -> Result<(), String> {
    if spec.image_opts || spec.name.starts_with("json:") {
        return Ok(());
    }
    let Ok(h) = sluice_qcow2::chain::read_header_file(&spec.name) else {
        return Ok(());
    };
    sluice_qcow2::chain::resolve(Some(&spec.name), &h)
        .map(drop)
        .map_err(|e| {
            format!(
                "Could not open '{}': Could not open backing file: {e}",
                spec.name
            )
        })
}

/// The block options qemu-img builds for `spec`: a `json:` filename, a
/// key=value string (`--image-opts`), or a file with its format (probed
/// when not given).
pub fn image_options(spec: &OpenSpec) -> Result<Value, String> {
    options_probed(spec).map(|(v, _)| v)
}

/// [`image_options`], and the file whose format was probed, if any.
fn options_probed(spec: &OpenSpec) -> Result<(Value, Option<String>), String> {
    let mut probed = (!spec.image_opts && spec.format.is_none()).then(|| spec.name.clone());
    let mut v = if spec.image_opts {
        sluice_control::keyval::parse(&spec.name, Some("file")).map_err(|e| e.to_string())?
    } else if let Some(json) = spec.name.strip_prefix("json:") {
        let mut v: Value = serde_json::from_str(json)
            .map_err(|e| format!("Could not parse the JSON options: {e}"))?;
        if let (Some(f), Some(o)) = (&spec.format, v.as_object_mut()) {
            o.insert("driver".into(), Value::String(f.clone()));
        }
        v
    } else {
        sluice_drivers::open::image_options(&spec.name, spec.format.as_deref())?
    };
    // `--image-opts` with `filename=`: a file under the named format.
    if spec.image_opts {
        if let Some(o) = v.as_object_mut() {
            if let Some(Value::String(f)) = o.remove("filename") {
                let fmt = o
                    .remove("driver")
                    .and_then(|d| d.as_str().map(str::to_string));
                let mut base = sluice_drivers::open::image_options(&f, fmt.as_deref())?;
                sluice_control::keyval::merge(&mut base, Value::Object(o.clone()));
                v = base;
            }
        }
    }
    if spec.image_opts {
        default_protocol(&mut v);
        // Without a driver, the format of the file below is probed.
        let file = &v["file"];
        if v.get("driver").is_none() && file["driver"] == "file" {
            if let Some(f) = file["filename"].as_str().map(str::to_string) {
                let fmt = sluice_drivers::open::probe_format(&f).map_err(|e| e.to_string())?;
                v["driver"] = Value::String(fmt.into());
                probed = Some(f);
            }
        }
    }
    if spec.no_backing && v["driver"] == "qcow2" && v.get("backing").is_none() {
        v["backing"] = Value::Null;
    }
    if let Some(e) = &spec.extra {
        sluice_control::keyval::merge(&mut v, e.clone());
    }
    Ok((v, probed))
}

/// A nested `file` given by its `filename` alone is a `file` node, as
/// QEMU's protocol guess makes it.
fn default_protocol(v: &mut Value) {
    let Some(o) = v.as_object_mut() else { return };
    for key in ["file", "data-file", "backing"] {
        if let Some(Value::Object(child)) = o.get_mut(key) {
            if !child.contains_key("driver") && child.contains_key("filename") {
                child.insert("driver".into(), Value::String("file".into()));
            }
        }
        if let Some(child) = o.get_mut(key) {
            default_protocol(child);
        }
    }
}

/// Opens `spec` as qemu-img does; the error is the whole message
/// (`Could not open 'NAME': CAUSE`).
pub async fn open(spec: &OpenSpec) -> Result<Image, String> {
    let (v, probed) = open_options(spec)?;
    open_graph(spec, v, probed).await
}

/// What `spec` opens, with the refusals qemu-img makes before it opens
/// anything; and the file whose format was probed, if any.
fn open_options(spec: &OpenSpec) -> Result<(Value, Option<String>), String> {
    if spec.force_share && spec.writable {
        return Err(could_not(
            spec,
            "force-share=on can only be used with read-only images",
        ));
    }
    options_probed(spec).map_err(|e| could_not(spec, &e))
}

fn could_not(spec: &OpenSpec, e: &str) -> String {
    format!("Could not open '{}': {e}", spec.name)
}

/// The root qemu-img's image is used by, on `node` (deleted when the
/// root cannot be had).
async fn tool_root(
    w: &sluice_core::GraphWriter<'_>,
    spec: &OpenSpec,
    node: &Arc<Node>,
) -> Result<Root, String> {
    let perm = match (spec.writable, spec.force_share) {
        (true, _) => PermPair::writer(),
        (false, false) => PermPair::reader(),
        (false, true) => PermPair::reader_sharing_all(),
    };
    match w.add_root("block device", "qemu-img", node, perm).await {
        Ok(r) => Ok(r),
        Err(e) => {
            let d = w.drain(node).await;
            let _ = w.delete_node(&d, node).await;
            Err(could_not(spec, &e.to_string()))
        }
    }
}

async fn open_graph(spec: &OpenSpec, v: Value, probed: Option<String>) -> Result<Image, String> {
    let probed_raw = probed.filter(|_| v["driver"] == "raw");
    let cache = spec.cache.unwrap_or(CacheMode::WRITEBACK);
    let graph = Graph::new();
    let (root, top) = {
        let w = graph.writer().await;
        let top = sluice_drivers::open::open_with(&w, v, cache, !spec.writable)
            .await
            .map_err(|e| could_not(spec, &e.to_string()))?;
        (tool_root(&w, spec, &top).await?, top)
    };
    if let Some(name) = probed_raw.filter(|_| spec.writable) {
        eprintln!("WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.");
    }
    Ok(Image {
        graph,
        root: Arc::new(root),
        name: spec.name.clone(),
        top,
    })
}

/// An image opened for a change of its own metadata (`snapshot -c/-a/-d`,
/// `amend`): a qcow2 image with its one qcow2 driver, or any other as
/// [`open`] opens it (for qemu-img's refusals).
pub enum MetaImage {
    Qcow2(Box<Qcow2Image>),
    Other(Image),
}

/// A qcow2 image opened detached (`sluice_qcow2::detached`): the
/// operation runs on its driver, the only qcow2 driver on the file; its
/// node holds the children (and the root their permissions) as
/// [`open`] would.
pub struct Qcow2Image {
    pub image: sluice_qcow2::detached::Detached,
    graph: Graph,
    root: Root,
}

impl Qcow2Image {
    /// Writes everything back, marks the image clean and closes it, as
    /// [`Image::close`] does.
    pub async fn close(self) -> Result<(), String> {
        let Qcow2Image { image, graph, root } = self;
        let finished = image.finish().await.map_err(|e| e.to_string());
        let node = image.node.clone();
        drop(image);
        drop(root);
        let w = graph.writer().await;
        let d = w.drain(&node).await;
        let _ = w.delete_node(&d, &node).await;
        finished
    }
}

/// Opens `spec` as [`open`] does (same checks, messages and order), a
/// qcow2 image detached.
pub async fn open_metadata(spec: &OpenSpec) -> Result<MetaImage, String> {
    let (v, probed) = open_options(spec)?;
    if v["driver"] != "qcow2" {
        return open_graph(spec, v, probed).await.map(MetaImage::Other);
    }
    let cache = spec.cache.unwrap_or(CacheMode::WRITEBACK);
    let graph = Graph::new();
    let (image, root) = {
        let w = graph.writer().await;
        let image = sluice_drivers::open_qcow2_detached(&w, v, cache, !spec.writable)
            .await
            .map_err(|e| could_not(spec, &e.to_string()))?;
        let root = tool_root(&w, spec, &image.node).await?;
        (image, root)
    };
    Ok(MetaImage::Qcow2(Box::new(Qcow2Image {
        image,
        graph,
        root,
    })))
}

/// The image file a node stands for: its own, or its `file` child's.
pub fn node_filename(node: &Node) -> Option<String> {
    node.driver()
        .filename()
        .or_else(|| node.child(Role::File).and_then(|f| f.driver().filename()))
}

/// The most one block status query asks about: node requests are
/// limited to `MAX_REQUEST_BYTES` (2 GiB), block status included.
pub const STATUS_MAX: u64 = 1 << 30;

/// The status of `[off, off + len)` through `node`'s chain
/// (`block_status_chain`; at most [`STATUS_MAX`] bytes per answer),
/// refusing an answer that covers no byte or more than asked, so that no
/// walk over an image can loop forever.
pub async fn extent_at(
    node: &Arc<Node>,
    off: u64,
    len: u64,
) -> Result<sluice_core::Extent, String> {
    let len = len.min(STATUS_MAX);
    let e = sluice_core::status::block_status_chain(node, off, len)
        .await
        .map_err(|e| e.to_string())?;
    if e.length == 0 || e.length > len {
        return Err(format!(
            "{}: block status at offset {off} covers {} bytes of {len}",
            node.name(),
            e.length
        ));
    }
    Ok(e)
}

/// The layers of a chain top-down: each node with a backing child leads
/// to it; filters are looked through.
pub fn chain_layers(top: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut out = Vec::new();
    let mut cur = Some(top.clone());
    while let Some(n) = cur {
        if out.len() > sluice_qcow2::chain::MAX_CHAIN_DEPTH {
            break;
        }
        if n.driver().is_filter() {
            cur = n.filtered_child();
            continue;
        }
        cur = n.child(Role::Backing);
        out.push(n);
    }
    out
}

/// `%0.3g` as C prints it.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    // Rounding to 3 significant digits can carry into the next power.
    let rounded_exp = {
        let s = format!("{:.2e}", v);
        s.split('e')
            .nth(1)
            .and_then(|e| e.parse::<i32>().ok())
            .unwrap_or(exp)
    };
    if !(-4..3).contains(&rounded_exp) {
        let s = format!("{:.2e}", v);
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = trim_zeros(m);
        let e: i32 = e.parse().unwrap_or(0);
        let sign = if e < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", e.abs());
    }
    let decimals = (2 - rounded_exp).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// QEMU's `size_to_str`: `1.25 MiB`, `64 MiB`, `0 B`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: scaled = m * 2^e with m in [0.5, 1).
    let e = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = (((e - 1).max(0)) / 10).min(6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// The items of one `-o` argument: split on single commas, `,,` being a
/// literal comma. Empty items are kept (`a=b,` ends with one).
pub fn o_items(list: &str) -> Vec<String> {
    let mut cur = String::new();
    let mut items = Vec::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
}

/// Parses a `-o` list (`a=b,c=d`; `,,` is a literal comma) into pairs,
/// merging repeated `-o` options as qemu-img does.
pub fn parse_o_list(list: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for s in list {
        for it in o_items(s) {
            if it.is_empty() {
                continue;
            }
            match it.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None => return Err(format!("Invalid parameter '{it}'")),
            }
        }
    }
    Ok(out)
}

/// Test arguments as the parsers take them.
#[cfg(test)]
pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(1314816), "1.25 MiB");
        assert_eq!(size_to_str(67108864), "64 MiB");
        assert_eq!(size_to_str(348160), "340 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1023 * 1024), "0.999 MiB");
    }

    #[test]
    fn o_lists_split_on_single_commas() {
        let v = parse_o_list(&["a=b,c=d,,e".into(), "f=g".into()]).unwrap();
        assert_eq!(
            v,
            vec![
                ("a".into(), "b".into()),
                ("c".into(), "d,e".into()),
                ("f".into(), "g".into())
            ]
        );
        assert!(parse_o_list(&["novalue".into()]).is_err());
    }
}
