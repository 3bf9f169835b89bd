//! `blkdebug`: QEMU's debugging filter. It injects errors after named events
//! and parks requests at breakpoints, which is how tests make races
//! deterministic: park a request, change the graph, look, resume.
//!
//! Events are raised by a parent driver on its edge to this node (a format
//! driver on its `file`, a memory overlay on its `backing`). Options and
//! config-file syntax follow QEMU's `BlockdevOptionsBlkdebug`.

use async_trait::async_trait;
use parking_lot::Mutex;
use sluice_core::perm::ChildPermModel;
use sluice_core::{
    BlockDriver, DebugControl, DebugEvent, DriverStatus, Error, IoBytes, Node, PermPair, ReadBuf,
    Result, Role, WriteFlags, ZeroFlags,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use tokio::sync::{oneshot, Notify};

#[derive(serde::Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InjectErrorOptions {
    pub event: String,
    #[serde(default)]
    pub state: Option<u64>,
    #[serde(default)]
    pub iotype: Option<Vec<String>>,
    #[serde(default)]
    pub errno: Option<i32>,
    #[serde(default)]
    pub sector: Option<i64>,
    #[serde(default)]
    pub once: Option<bool>,
    #[serde(default)]
    pub immediately: Option<bool>,
}

#[derive(serde::Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SetStateOptions {
    pub event: String,
    #[serde(default)]
    pub state: Option<u64>,
    pub new_state: u64,
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlkdebugOptions {
    /// The node below: a node-name or nested options.
    pub image: serde_json::Value,
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub align: Option<u32>,
    #[serde(default)]
    pub inject_error: Vec<InjectErrorOptions>,
    #[serde(default)]
    pub set_state: Vec<SetStateOptions>,
}

/// Which request kinds an error rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    fn parse(s: &str) -> Result<IoType> {
        Ok(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            other => {
                return Err(Error::invalid_option(
                    "blkdebug",
                    format!("invalid iotype '{other}'"),
                ))
            }
        })
    }
}

#[derive(Clone, Debug)]
struct ErrorRule {
    id: u64,
    event: DebugEvent,
    state: u64,
    iotypes: Option<Vec<IoType>>,
    errno: i32,
    offset: Option<u64>,
    once: bool,
}

#[derive(Clone, Debug)]
struct StateRule {
    event: DebugEvent,
    state: u64,
    new_state: u64,
}

struct Parked {
    tag: String,
    wake: oneshot::Sender<()>,
}

#[derive(Default)]
struct Rules {
    errors: Vec<ErrorRule>,
    states: Vec<StateRule>,
    breakpoints: Vec<(DebugEvent, String)>,
    /// Error rules armed by the last event that fired one.
    active: Vec<ErrorRule>,
    parked: Vec<Parked>,
}

pub struct BlkdebugDriver {
    align: u32,
    state: AtomicU64,
    rules: Mutex<Rules>,
    parked_changed: Notify,
    next_id: AtomicU64,
}

fn event_by_name(name: &str) -> Result<DebugEvent> {
    DebugEvent::from_name(name)
        .ok_or_else(|| Error::invalid_option("blkdebug", format!("Invalid event name \"{name}\"")))
}

impl BlkdebugDriver {
    pub fn open(opts: &BlkdebugOptions) -> Result<BlkdebugDriver> {
        let align = opts.align.unwrap_or(1);
        if align == 0 || !align.is_power_of_two() {
            return Err(Error::invalid_option(
                "blkdebug",
                "Cannot meet constraints with align",
            ));
        }
        let d = BlkdebugDriver {
            align,
            state: AtomicU64::new(1),
            rules: Mutex::new(Rules::default()),
            parked_changed: Notify::new(),
            next_id: AtomicU64::new(1),
        };
        let (mut errors, mut states) = (opts.inject_error.clone(), opts.set_state.clone());
        if let Some(path) = &opts.config {
            let text = std::fs::read_to_string(path).map_err(|e| Error::Open {
                file: path.clone(),
                source: e,
            })?;
            let (e, s) = parse_config(&text)
                .map_err(|m| Error::invalid_option("blkdebug", format!("{path}: {m}")))?;
            errors.extend(e);
            states.extend(s);
        }
        for r in &errors {
            d.add_error_rule(r)?;
        }
        for s in &states {
            d.rules.lock().states.push(StateRule {
                event: event_by_name(&s.event)?,
                state: s.state.unwrap_or(0),
                new_state: s.new_state,
            });
        }
        Ok(d)
    }

