//! `sluice img create`, and the image creation `convert` shares: the
//! `Formatting ...` line, QEMU's size syntax and messages, backing file
//! checks, and the raw and qcow2 formats.

use super::common::{self, parse_o_list};
use sluice_core::error::os_text;
use sluice_drivers::size::{parse_size, NumError};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Image format (default raw).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Format options (`-o cluster_size=64k,...`), may repeat.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Do not open the backing file (unsafe).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    filename: Option<String>,
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
}

/// Parses an image size with qemu-img's two messages.
pub fn parse_image_size(s: &str) -> Result<u64, String> {
    let range =
        || "Invalid image size specified. Must be between 0 and 9223372036854775807.".to_string();
    if s.trim_start().starts_with('-') {
        return Err(range());
    }
    match parse_size(s) {
        Ok(v) => Ok(v),
        Err(NumError::TooLarge) => Err(range()),
        Err(NumError::Invalid) => Err(format!("Invalid image size specified: '{s}'.")),
    }
}

/// One image to create.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    pub filename: String,
    pub format: String,
    pub size: Option<u64>,
    /// `-o` options other than size and backing, as given.
    pub options: Vec<(String, String)>,
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
    /// Do not open the backing file (`-u`).
    pub unsafe_backing: bool,
    /// Print the `Formatting ...` line.
    pub announce: bool,
}

/// Formats sluice can create.
const FORMATS: &[&str] = &["raw", "qcow2"];

fn bool_opt(v: &str) -> Option<&'static str> {
    match v {
        "on" | "true" | "yes" => Some("on"),
        "off" | "false" | "no" => Some("off"),
        _ => None,
    }
}

impl CreateRequest {
    /// Moves `size`, `backing_file` and `backing_fmt` out of the `-o`
    /// list into their fields (the command line wins).
    pub fn take_generic_options(&mut self) -> Result<(), String> {
        let mut rest = Vec::new();
        for (k, v) in std::mem::take(&mut self.options) {
            match k.as_str() {
                "size" => {
                    if self.size.is_none() {
                        self.size = Some(parse_image_size(&v)?);
                    }
                }
                "backing_file" => {
                    if self.backing.is_none() {
                        self.backing = Some(v);
                    }
                }
                "backing_fmt" => {
                    if self.backing_fmt.is_none() {
                        self.backing_fmt = Some(v);
                    }
                }
                _ => rest.push((k, v)),
            }
        }
        self.options = rest;
        Ok(())
    }

