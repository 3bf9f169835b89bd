//! `sluice img snapshot -c/-a/-d/-l` and `sluice img convert -l` beside
//! qemu-img: the same sequences run with both tools on copies of one
//! image must leave images `qemu-img check` finds clean and `qemu-img
//! compare` finds equal, list the same snapshots, and fail with the same
//! exit code and message; an image snapshotted by one tool is reverted
//! by the other.

mod common;

use common::{
    assert_clean, have, img_create, ok, ok_line, qemu_info, qemu_io, run, same_outcome, sluice,
    temp_dir, text, TempDir,
};
use std::process::Output;

fn qemu(args: &[&str]) -> Output {
    run("qemu-img", args)
}

fn ours(args: &[&str]) -> Output {
    let mut a = vec!["img"];
    a.extend_from_slice(args);
    run(sluice().to_str().unwrap(), &a)
}

/// `sluice img ARGS`, which must succeed.
fn ours_ok(args: &[&str]) {
    let mut a = vec!["img"];
    a.extend_from_slice(args);
    ok(sluice().to_str().unwrap(), &a);
}

fn assert_equal_images(a: &str, b: &str, what: &str) {
    let o = qemu(&["compare", a, b]);
    assert!(
        o.status.success(),
        "{what}: qemu-img compare {a} {b}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `qemu-img snapshot -l`'s rows without the date (images made at
/// different moments): id, tag, VM size, VM clock, icount.
fn rows(img: &str) -> Vec<String> {
    let out = ok("qemu-img", &["snapshot", "-l", img]);
    out.lines()
        .skip(2)
        .map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(t.len(), 8, "{img}: unexpected row {l:?}");
            [t[0], t[1], t[2], t[3], t[6], t[7]].join(" ")
        })
        .collect()
}

/// An 8 MiB qcow2 image with data, a compressed cluster and a zero
/// cluster, and two copies of it for the two tools.
fn images(dir: &TempDir, opts: &str) -> (String, String) {
    let base = dir.file("base.qcow2");
    ok_line(&img_create("qcow2", opts, &base, "8M"));
    ok_line(&qemu_io(
        &base,
        &[
            "write -P 1 0 1M",
            "write -c -P 2 2M 64k",
            "write -P 3 4M 192k",
            "write -z 4M 64k",
        ],
    ));
    let (q, s) = (dir.file("q.qcow2"), dir.file("s.qcow2"));
    std::fs::copy(&base, &q).unwrap();
    std::fs::copy(&base, &s).unwrap();
    (q, s)
}

/// A fresh directory `tag` with [`images`] made with `opts`; `None`
/// without qemu-img and qemu-io.
fn setup(tag: &str, opts: &str) -> Option<(TempDir, String, String)> {
    if !have("qemu-img") || !have("qemu-io") {
        return None;
    }
    let dir = temp_dir(tag);
    let (q, s) = images(&dir, opts);
    Some((dir, q, s))
}

fn write_both(q: &str, s: &str, cmd: &str) {
    for img in [q, s] {
        ok_line(&qemu_io(img, &[cmd]));
    }
}

/// One `snapshot` step by both tools, each on its image; then both
/// images are clean, equal, and list the same snapshots.
fn step(q: &str, s: &str, args: &[&str]) {
    let mut qa = vec!["snapshot"];
    qa.extend_from_slice(args);
    let mut sa = qa.clone();
    qa.push(q);
    sa.push(s);
    let (qo, so) = (qemu(&qa), ours(&sa));
    assert!(qo.status.success(), "qemu-img {qa:?}: {}", text(&qo.stderr));
    // Messages name the file: compare with the names swapped.
    let so_text = |b: &[u8]| text(b).replace(s, q);
    assert_eq!(
        (so.status.code(), so_text(&so.stderr)),
        (qo.status.code(), text(&qo.stderr)),
        "snapshot {args:?}"
    );
    let listing = args.is_empty() || args[0] == "-l";
    if !listing {
        assert!(
            so.stdout.is_empty(),
            "snapshot {args:?}: {}",
            text(&so.stdout)
        );
    }
    assert_clean(q);
    assert_clean(s);
    assert_equal_images(q, s, &format!("after snapshot {args:?}"));
    assert_eq!(rows(q), rows(s), "after snapshot {args:?}");
    // sluice lists its own image as qemu-img does.
    same_outcome(
        &qemu(&["snapshot", "-l", s]),
        &ours(&["snapshot", "-l", s]),
        "snapshot -l",
    );
}

