//! `sluice img info`: qemu-img info's human and JSON reports, one image or
//! a whole backing chain (`--backing-chain`).

use super::common::{self, node_filename, size_to_str, OpenSpec};
use super::json::J;
use sluice_core::{Node, Role};
use sluice_qcow2::format::{autoclear, compat, Header, Snapshot};
use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Report every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// FILENAME is a key=value option string.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Open without locking out other users.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Accepted for compatibility (secrets are not supported).
    #[arg(long = "object")]
    object: Vec<String>,
    /// Limit the output to the given depth in the child tree (accepted).
    #[arg(long = "limits")]
    limits: bool,
    filename: Option<String>,
}

/// What `info` reports about one qcow2 image, read from its header.
pub struct Qcow2Facts {
    pub header: Header,
    pub snapshots: Vec<Snapshot>,
}

/// Reads a qcow2 node's header and snapshot table through its `file`
/// child (works for `--image-opts` and `json:` images too).
pub async fn qcow2_facts(node: &Node) -> Result<Option<Qcow2Facts>, String> {
    if node.driver_name() != "qcow2" {
        return Ok(None);
    }
    let Some(file) = node.child(Role::File) else {
        return Ok(None);
    };
    let opts = sluice_qcow2::Qcow2Options {
        file: serde_json::Value::String(file.name().to_string()),
        ..Default::default()
    };
    let d = sluice_qcow2::Qcow2Driver::open(&file, &opts, true)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(Qcow2Facts {
        header: d.header().clone(),
        snapshots: d.snapshots().to_vec(),
    }))
}

/// Bytes a file takes on the host.
pub fn allocated_size(filename: Option<&str>) -> Option<u64> {
    let m = std::fs::metadata(filename?).ok()?;
    Some(m.blocks() * 512)
}

/// One image's report.
struct ImageInfo {
    filename: String,
    format: String,
    virtual_size: u64,
    actual_size: Option<u64>,
    dirty: bool,
    qcow2: Option<Qcow2Facts>,
    file_child: Option<FileInfo>,
}

struct FileInfo {
    filename: String,
    length: u64,
    actual_size: Option<u64>,
}

impl ImageInfo {
    async fn of(node: &Arc<Node>) -> Result<ImageInfo, String> {
        let filename = node_filename(node).unwrap_or_else(|| node.name().to_string());
        let qcow2 = qcow2_facts(node).await?;
        let file_child = node.child(Role::File).map(|f| {
            let name = f
                .driver()
                .filename()
                .unwrap_or_else(|| f.name().to_string());
            FileInfo {
                actual_size: allocated_size(Some(&name)),
                filename: name,
                // QEMU counts a protocol node's length in whole sectors.
                length: f.size().div_ceil(512) * 512,
            }
        });
        let actual_size = match &file_child {
            Some(f) => f.actual_size,
            None => allocated_size(node.driver().filename().as_deref()),
        };
        Ok(ImageInfo {
            dirty: qcow2.as_ref().is_some_and(|q| q.header.is_dirty()),
            filename,
            format: node.driver_name().to_string(),
            virtual_size: node.size(),
            actual_size,
            qcow2,
            file_child,
        })
    }

    fn backing(&self) -> Option<(String, String, Option<String>)> {
        let h = &self.qcow2.as_ref()?.header;
        let b = h.backing_file.clone()?;
        let full = sluice_qcow2::chain::backing_path(Some(&self.filename), &b).unwrap_or(b.clone());
        Some((b, full, h.backing_format.clone()))
    }

    /// qcow2's `format-specific` data, in QEMU's key order.
    fn specific(&self) -> Option<J> {
        Some(qcow2_specific(&self.qcow2.as_ref()?.header))
    }