    fn opt(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether sluice can create the format.
    pub fn check_format(&self) -> Result<(), String> {
        if FORMATS.contains(&self.format.as_str()) {
            Ok(())
        } else {
            Err(format!("Unknown file format '{}'", self.format))
        }
    }

    /// Checks the format's options; the message is qemu-img's.
    pub fn check_options(&self) -> Result<(), String> {
        let allowed: &[&str] = match self.format.as_str() {
            "raw" => &["preallocation"],
            "qcow2" => &[
                "cluster_size",
                "extended_l2",
                "preallocation",
                "compression_type",
                "compat",
                "data_file",
                "data_file_raw",
                "lazy_refcounts",
                "refcount_bits",
                "encrypt.format",
            ],
            _ => &[],
        };
        for (k, _) in &self.options {
            if !allowed.contains(&k.as_str()) {
                return Err(format!("Invalid parameter '{k}'"));
            }
        }
        if self.format == "raw" {
            if let Some(p) = self.opt("preallocation") {
                if !matches!(p, "off" | "falloc" | "full") {
                    return Err(format!(
                        "Parameter 'preallocation' does not accept value '{p}'"
                    ));
                }
            }
            if self.backing.is_some() {
                return Err("Backing file not supported for file format 'raw'".into());
            }
        }
        Ok(())
    }

    /// The `Formatting '...', fmt=... ` line, options in qemu-img's order.
    pub fn formatting_line(&self) -> String {
        let size = self.size.unwrap_or(0);
        let mut parts: Vec<String> = vec![format!("fmt={}", self.format)];
        match self.format.as_str() {
            "qcow2" => {
                let cs = self
                    .opt("cluster_size")
                    .and_then(|v| parse_size(v).ok())
                    .unwrap_or(65536);
                parts.push(format!("cluster_size={cs}"));
                let ext = self.opt("extended_l2").and_then(bool_opt).unwrap_or("off");
                parts.push(format!("extended_l2={ext}"));
                if let Some(p) = self.opt("preallocation") {
                    parts.push(format!("preallocation={p}"));
                }
                parts.push(format!(
                    "compression_type={}",
                    self.opt("compression_type").unwrap_or("zlib")
                ));
                parts.push(format!("size={size}"));
                if let Some(c) = self.opt("compat") {
                    parts.push(format!("compat={c}"));
                }
                if let Some(b) = &self.backing {
                    parts.push(format!("backing_file={b}"));
                }
                if let Some(f) = &self.backing_fmt {
                    parts.push(format!("backing_fmt={f}"));
                }
                if let Some(d) = self.opt("data_file") {
                    parts.push(format!("data_file={d}"));
                }
                if let Some(d) = self.opt("data_file_raw").and_then(bool_opt) {
                    parts.push(format!("data_file_raw={d}"));
                }
                let lazy = self
                    .opt("lazy_refcounts")
                    .and_then(bool_opt)
                    .unwrap_or("off");
                parts.push(format!("lazy_refcounts={lazy}"));
                parts.push(format!(
                    "refcount_bits={}",
                    self.opt("refcount_bits").unwrap_or("16")
                ));
            }
            _ => {
                parts.push(format!("size={size}"));
                if let Some(p) = self.opt("preallocation") {
                    parts.push(format!("preallocation={p}"));
                }
            }
        }
        format!("Formatting '{}', {}", self.filename, parts.join(" "))
    }
}

/// Creates (or truncates) the file `name` empty; the message is QEMU's.
pub fn create_file(name: &str) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(name)
        .map_err(|e| format!("Could not create '{name}': {}", os_text(&e)))
}

/// The virtual size of the backing file, opened to check it (and to
/// default the size): `None` with `-u`.
async fn backing_size(req: &CreateRequest) -> Result<Option<u64>, String> {
    let Some(b) = &req.backing else {
        return Ok(None);
    };
    if req.backing_fmt.is_none() {
        let detected = sluice_qcow2::chain::backing_path(Some(&req.filename), b)
            .ok()
            .and_then(|p| sluice_qcow2::chain::probe(&p).ok());
        let mut msg = format!(
            "{}: Backing file specified without backing format",
            req.filename
        );
        if let Some(d) = detected {
            msg += &format!("\nDetected format of {d}.");
        }
        return Err(msg);
    }
    if req.unsafe_backing {
        return Ok(None);
    }
    let path = sluice_qcow2::chain::backing_path(Some(&req.filename), b)
        .map_err(|e| format!("{}: {e}", req.filename))?;
    let spec = common::OpenSpec {
        name: path,
        format: req.backing_fmt.clone(),
        force_share: true,
        ..common::OpenSpec::default()
    };
    match common::open(&spec).await {
        Ok(img) => {
            let size = img.size();
            let _ = img.close().await;
            Ok(Some(size))
        }
        Err(e) => {
            // `e` is "Could not open 'PATH': CAUSE"; QEMU names the
            // backing file as given.
            let mut cause = e.as_str();
            while let Some(rest) = cause.strip_prefix("Could not open '") {
                match rest.split_once("': ") {
                    Some((_, c)) => cause = c,
                    None => break,
                }
            }
            Err(format!(
                "{}: Could not open '{b}': {cause}\nCould not open backing image.",
                req.filename
            ))
        }
    }
}

/// Creates the image `req` describes. Everything is checked before the
/// file is touched, so a refused request writes nothing.
pub async fn create_image(req: &CreateRequest) -> Result<(), String> {
    let name = &req.filename;
    req.check_format().map_err(|e| format!("{name}: {e}"))?;
    req.check_options().map_err(|e| format!("{name}: {e}"))?;
    let mut req = req.clone();
    if let Some(s) = backing_size(&req).await? {
        req.size.get_or_insert(s);
    }
    let Some(size) = req.size else {
        return Err(format!("{name}: Image creation needs a size parameter"));
    };
    if req.announce {
        println!("{}", req.formatting_line());
    }
    match req.format.as_str() {
        "raw" => create_raw(name, size, req.opt("preallocation").unwrap_or("off")),
        _ => create_qcow2(&req, size).await,
    }
    .map_err(|e| format!("{name}: {e}"))
}