    fn add_error_rule(&self, r: &InjectErrorOptions) -> Result<()> {
        let iotypes = match &r.iotype {
            Some(list) => Some(
                list.iter()
                    .map(|s| IoType::parse(s))
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        if r.immediately.unwrap_or(false) {
            // QEMU fails the event itself; sluice arms the rule for the
            // next request, which is what tests observe.
        }
        let rule = ErrorRule {
            id: self.next_id.fetch_add(1, SeqCst),
            event: event_by_name(&r.event)?,
            state: r.state.unwrap_or(0),
            iotypes,
            errno: r.errno.unwrap_or(libc::EIO),
            offset: r.sector.filter(|&s| s >= 0).map(|s| s as u64 * 512),
            once: r.once.unwrap_or(false),
        };
        self.rules.lock().errors.push(rule);
        Ok(())
    }

    /// Fails the request if an armed error rule matches it.
    fn check(&self, node: &Node, io: IoType, offset: u64, len: u64) -> Result<()> {
        let mut rules = self.rules.lock();
        let hit = rules.active.iter().position(|r| {
            r.iotypes.as_ref().is_none_or(|t| t.contains(&io))
                && r.offset
                    .is_none_or(|o| o >= offset && o < offset + len.max(1))
        });
        let Some(i) = hit else { return Ok(()) };
        let rule = rules.active[i].clone();
        if rule.once {
            rules.active.remove(i);
            rules.errors.retain(|r| r.id != rule.id);
        }
        Err(Error::io(
            node.name(),
            "blkdebug injected error",
            offset,
            len,
            std::io::Error::from_raw_os_error(rule.errno),
        ))
    }
}

/// Parses QEMU's blkdebug config file: `[inject-error]` and `[set-state]`
/// sections of `key = "value"` lines.
fn parse_config(
    text: &str,
) -> std::result::Result<(Vec<InjectErrorOptions>, Vec<SetStateOptions>), String> {
    let mut errors = Vec::new();
    let mut states = Vec::new();
    let mut section: Option<(String, HashMap<String, String>)> = None;
    let mut flush =
        |s: Option<(String, HashMap<String, String>)>| -> std::result::Result<(), String> {
            let Some((name, kv)) = s else { return Ok(()) };
            let num = |k: &str| -> std::result::Result<Option<i64>, String> {
                kv.get(k)
                    .map(|v| {
                        v.parse::<i64>()
                            .map_err(|_| format!("invalid number for '{k}': {v}"))
                    })
                    .transpose()
            };
            let event = kv.get("event").cloned().ok_or("missing 'event'")?;
            match name.as_str() {
                "inject-error" => errors.push(InjectErrorOptions {
                    event,
                    state: num("state")?.map(|v| v as u64),
                    iotype: kv.get("iotype").map(|v| vec![v.clone()]),
                    errno: num("errno")?.map(|v| v as i32),
                    sector: num("sector")?,
                    once: kv.get("once").map(|v| v == "on" || v == "true"),
                    immediately: kv.get("immediately").map(|v| v == "on" || v == "true"),
                }),
                "set-state" => states.push(SetStateOptions {
                    event,
                    state: num("state")?.map(|v| v as u64),
                    new_state: num("new_state")?.ok_or("missing 'new_state'")? as u64,
                }),
                other => return Err(format!("unknown section [{other}]")),
            }
            Ok(())
        };
    for (lineno, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            flush(section.take())?;
            section = Some((name.trim().to_string(), HashMap::new()));
        } else if let Some((k, v)) = line.split_once('=') {
            let (_, kv) = section
                .as_mut()
                .ok_or(format!("line {}: key outside a section", lineno + 1))?;
            kv.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        } else {
            return Err(format!("line {}: cannot parse '{line}'", lineno + 1));
        }
    }
    flush(section.take())?;
    Ok((errors, states))
}

#[async_trait]
impl BlockDriver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    /// A filter: its child switches on its own.
    async fn reopen(&self, _node: &Node, _read_only: bool) -> Result<()> {
        Ok(())
    }

    fn request_alignment(&self) -> u32 {
        self.align
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn child_perm(&self, _role: Role, parents: PermPair, node_writable: bool) -> PermPair {
        ChildPermModel::Filter.child_perm(parents, node_writable)
    }

    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
        self.check(node, IoType::Read, offset, buf.len() as u64)?;
        node.required_child(Role::File)?.read(offset, buf).await
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        self.check(node, IoType::Write, offset, data.len() as u64)?;
        node.required_child(Role::File)?
            .write(offset, data, flags)
            .await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        self.check(node, IoType::WriteZeroes, offset, len)?;
        node.required_child(Role::File)?
            .write_zeroes(offset, len, flags)
            .await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.check(node, IoType::Discard, offset, len)?;
        node.required_child(Role::File)?.discard(offset, len).await
    }

