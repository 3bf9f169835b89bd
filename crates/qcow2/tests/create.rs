//! Images created by sluice against the same options given to
//! `qemu-img create`: `qemu-img info` agrees, `qemu-img check` is clean,
//! `qemu-img map` shows the same allocation, and sluice opens and writes
//! what it made.

mod common;

use common::*;
use serde_json::{json, Map, Value};
use sluice_core::{IoBytes, WriteFlags};
use sluice_qcow2::create::{create, CreateOptions};

fn info(img: &str) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", img])).unwrap()
}

fn check_clean(img: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", img])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {img}: {text}"
    );
}

/// `qemu-img map` without host offsets, neighbours alike merged (the
/// layouts may differ, e.g. where L2 tables sit between data clusters),
/// and without `zero` where there is data (it only tells where the host
/// file has holes, which depends on the layout too).
fn map_shape(img: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&qemu_img(&["map", "--output=json", img])).unwrap();
    let mut out: Vec<Value> = Vec::new();
    for e in v.as_array().unwrap() {
        let mut e = e.clone();
        let m = e.as_object_mut().unwrap();
        m.remove("offset");
        if m["data"] == json!(true) {
            m.remove("zero");
        }
        let len = m.remove("length").unwrap().as_u64().unwrap();
        let start = m.remove("start").unwrap().as_u64().unwrap();
        if let Some(prev) = out.last_mut() {
            let p = prev.as_object_mut().unwrap();
            let (ps, pl) = (p["start"].as_u64().unwrap(), p["length"].as_u64().unwrap());
            let same = m.iter().all(|(k, v)| p.get(k) == Some(v));
            if same && ps + pl == start {
                p.insert("length".into(), json!(pl + len));
                continue;
            }
        }
        m.insert("start".into(), json!(start));
        m.insert("length".into(), json!(len));
        out.push(e);
    }
    out
}

/// Creates `img` (an empty file first, as the file protocol's create
/// does) through sluice.
async fn sluice_create(img: &str, opts: &Map<String, Value>) -> sluice_core::Result<()> {
    std::fs::File::create(img).unwrap();
    let o = open_opts(json!({"driver": "file", "filename": img}), false).await?;
    let co = CreateOptions::parse(opts.clone())?;
    create(&o.node, &co).await
}

fn qemu_create(img: &str, opts: &Map<String, Value>) {
    let mut o: Vec<String> = Vec::new();
    for (k, v) in opts {
        let v = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        o.push(format!("{k}={v}"));
    }
    let o = o.join(",");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !o.is_empty() {
        args.extend(["-o", &o]);
    }
    args.push(img);
    qemu_img(&args);
}

/// The parts of `qemu-img info` that the options decide.
fn decided(i: &Value) -> Value {
    json!({
        "virtual-size": i["virtual-size"],
        "cluster-size": i["cluster-size"],
        "backing-filename": i["backing-filename"],
        "backing-filename-format": i["backing-filename-format"],
        "format-specific": i["format-specific"],
    })
}