fn create_raw(name: &str, size: u64, prealloc: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = create_file(name)?;
    let err = |e: std::io::Error| format!("Could not resize file: {}", os_text(&e));
    match prealloc {
        "falloc" | "full" if size > 0 => {
            // SAFETY: a valid fd; fallocate only changes the file.
            let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
            if r != 0 {
                return Err(err(std::io::Error::from_raw_os_error(r)));
            }
            Ok(())
        }
        _ => {
            f.set_len(size).map_err(err)?;
            // As QEMU: the first block is allocated, so that probing the
            // alignment of O_DIRECT I/O later finds data there.
            use std::os::unix::fs::FileExt;
            let head = vec![0u8; size.min(4096) as usize];
            f.write_all_at(&head, 0).map_err(err)
        }
    }
}

/// A qcow2 driver error without its `qcow2: ` prefix, as qemu-img
/// prints it after the file name.
fn qcow2_text(e: sluice_core::Error) -> String {
    let t = e.to_string();
    t.strip_prefix("qcow2: ").map(str::to_string).unwrap_or(t)
}

/// Opens the freshly created file `name` as a writable `file` node, runs
/// `fill` on it, flushes and closes it.
pub async fn with_file_node<F, Fut>(name: &str, fill: F) -> Result<(), String>
where
    F: FnOnce(std::sync::Arc<sluice_core::Node>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let graph = sluice_core::Graph::new();
    let w = graph.writer().await;
    let file = sluice_drivers::open_with(
        &w,
        serde_json::json!({"driver": "file", "filename": name}),
        sluice_drivers::protocol::file::CacheMode::WRITEBACK,
        false,
    )
    .await
    .map_err(|e| e.to_string())?;
    let res = fill(file.clone()).await;
    let flushed = file.flush().await.map_err(|e| e.to_string());
    let d = w.drain(&file).await;
    let _ = w.delete_node(&d, &file).await;
    res.and(flushed)
}

async fn create_qcow2(req: &CreateRequest, size: u64) -> Result<(), String> {
    use serde_json::Value;
    let mut map = serde_json::Map::new();
    for (k, v) in &req.options {
        map.insert(k.clone(), Value::String(v.clone()));
    }
    map.insert("size".into(), Value::from(size));
    if let Some(b) = &req.backing {
        map.insert("backing_file".into(), Value::String(b.clone()));
    }
    if let Some(f) = &req.backing_fmt {
        map.insert("backing_fmt".into(), Value::String(f.clone()));
    }
    // Every option is checked before the file is created.
    let opts = sluice_qcow2::create::CreateOptions::parse(map).map_err(qcow2_text)?;
    create_file(&req.filename)?;
    if let Some(df) = &opts.data_file {
        let path = sluice_qcow2::chain::backing_path(Some(&req.filename), df)
            .map_err(|e| e.to_string())?;
        create_file(&path)?;
    }
    with_file_node(&req.filename, |file| async move {
        sluice_qcow2::create::create(&file, &opts)
            .await
            .map_err(qcow2_text)
    })
    .await
}

pub fn run(args: CreateArgs) -> ExitCode {
    let _ = &args.object;
    let Some(filename) = args.filename.clone() else {
        return common::usage("create", "Expecting image file name");
    };
    let size = match args.size.as_deref().map(parse_image_size).transpose() {
        Ok(s) => s,
        Err(e) => return common::fail(1, &e),
    };
    let options = match parse_o_list(&args.options) {
        Ok(o) => o,
        Err(e) => return common::fail(1, &e),
    };
    let mut req = CreateRequest {
        filename,
        format: args.format.clone().unwrap_or_else(|| "raw".into()),
        size,
        options,
        backing: args.backing.clone(),
        backing_fmt: args.backing_fmt.clone(),
        unsafe_backing: args.unsafe_backing,
        announce: !args.quiet,
    };
    if let Err(e) = req.take_generic_options() {
        return common::fail(1, &e);
    }
    match common::block_on(create_image(&req)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) | Err(e) => common::fail(1, &e),
    }
}