fn sequence(opts: &str) {
    let tag = format!("imgsnap-{}", opts.replace([',', '='], "-"));
    let Some((dir, q, s)) = setup(&tag, opts) else {
        return;
    };
    let original = dir.file("original.raw");
    ok("qemu-img", &["convert", "-O", "raw", &q, &original]);
    step(&q, &s, &["-c", "s1"]);
    write_both(&q, &s, "write -P 9 512k 128k");
    write_both(&q, &s, "write -P 10 2M 4k");
    step(&q, &s, &["-c", "s2"]);
    step(&q, &s, &["-q", "-c", "s2"]);
    assert_eq!(rows(&s).len(), 3, "names may repeat");
    step(&q, &s, &["-l"]);
    step(&q, &s, &[]);
    step(&q, &s, &["-a", "s1"]);
    assert_equal_images(&q, &original, "applied s1");
    write_both(&q, &s, "write -P 11 6M 100k");
    // `-d` takes a name only (an id matches nothing here).
    let (qo, so) = (
        qemu(&["snapshot", "-d", "2", &q]),
        ours(&["snapshot", "-d", "2", &q]),
    );
    same_outcome(&qo, &so, "snapshot -d ID");
    assert!(!qo.status.success());
    step(&q, &s, &["-d", "s2"]);
    step(&q, &s, &["-c", "s4"]);
    step(&q, &s, &["-a", "3"]);
    step(&q, &s, &["-d", "s1"]);
    step(&q, &s, &["-d", "s2"]);
    step(&q, &s, &["-d", "s4"]);
    assert!(rows(&s).is_empty());
}

#[test]
fn sequences_match_qemu_img() {
    sequence("cluster_size=65536");
}

#[test]
fn sequences_match_qemu_img_version_2() {
    sequence("compat=0.10");
}

#[test]
fn sequences_match_qemu_img_small_clusters() {
    sequence("cluster_size=4096,refcount_bits=8");
}

#[test]
fn each_tool_reverts_the_others_snapshots() {
    let Some((dir, q, s)) = setup("imgsnap-cross", "cluster_size=65536") else {
        return;
    };
    let original = dir.file("original.raw");
    ok("qemu-img", &["convert", "-O", "raw", &q, &original]);
    // sluice snapshots, qemu-img reverts and deletes.
    ours_ok(&["snapshot", "-c", "mine", &s]);
    write_both(&q, &s, "write -P 7 0 2M");
    assert_clean(&s);
    ok("qemu-img", &["snapshot", "-a", "mine", &s]);
    assert_clean(&s);
    assert_equal_images(&s, &original, "qemu-img applied sluice's snapshot");
    ok("qemu-img", &["snapshot", "-d", "mine", &s]);
    assert_clean(&s);
    // qemu-img snapshots, sluice reverts and deletes.
    ok("qemu-img", &["convert", "-O", "raw", &q, &original]);
    ok("qemu-img", &["snapshot", "-c", "theirs", &q]);
    write_both(&q, &s, "write -P 8 1M 3M");
    ours_ok(&["snapshot", "-a", "theirs", &q]);
    assert_clean(&q);
    assert_equal_images(&q, &original, "sluice applied qemu-img's snapshot");
    ours_ok(&["snapshot", "-d", "theirs", &q]);
    assert_clean(&q);
    assert!(rows(&q).is_empty() && rows(&s).is_empty());
    // The snapshot table sluice writes is read back by qemu-img alike.
    ours_ok(&["snapshot", "-c", "x", &s]);
    ok("qemu-img", &["snapshot", "-c", "y", &s]);
    ours_ok(&["snapshot", "-c", "z", &s]);
    let listed = rows(&s);
    let ids: Vec<&str> = listed
        .iter()
        .map(|r| r.split(' ').next().unwrap())
        .collect();
    assert_eq!(ids, ["1", "2", "3"]);
    let info = qemu_info(&s, &[]);
    for sn in info["snapshots"].as_array().unwrap() {
        assert_eq!(sn["vm-state-size"], 0);
        assert_eq!(sn["vm-clock-nsec"], 0);
        assert_eq!(sn["icount"], 0, "{sn}");
    }
    assert_clean(&s);
}