    async fn flush(&self, node: &Node) -> Result<()> {
        self.check(node, IoType::Flush, 0, 0)?;
        node.required_child(Role::File)?.flush().await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        self.check(node, IoType::BlockStatus, offset, len)?;
        Ok(DriverStatus::Passthrough {
            len,
            child: Role::File,
            offset,
        })
    }

    fn handles_debug_events(&self) -> bool {
        true
    }

    async fn debug_event(&self, _node: &Node, event: DebugEvent) {
        let waits: Vec<oneshot::Receiver<()>> = {
            let mut rules = self.rules.lock();
            let state = self.state.load(SeqCst);
            let mut new_state = state;
            let mut armed = false;
            for r in rules.errors.clone() {
                if r.event == event && (r.state == 0 || r.state == state) {
                    if !armed {
                        rules.active.clear();
                        armed = true;
                    }
                    rules.active.push(r);
                }
            }
            for s in &rules.states {
                if s.event == event && (s.state == 0 || s.state == state) {
                    new_state = s.new_state;
                }
            }
            self.state.store(new_state, SeqCst);
            let mut waits = Vec::new();
            let mut i = 0;
            while i < rules.breakpoints.len() {
                if rules.breakpoints[i].0 == event {
                    let (_, tag) = rules.breakpoints.remove(i);
                    let (tx, rx) = oneshot::channel();
                    rules.parked.push(Parked { tag, wake: tx });
                    waits.push(rx);
                } else {
                    i += 1;
                }
            }
            waits
        };
        if !waits.is_empty() {
            self.parked_changed.notify_waiters();
            for rx in waits {
                let _ = rx.await;
            }
        }
    }

    fn debug_control(&self) -> Option<&dyn DebugControl> {
        Some(self)
    }
}

#[async_trait]
impl DebugControl for BlkdebugDriver {
    fn set_breakpoint(&self, event: DebugEvent, tag: &str) -> Result<()> {
        self.rules.lock().breakpoints.push((event, tag.to_string()));
        Ok(())
    }

    fn remove_breakpoint(&self, tag: &str) -> Result<()> {
        let mut rules = self.rules.lock();
        let before = rules.breakpoints.len() + rules.parked.len();
        rules.breakpoints.retain(|(_, t)| t != tag);
        let (resume, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut rules.parked)
            .into_iter()
            .partition(|p| p.tag == tag);
        rules.parked = keep;
        let removed = before - rules.breakpoints.len() - rules.parked.len();
        drop(rules);
        for p in resume {
            let _ = p.wake.send(());
        }
        if removed == 0 {
            return Err(Error::Other(format!(
                "Could not remove breakpoint {tag}: not found"
            )));
        }
        Ok(())
    }

    fn resume(&self, tag: &str) -> Result<()> {
        let resume: Vec<Parked> = {
            let mut rules = self.rules.lock();
            let (resume, keep) = std::mem::take(&mut rules.parked)
                .into_iter()
                .partition(|p| p.tag == tag);
            rules.parked = keep;
            resume
        };
        if resume.is_empty() {
            return Err(Error::Other(format!(
                "Could not resume request: no request suspended at '{tag}'"
            )));
        }
        for p in resume {
            let _ = p.wake.send(());
        }
        Ok(())
    }

    fn is_suspended(&self, tag: &str) -> bool {
        self.rules.lock().parked.iter().any(|p| p.tag == tag)
    }

    async fn wait_suspended(&self, tag: &str) {
        loop {
            let notified = self.parked_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_suspended(tag) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_config_files() {
        let text = "[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\nonce = \"on\"\n\n[set-state]\nevent = \"l2_load\"\nstate = \"1\"\nnew_state = \"2\"\n";
        let (e, s) = parse_config(text).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].errno, Some(28));
        assert_eq!(e[0].once, Some(true));
        assert_eq!(s[0].new_state, 2);
    }

    #[test]
    fn bad_config_is_an_error() {
        assert!(parse_config("[inject-error]\nerrno = 5\n").is_err());
        assert!(parse_config("[bogus]\nevent = read_aio\n").is_err());
        assert!(parse_config("event = read_aio\n").is_err());
    }

    #[test]
    fn unknown_events_are_refused() {
        let opts = BlkdebugOptions {
            image: serde_json::Value::Null,
            config: None,
            align: None,
            inject_error: vec![InjectErrorOptions {
                event: "no_such_event".into(),
                state: None,
                iotype: None,
                errno: None,
                sector: None,
                once: None,
                immediately: None,
            }],
            set_state: vec![],
        };
        let e = BlkdebugDriver::open(&opts).err().unwrap();
        assert!(e.to_string().contains("Invalid event name"), "{e}");
    }
}