/// Creates the image with both tools (same names in two directories)
/// and compares them; then writes through sluice.
async fn same_as_qemu(tag: &str, opts: Value) {
    let opts = opts.as_object().unwrap().clone();
    let dq = TempDir::new(&format!("create-q-{tag}"));
    let ds = TempDir::new(&format!("create-s-{tag}"));
    let (q, s) = (dq.path("img.qcow2"), ds.path("img.qcow2"));
    // qemu-img creates the external data file where it is told (relative
    // to the working directory): give each image its own, by full name.
    let data_file = opts
        .get("data_file")
        .and_then(Value::as_str)
        .map(str::to_string);
    let in_dir = |dir: &TempDir| {
        let mut o = opts.clone();
        if let Some(d) = &data_file {
            o.insert("data_file".into(), json!(dir.path(d)));
        }
        o
    };
    qemu_create(&q, &in_dir(&dq));
    if let Some(d) = &data_file {
        // qemu-img creates the data file with the virtual size; sluice
        // leaves it to the caller.
        let len = std::fs::metadata(dq.path(d)).unwrap().len();
        std::fs::File::create(ds.path(d))
            .unwrap()
            .set_len(len)
            .unwrap();
    }
    let opts = in_dir(&ds);
    sluice_create(&s, &opts)
        .await
        .unwrap_or_else(|e| panic!("{tag}: sluice create {opts:?}: {e}"));
    let (iq, is) = (info(&q), info(&s));
    let (mut wq, mut ws) = (decided(&iq), decided(&is));
    if let Some(d) = &data_file {
        let at = "/format-specific/data/data-file";
        assert_eq!(ws.pointer(at), Some(&json!(ds.path(d))));
        *wq.pointer_mut(at).unwrap() = Value::Null;
        *ws.pointer_mut(at).unwrap() = Value::Null;
    }
    assert_eq!(ws, wq, "{tag}: qemu-img info differs");
    check_clean(&s);
    // Without an external data file (whose name is the path) and
    // without preallocation that QEMU lays out its own way (data after
    // all metadata for falloc/full; further refcount blocks where its
    // allocation reaches them), the files are QEMU's byte for byte.
    let prealloc = opts.get("preallocation").and_then(Value::as_str);
    let same_layout = prealloc.is_none_or(|p| p == "off" || p == "metadata");
    if data_file.is_none() && same_layout && tag != "meta-small" {
        let (bs, bq) = (std::fs::read(&s).unwrap(), std::fs::read(&q).unwrap());
        assert_eq!(bs.len(), bq.len(), "{tag}: file lengths differ");
        if let Some(i) = bs.iter().zip(&bq).position(|(a, b)| a != b) {
            panic!("{tag}: files differ first at byte {i:#x}");
        }
    }
    let (ms, mq) = (map_shape(&s), map_shape(&q));
    assert!(
        ms == mq,
        "{tag}: qemu-img map differs: sluice {} extents, qemu {}; first: {:?} / {:?}",
        ms.len(),
        mq.len(),
        ms.iter().zip(&mq).find(|(a, b)| a != b),
        (ms.first(), mq.first())
    );

    // sluice opens it, and writes where it can.
    let size = is["virtual-size"].as_u64().unwrap();
    let o = open_image(&s, false).await.unwrap();
    assert_eq!(o.node.size(), size);
    if size == 0 {
        return;
    }
    let writes = opts.get("data_file").is_none();
    let len = size.min(4096);
    let last = size - len;
    if writes {
        for off in [0, last] {
            o.root
                .write(
                    off,
                    IoBytes::copy_from(&vec![0x5a; len as usize]),
                    WriteFlags::default(),
                )
                .await
                .unwrap_or_else(|e| panic!("{tag}: write at {off}: {e}"));
        }
        o.root.flush().await.unwrap();
    }
    let head = o.root.read(0, len as usize).await.unwrap();
    assert!(head.iter().all(|&b| b == if writes { 0x5a } else { 0 }));
    drop(o);
    check_clean(&s);
    if writes {
        qemu_io(
            &s,
            &[
                format!("read -P 0x5a 0 {len}"),
                format!("read -P 0x5a {last} {len}"),
            ],
        );
    }
}

#[tokio::test]
async fn defaults_and_versions() {
    same_as_qemu("default", json!({"size": "1G"})).await;
    same_as_qemu("v2", json!({"size": "1M", "compat": "0.10"})).await;
    same_as_qemu(
        "v3-lazy",
        json!({"size": "3M", "compat": "1.1", "lazy_refcounts": "on"}),
    )
    .await;
    same_as_qemu("odd-size", json!({"size": "1000"})).await;
    same_as_qemu("empty", json!({"size": "0"})).await;
}

#[tokio::test]
async fn cluster_and_refcount_widths() {
    same_as_qemu(
        "c512-r1",
        json!({"size": "1M", "cluster_size": "512", "refcount_bits": "1"}),
    )
    .await;
    same_as_qemu(
        "c4k-r8",
        json!({"size": "5M", "cluster_size": "4k", "refcount_bits": "8"}),
    )
    .await;
    same_as_qemu("c64k-r64", json!({"size": "1M", "refcount_bits": "64"})).await;
    same_as_qemu("c2m", json!({"size": "10M", "cluster_size": "2M"})).await;
}