#[test]
fn failures_match_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    let dir = temp_dir("imgsnap-fail");
    let (q, s) = images(&dir, "cluster_size=65536");
    ok("qemu-img", &["snapshot", "-c", "s1", &q]);
    std::fs::copy(&q, &s).unwrap();
    let raw = dir.file("r.raw");
    ok_line(&img_create("raw", "", &raw, "1M"));
    let df = dir.file("df.qcow2");
    let data = dir.file("df.data");
    ok_line(&img_create(
        "qcow2",
        &format!("data_file={data}"),
        &df,
        "1M",
    ));
    let missing = dir.file("missing.qcow2");
    let cases: Vec<Vec<&str>> = vec![
        vec!["-a", "nope", &s],
        vec!["-d", "nope", &s],
        vec!["-c", "x", &missing],
        vec!["-a", "x", &missing],
        vec!["-c", "x", &raw],
        vec!["-a", "x", &raw],
        vec!["-d", "x", &raw],
        vec!["-f", "raw", "-a", "x", &raw],
        vec!["-c", "x", &df],
        vec!["-a", "x", &df],
        vec!["-d", "x", &df],
        vec!["-U", "-c", "x", &s],
        vec!["-U", "-a", "s1", &s],
        vec!["-U", "-d", "s1", &s],
        vec!["-l", "-c", "x", &s],
        vec!["-c", "x", &s, &q],
        vec!["-c", "x"],
        vec!["-f", "raw", "-c", "x", &s],
        vec!["-U", "-l", &s],
        vec!["-l", &raw],
    ];
    for args in cases {
        let mut a = vec!["snapshot"];
        a.extend_from_slice(&args);
        let (qo, so) = (qemu(&a), ours(&a));
        if args.len() > 1 && args[0] != "-U" && args[0] != "-l" {
            assert!(!qo.status.success(), "qemu-img {a:?} should fail");
        }
        same_outcome(&qo, &so, &format!("snapshot {args:?}"));
    }
    // Nothing changed the image.
    assert_clean(&s);
    assert_eq!(rows(&s), rows(&q));
    assert_equal_images(&s, &q, "after the failures");
}

#[test]
fn convert_from_a_snapshot_matches_qemu_img() {
    let Some((dir, img, _)) = setup("imgsnap-convert", "cluster_size=65536") else {
        return;
    };
    // s1 at 8 MiB, then the disk grows, then s2 by sluice.
    ok("qemu-img", &["snapshot", "-c", "s1", &img]);
    ok("qemu-img", &["resize", "-q", &img, "12M"]);
    ok_line(&qemu_io(&img, &["write -P 5 0 64k", "write -P 6 10M 64k"]));
    ours_ok(&["snapshot", "-c", "s2", &img]);
    ok_line(&qemu_io(&img, &["write -P 7 64k 64k"]));
    let raw = dir.file("r.raw");
    ok_line(&img_create("raw", "", &raw, "1M"));
    let (oq, os) = (dir.file("oq.img"), dir.file("os.img"));
    // (`-l` parameter, sources): the image alone, then other sources.
    let mut cases: Vec<(&str, Vec<&str>)> = [
        "s1",
        "1",
        "s2",
        "snapshot.id=2",
        "snapshot.name=s1",
        "snapshot.id=1,snapshot.name=s1",
        "snapshot.id=1,snapshot.name=s2",
        "nope",
        "snapshot.name=nope",
        "snapshot.foo=1",
        "snapshot.name=s1,foo=1",
        "snapshot.id",
    ]
    .into_iter()
    .map(|param| (param, vec![img.as_str()]))
    .collect();
    cases.extend([
        ("s1", vec![img.as_str(), &img]),
        ("snapshot.id=1", vec![&img, &raw]),
        ("s1", vec![&raw]),
    ]);
    let mut converted = 0;
    for (param, srcs) in cases {
        for fmt in ["raw", "qcow2"] {
            let _ = std::fs::remove_file(&oq);
            let _ = std::fs::remove_file(&os);
            let mut qa = vec!["convert", "-l", param, "-O", fmt];
            qa.extend_from_slice(&srcs);
            let mut sa = qa.clone();
            qa.push(&oq);
            sa.push(&os);
            let (qo, so) = (qemu(&qa), ours(&sa));
            assert_eq!(
                (qo.status.code(), text(&qo.stderr)),
                (so.status.code(), text(&so.stderr).replace(&os, &oq)),
                "convert -l {param} {srcs:?} -O {fmt}"
            );
            assert_eq!(
                std::path::Path::new(&oq).exists(),
                std::path::Path::new(&os).exists(),
                "convert -l {param}: output made by one tool only"
            );
            if qo.status.success() {
                converted += 1;
                let o = qemu(&["compare", "-f", fmt, "-F", fmt, &oq, &os]);
                assert!(
                    o.status.success(),
                    "convert -l {param} {srcs:?} -O {fmt}: outputs differ: {}",
                    text(&o.stdout)
                );
                let size = |p: &str| qemu_info(p, &["-f", fmt])["virtual-size"].as_u64().unwrap();
                assert_eq!(size(&oq), size(&os), "convert -l {param}: sizes");
            }
        }
    }
    assert_eq!(converted, 14, "the cases that convert");
    // The snapshot is what it held, not the active layer.
    ours_ok(&["convert", "-l", "s1", "-O", "raw", &img, &os]);
    ok("qemu-img", &["convert", "-O", "raw", &img, &oq]);
    let (a, b) = (std::fs::read(&os).unwrap(), std::fs::read(&oq).unwrap());
    assert_eq!(a.len(), b.len(), "the virtual size stays the image's");
    assert_ne!(a[..65536], b[..65536], "s1 predates the later writes");
    assert!(a[..65536].iter().all(|&x| x == 1));
}
