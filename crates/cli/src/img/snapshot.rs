//! `sluice img snapshot`: lists, creates, applies and deletes a qcow2
//! image's internal snapshots as qemu-img does (its messages and exit
//! codes); `load_tmp` is `convert -l`'s read-only load of one.

use super::common::{self, MetaImage, OpenSpec};
use super::info::{qcow2_facts, snapshot_table};
use sluice_core::{Node, Role};
use sluice_qcow2::detached::Detached;
use sluice_qcow2::snapshot::{self as snap, SnapshotError};
use sluice_qcow2::{Qcow2Driver, Qcow2Options};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Apply (revert to) a snapshot.
    #[arg(short = 'a')]
    apply: Option<String>,
    /// Create a snapshot.
    #[arg(short = 'c')]
    create: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd')]
    delete: Option<String>,
    #[arg(short = 'f')]
    format: Option<String>,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    filenames: Vec<String>,
}

/// What `-c`, `-a` or `-d` asks for.
enum Action {
    Create(String),
    Apply(String),
    Delete(String),
}

pub fn run(args: SnapshotArgs) -> ExitCode {
    let _ = (&args.object, args.quiet);
    let actions = usize::from(args.list)
        + usize::from(args.apply.is_some())
        + usize::from(args.create.is_some())
        + usize::from(args.delete.is_some());
    if actions > 1 {
        return common::usage("snapshot", "Cannot mix '-l', '-a', '-c', '-d'");
    }
    let [filename] = args.filenames.as_slice() else {
        return common::usage("snapshot", "Expecting one image file name");
    };
    let action = match (&args.create, &args.apply, &args.delete) {
        (Some(c), _, _) => Action::Create(c.clone()),
        (_, Some(a), _) => Action::Apply(a.clone()),
        (_, _, Some(d)) => Action::Delete(d.clone()),
        _ => return list(&args, filename),
    };
    let spec = OpenSpec {
        name: filename.clone(),
        format: args.format.clone(),
        image_opts: args.image_opts,
        force_share: args.force_share,
        writable: true,
        no_backing: true,
        ..OpenSpec::default()
    };
    if let Err(e) = common::backing_chain_opens(&spec) {
        return common::fail(1, &e);
    }
    let probed = (args.format.is_none() && !args.image_opts).then(|| filename.clone());
    let res = common::block_on(async move {
        match common::open_metadata(&spec).await? {
            MetaImage::Qcow2(img) => {
                let done = change(&img.image, &action).await;
                done.and(img.close().await)
            }
            MetaImage::Other(img) => {
                let done = refuse(&img.node(), &action, probed.as_deref());
                done.and(img.close().await)
            }
        }
    });
    match res.and_then(|r| r) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => common::fail(1, &e),
    }
}

fn list(args: &SnapshotArgs, filename: &str) -> ExitCode {
    let spec = OpenSpec {
        name: filename.to_string(),
        format: args.format.clone(),
        image_opts: args.image_opts,
        force_share: args.force_share,
        no_backing: true,
        ..OpenSpec::default()
    };
    if let Err(e) = common::backing_chain_opens(&spec) {
        return common::fail(1, &e);
    }
    let res = common::block_on(async move {
        let img = common::open(&spec).await?;
        let facts = qcow2_facts(&img.node()).await;
        let _ = img.close().await;
        facts
    });
    match res.and_then(|r| r) {
        Ok(Some(f)) if !f.snapshots.is_empty() && !f.header.has_data_file() => {
            print!("Snapshot list:\n{}", snapshot_table(&f.snapshots));
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => common::fail(1, &e),
    }
}

/// QEMU keeps at most 255 bytes of a new snapshot's name.
fn truncate_name(name: &str) -> &str {
    let mut end = name.len().min(255);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// `-c`, `-a` or `-d` on a qcow2 image, through its one driver.
async fn change(img: &Detached, action: &Action) -> Result<(), String> {
    let d = &img.driver;
    let file = img.file().map_err(|e| e.to_string())?;
    match action {
        Action::Create(name) => snap::create(d, &file, truncate_name(name), snap::now())
            .await
            .map(drop)
            .map_err(|e| format!("Could not create snapshot '{name}': {e}")),
        Action::Apply(name) => snap::apply(d, &file, name).await.map(drop).map_err(|e| {
            format!("Could not apply snapshot '{name}': Failed to load snapshot: {e}")
        }),
        Action::Delete(name) => {
            let not_found = || format!("Could not delete snapshot '{name}': snapshot not found");
            // As bdrv_snapshot_find: by name only (`-a` also takes an
            // id, `-d` does not); images whose snapshots cannot be
            // listed have none to find.
            let snaps = d.snapshots();
            match snap::find_by_id_and_name(snaps, None, Some(name)) {
                _ if d.header().has_data_file() => Err(not_found()),
                None => Err(not_found()),
                Some(i) => {
                    let (id, sname) = (snaps[i].id.clone(), snaps[i].name.clone());
                    snap::delete(d, &file, Some(&id), Some(&sname))
                        .await
                        .map(drop)
                        .map_err(|e| format!("Could not delete snapshot '{name}': {e}"))
                }
            }
        }
    }
}

/// `-c`, `-a` or `-d` on an image of another format, which has no
/// internal snapshots: qemu-img's refusals.
fn refuse(node: &Node, action: &Action, probed: Option<&str>) -> Result<(), String> {
    match action {
        Action::Create(name) => Err(format!(
            "Could not create snapshot '{name}': {}",
            SnapshotError::NotSupported
        )),
        Action::Apply(name) => {
            // QEMU reopens the format driver over its file to try the
            // file's snapshots: a probed raw image warns again.
            if let Some(name) = probed.filter(|_| node.driver_name() == "raw") {
                eprintln!("WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.");
            }
            Err(format!(
                "Could not apply snapshot '{name}': Block driver does not support snapshots"
            ))
        }
        Action::Delete(name) => Err(format!(
            "Could not delete snapshot '{name}': snapshot not found"
        )),
    }
}

/// `convert -l`: which snapshot to read (qemu-img's snapshot param).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotParam {
    /// `snapshot.id=ID` and/or `snapshot.name=NAME`.
    IdAndName(Option<String>, Option<String>),
    /// A bare id or name.
    IdOrName(String),
}

impl SnapshotParam {
    /// Parses `-l`'s argument as qemu-img does: `snapshot.`-prefixed
    /// key=value options, else an id or name.
    pub fn parse(arg: &str) -> Result<SnapshotParam, String> {
        if !arg.starts_with("snapshot.") {
            return Ok(SnapshotParam::IdOrName(arg.to_string()));
        }
        let pairs = common::parse_o_list(&[arg.to_string()]).or_else(|_| {
            // A key without a value is a boolean "on" (deprecated).
            Ok::<_, String>(
                arg.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| match s.split_once('=') {
                        Some((k, v)) => (k.to_string(), v.to_string()),
                        None => {
                            common::error(&format!(
                                "warning: short-form boolean option '{s}' deprecated"
                            ));
                            eprintln!("Please use {s}=on instead");
                            (s.to_string(), "on".to_string())
                        }
                    })
                    .collect(),
            )
        })?;
        let (mut id, mut name) = (None, None);
        for (k, v) in pairs {
            match k.as_str() {
                "snapshot.id" => id = Some(v),
                "snapshot.name" => name = Some(v),
                _ => {
                    return Err(format!(
                    "Invalid parameter '{k}'\nqemu-img: Failed in parsing snapshot param '{arg}'"
                ))
                }
            }
        }
        Ok(SnapshotParam::IdAndName(id, name))
    }
}