#[tokio::test]
async fn extended_l2_and_zstd() {
    same_as_qemu(
        "extl2",
        json!({"size": "8M", "extended_l2": "on", "cluster_size": "32k"}),
    )
    .await;
    same_as_qemu("zstd", json!({"size": "8M", "compression_type": "zstd"})).await;
}

#[tokio::test]
async fn preallocation() {
    for mode in ["metadata", "falloc", "full"] {
        same_as_qemu(
            mode,
            json!({"size": "3M", "cluster_size": "4k", "preallocation": mode}),
        )
        .await;
    }
    // Several refcount blocks and a refcount table of more than one
    // cluster.
    same_as_qemu(
        "meta-small",
        json!({"size": "6M", "cluster_size": "512", "refcount_bits": "64", "preallocation": "metadata"}),
    )
    .await;
    same_as_qemu(
        "meta-extl2",
        json!({"size": "2M", "extended_l2": "on", "preallocation": "metadata"}),
    )
    .await;
}

#[tokio::test]
async fn backing_file() {
    let dir = TempDir::new("create-base");
    let base = dir.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "5M"]);
    qemu_io(&base, &["write -P 0x11 1M 64k".into()]);
    let raw = dir.path("base.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    // The size comes from the backing image.
    same_as_qemu(
        "backing",
        json!({"backing_file": base, "backing_fmt": "qcow2"}),
    )
    .await;
    same_as_qemu(
        "backing-raw",
        json!({"backing_file": raw, "backing_fmt": "raw"}),
    )
    .await;
    same_as_qemu(
        "backing-sized",
        json!({"backing_file": base, "backing_fmt": "qcow2", "size": "7M"}),
    )
    .await;
    same_as_qemu(
        "backing-prealloc",
        json!({"backing_file": base, "backing_fmt": "qcow2", "extended_l2": "on", "preallocation": "metadata"}),
    )
    .await;
    // The overlay shows the backing image's data.
    let top = dir.path("top.qcow2");
    let mut o = Map::new();
    o.insert("backing_file".into(), json!(base));
    sluice_create(&top, &o).await.unwrap();
    let o = open_image(&top, true).await.unwrap();
    assert_eq!(o.node.size(), 5 << 20);
    assert!(o
        .root
        .read(1 << 20, 512)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x11));
}

#[tokio::test]
async fn external_data_file() {
    same_as_qemu("data", json!({"size": "1M", "data_file": "img.data"})).await;
    same_as_qemu(
        "data-raw",
        json!({"size": "1M", "data_file": "img.data", "data_file_raw": "on"}),
    )
    .await;
}

#[tokio::test]
async fn bad_options_are_refused_before_touching_the_file() {
    let dir = TempDir::new("create-bad");
    let img = dir.path("img.qcow2");
    std::fs::write(&img, b"keep me").unwrap();
    let o = open_opts(json!({"driver": "file", "filename": img}), false)
        .await
        .unwrap();
    let co = CreateOptions {
        cluster_size: 1000,
        size: Some(1 << 20),
        ..Default::default()
    };
    let e = create(&o.node, &co).await.unwrap_err().to_string();
    assert!(e.contains("Cluster size must be a power of two"), "{e}");
    let co = CreateOptions::default();
    let e = create(&o.node, &co).await.unwrap_err().to_string();
    assert!(e.contains("Image creation needs a size parameter"), "{e}");
    let co = CreateOptions {
        size: Some(1 << 60),
        cluster_size: 512,
        ..Default::default()
    };
    let e = create(&o.node, &co).await.unwrap_err().to_string();
    assert!(
        e.contains("The image size is too large for file format 'qcow2'"),
        "{e}"
    );
    let co = CreateOptions {
        backing_file: Some(dir.path("missing.qcow2")),
        backing_fmt: Some("qcow2".into()),
        ..Default::default()
    };
    let e = create(&o.node, &co).await.unwrap_err().to_string();
    assert!(e.contains("missing.qcow2"), "{e}");
    drop(o);
    assert_eq!(std::fs::read(&img).unwrap(), b"keep me");
}