    fn to_json(&self) -> J {
        let mut j = J::obj();
        let children = match &self.file_child {
            Some(f) => vec![J::obj().with("name", "file").with(
                "info",
                J::obj()
                    .with("children", J::Arr(vec![]))
                    .with("virtual-size", f.length)
                    .with("filename", f.filename.clone())
                    .with("format", "file")
                    .with_opt("actual-size", f.actual_size)
                    .with(
                        "format-specific",
                        J::obj().with("type", "file").with("data", J::obj()),
                    )
                    .with("dirty-flag", false),
            )],
            None => vec![],
        };
        j.set("children", J::Arr(children));
        if let Some(q) = &self.qcow2 {
            if !q.snapshots.is_empty() {
                j.set(
                    "snapshots",
                    J::Arr(q.snapshots.iter().map(snapshot_json).collect()),
                );
            }
        }
        let backing = self.backing();
        if let Some((_, _, Some(fmt))) = &backing {
            j.set("backing-filename-format", fmt.clone().into());
        }
        j.set("virtual-size", self.virtual_size.into());
        j.set("filename", self.filename.clone().into());
        if let Some(q) = &self.qcow2 {
            j.set("cluster-size", q.header.cluster_size().into());
        }
        j.set("format", self.format.clone().into());
        if let Some(a) = self.actual_size {
            j.set("actual-size", a.into());
        }
        if let Some(s) = self.specific() {
            j.set("format-specific", s);
        }
        if let Some((b, full, _)) = backing {
            j.set("full-backing-filename", full.into());
            j.set("backing-filename", b.into());
        }
        j.set("dirty-flag", self.dirty.into());
        j
    }

    fn human(&self) -> String {
        let mut s = String::new();
        s += &format!("image: {}\n", self.filename);
        s += &format!("file format: {}\n", self.format);
        s += &format!(
            "virtual size: {} ({} bytes)\n",
            size_to_str(self.virtual_size),
            self.virtual_size
        );
        match self.actual_size {
            Some(a) => s += &format!("disk size: {}\n", size_to_str(a)),
            None => s += "disk size: unavailable\n",
        }
        if let Some(q) = &self.qcow2 {
            s += &format!("cluster_size: {}\n", q.header.cluster_size());
        }
        if self.dirty {
            s += "cleanly shut down: no\n";
        }
        if let Some((b, full, fmt)) = self.backing() {
            if b == full {
                s += &format!("backing file: {b}\n");
            } else {
                s += &format!("backing file: {b} (actual path: {full})\n");
            }
            if let Some(f) = fmt {
                s += &format!("backing file format: {f}\n");
            }
        }
        if let Some(q) = &self.qcow2 {
            if !q.snapshots.is_empty() {
                s += "Snapshot list:\n";
                s += &snapshot_table(&q.snapshots);
            }
        }
        if let Some(spec) = self.specific() {
            s += &specific_human(&spec);
        }
        if let Some(f) = &self.file_child {
            s += "Child node '/file':\n";
            s += &format!("    filename: {}\n", f.filename);
            s += "    protocol type: file\n";
            s += &format!(
                "    file length: {} ({} bytes)\n",
                size_to_str(f.length),
                f.length
            );
            if let Some(a) = f.actual_size {
                s += &format!("    disk size: {}\n", size_to_str(a));
            }
        }
        s
    }
}

impl J {
    fn with_opt(self, key: &str, v: Option<u64>) -> J {
        match v {
            Some(v) => self.with(key, v),
            None => self,
        }
    }
}

/// The icount a snapshot's extra data records, if any.
fn snapshot_icount(s: &Snapshot) -> Option<u64> {
    let b: [u8; 8] = s.extra.get(16..24)?.try_into().ok()?;
    let v = u64::from_be_bytes(b);
    (v != u64::MAX).then_some(v)
}

fn snapshot_json(s: &Snapshot) -> J {
    let mut j = J::obj();
    if let Some(i) = snapshot_icount(s) {
        j.set("icount", i.into());
    }
    j.with("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000)
        .with("name", s.name.clone())
        .with("date-sec", s.date_sec)
        .with("date-nsec", s.date_nsec)
        .with("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000)
        .with("id", s.id.clone())
        .with("vm-state-size", s.vm_state_size)
}

/// A snapshot's date in local time, as `strftime("%Y-%m-%d %H:%M:%S")`.
fn local_date(secs: u32) -> String {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is plain data filled in by localtime_r.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a time_t and a tm.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The snapshot table of `info` and `snapshot -l`, header line included.
pub fn snapshot_table(snaps: &[Snapshot]) -> String {
    let mut s = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let ms = sn.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            ms / 3_600_000,
            (ms / 60_000) % 60,
            (ms / 1000) % 60,
            ms % 1000
        );
        let icount = snapshot_icount(sn)
            .map(|i| i.to_string())
            .unwrap_or_default();
        s += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            size_to_str(sn.vm_state_size),
            local_date(sn.date_sec),
            clock,
            icount
        );
    }
    s
}