/// Makes `img` read the snapshot `param` names instead of its active
/// layer (QEMU's `bdrv_snapshot_load_tmp`): a read-only qcow2 node of its
/// own, on the same children, takes the image's place, and the image's
/// node is deleted in the same drained transaction, so one qcow2 driver
/// is left on the file (both are read-only: neither writes).
pub async fn load_tmp(img: &mut common::Image, param: &SnapshotParam) -> Result<(), String> {
    let failed = |e: String| format!("Failed to load snapshot: {e}");
    let old = img.node();
    let file = match old.child(Role::File) {
        Some(file) if old.driver_name() == "qcow2" => file,
        _ => {
            return Err(failed(format!(
                "Block format '{}' used by device '' does not support temporarily loading internal snapshots",
                old.driver_name()
            )))
        }
    };
    let opts = Qcow2Options {
        file: serde_json::Value::String(file.name().to_string()),
        ..Default::default()
    };
    let d = Qcow2Driver::open(&file, &opts, true)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let loaded = match param {
        SnapshotParam::IdAndName(id, name) => {
            d.load_snapshot(&file, id.as_deref(), name.as_deref()).await
        }
        SnapshotParam::IdOrName(s) => match d.load_snapshot(&file, Some(s), None).await {
            Err(SnapshotError::Refused(_) | SnapshotError::NotFound) => {
                d.load_snapshot(&file, None, Some(s)).await
            }
            other => other,
        },
    };
    loaded.map_err(|e| failed(e.to_string()))?;
    let children: Vec<(Role, Arc<Node>)> = [Role::File, Role::Data, Role::Backing]
        .into_iter()
        .filter_map(|r| old.child(r).map(|c| (r, c)))
        .collect();
    let w = img.graph.writer().await;
    let drained = w.drain(&old).await;
    let mut tx = w.transaction();
    let new = tx
        .add_node(sluice_core::NodeSpec {
            name: None,
            driver: Box::new(d),
            size: old.size(),
            read_only: true,
            children,
            implicit: false,
        })
        .map_err(|e| failed(e.to_string()))?;
    tx.replace_node(&drained, &old, &new)
        .and_then(|()| tx.delete_node(&drained, &old))
        .map_err(|e| failed(e.to_string()))?;
    tx.commit().await.map_err(|e| failed(e.to_string()))?;
    drop(drained);
    img.top = new;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_params_parse_as_qemu_img() {
        assert_eq!(
            SnapshotParam::parse("s1").unwrap(),
            SnapshotParam::IdOrName("s1".into())
        );
        assert_eq!(
            SnapshotParam::parse("snapshot.id=1,snapshot.name=a").unwrap(),
            SnapshotParam::IdAndName(Some("1".into()), Some("a".into()))
        );
        assert_eq!(
            SnapshotParam::parse("snapshot.id").unwrap(),
            SnapshotParam::IdAndName(Some("on".into()), None)
        );
        let e = SnapshotParam::parse("snapshot.name=s1,foo=1").unwrap_err();
        assert!(e.starts_with("Invalid parameter 'foo'"), "{e}");
        assert_eq!(truncate_name(&"é".repeat(200)).len(), 254);
    }
}