/// Checks `--output`'s value; on a bad one prints qemu-img's two lines
/// for `cmd` and returns the exit code.
pub fn output_json(output: &str, cmd: &str) -> Result<bool, ExitCode> {
    match output {
        "json" => Ok(true),
        "human" => Ok(false),
        other => Err(common::usage(
            cmd,
            &format!("--output expects 'human' or 'json' not '{other}'"),
        )),
    }
}

pub fn run(args: InfoArgs) -> ExitCode {
    let _ = (&args.object, args.limits);
    let json = match output_json(&args.output, "info") {
        Ok(j) => j,
        Err(code) => return code,
    };
    let Some(filename) = args.filename.clone() else {
        return common::usage("info", "Expecting one image file name");
    };
    if args.image_opts && args.format.is_some() {
        return common::fail(1, "--image-opts and --format are mutually exclusive");
    }
    let spec = OpenSpec {
        name: filename,
        format: args.format.clone(),
        image_opts: args.image_opts,
        force_share: args.force_share,
        no_backing: !args.backing_chain,
        ..OpenSpec::default()
    };
    let res = common::block_on(async move {
        let img = common::open(&spec).await?;
        let layers = if args.backing_chain {
            common::chain_layers(&img.node())
        } else {
            vec![img.node()]
        };
        let mut infos = Vec::new();
        let mut err = None;
        for l in &layers {
            match ImageInfo::of(l).await {
                Ok(i) => infos.push(i),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let _ = img.close().await;
        match err {
            Some(e) => Err(e),
            None => Ok(infos),
        }
    });
    let infos = match res.and_then(|r| r) {
        Ok(i) if !i.is_empty() => i,
        Ok(_) => return common::fail(1, "the image has no format layer to report"),
        Err(e) => return common::fail(1, &e),
    };
    let text = if json {
        if args.backing_chain {
            J::Arr(infos.iter().map(ImageInfo::to_json).collect()).pretty() + "\n"
        } else {
            infos[0].to_json().pretty() + "\n"
        }
    } else {
        infos
            .iter()
            .map(ImageInfo::human)
            .collect::<Vec<_>>()
            .join("\n")
    };
    print!("{text}");
    ExitCode::SUCCESS
}

/// qcow2's `format-specific` data (`qemu-img info`'s, `qemu-io info`'s),
/// in QEMU's key order.
pub fn qcow2_specific(h: &Header) -> J {
    let mut d = J::obj();
    if h.version < 3 {
        d.set("compat", "0.10".into());
        d.set("compression-type", h.compression_type.name().into());
        d.set("refcount-bits", h.refcount_bits().into());
    } else {
        d.set("compat", "1.1".into());
        d.set("compression-type", h.compression_type.name().into());
        d.set(
            "lazy-refcounts",
            (h.compatible_features & compat::LAZY_REFCOUNTS != 0).into(),
        );
        d.set("refcount-bits", h.refcount_bits().into());
        if h.has_data_file() {
            if let Some(df) = &h.data_file {
                d.set("data-file", df.clone().into());
            }
            d.set(
                "data-file-raw",
                (h.autoclear_features & autoclear::DATA_FILE_RAW != 0).into(),
            );
        }
        d.set("corrupt", h.is_corrupt().into());
        d.set("extended-l2", h.has_extended_l2().into());
    }
    J::obj().with("type", "qcow2").with("data", d)
}

/// The human form of `format-specific` data: "Format specific
/// information:" and its fields, indented.
pub fn specific_human(spec: &J) -> String {
    let mut s = String::from("Format specific information:\n");
    if let J::Obj(spec) = spec {
        if let Some((_, J::Obj(data))) = spec.iter().find(|(k, _)| k == "data") {
            for (k, v) in data {
                let v = match v {
                    J::Str(t) => t.clone(),
                    other => other.compact(),
                };
                s += &format!("    {}: {v}\n", k.replace('-', " "));
            }
        }
    }
    s
}

/// What `qemu-io`'s `info` says of a qcow2 node past its format name:
/// the cluster size, where a VM state would start (after the guest
/// clusters the L1 table can map, QEMU's `qcow2_vm_state_offset`), and
/// the format-specific information. `None` for other formats.
pub async fn qcow2_io_info(node: &Node) -> Result<Option<(u64, u64, String)>, String> {
    let Some(f) = qcow2_facts(node).await? else {
        return Ok(None);
    };
    let h = &f.header;
    let shift = h.cluster_bits + h.l2_bits();
    let vm_state = h.size.div_ceil(1 << shift) << shift;
    Ok(Some((
        h.cluster_size(),
        vm_state,
        specific_human(&qcow2_specific(h)),
    )))
}
