//! `throttle`: I/O limits shared by a group of nodes (QEMU's
//! `block/throttle.c`, `block/throttle-groups.c`, `util/throttle.c`).
//!
//! A throttle group (`--object throttle-group,id=tg0,limits.iops-total=100`)
//! holds six leaky buckets — bytes and operations, each total, read and
//! write — with QEMU's semantics: a bucket leaks `avg` units per second;
//! a request may start while the bucket holds at most `max * max-length`
//! units (`avg / 10` without a burst rate), and with a burst longer than a
//! second also while a second bucket, leaking at `max`, holds at most
//! `max / 10`. A request that may not start waits in its node's queue; the
//! group serves its members' queues round-robin, one timer per direction,
//! as QEMU's tokens do.
//!
//! Groups live in a process-wide registry keyed by name, as QEMU's list of
//! groups does; `sluice_control::objects` creates and deletes them.
//!
//! A drained section lets queued requests through without waiting for the
//! limits (QEMU's `throttle_drain_begin`): a drain must not wait on a
//! timer. `BlockDriver::drained_begin` releases the node's queues, and a
//! request arriving while the node is drained does not queue.

use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use sluice_core::{
    BlockDriver, DriverStatus, Error, IoBytes, Node, ReadBuf, Result, Role, WriteFlags, ZeroFlags,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Largest rate or burst QEMU accepts (`THROTTLE_VALUE_MAX`).
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

const NS_PER_SEC: f64 = 1e9;

/// Bucket indexes, in QEMU's `BucketType` order.
const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const OPS_TOTAL: usize = 3;
const OPS_READ: usize = 4;
const OPS_WRITE: usize = 5;
const BUCKETS: usize = 6;

/// Which way a request moves data; reads and writes queue apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read = 0,
    Write = 1,
}

/// One bucket's configured limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketLimit {
    /// Units per second, 0 for no limit.
    pub avg: u64,
    /// Burst rate, 0 for none.
    pub max: u64,
    /// Seconds a burst at `max` may last.
    pub burst_length: u64,
}

impl Default for BucketLimit {
    fn default() -> BucketLimit {
        BucketLimit {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A group's limits, as the user set them (QEMU's `ThrottleConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    pub buckets: [BucketLimit; BUCKETS],
    /// Bytes one operation counts for (`iops-size`); larger requests count
    /// as several.
    pub op_size: u64,
}

/// Which part of a bucket a `ThrottleLimits` member sets.
#[derive(Clone, Copy)]
enum Field {
    Avg(usize),
    Max(usize),
    Length(usize),
    OpSize,
}

/// `ThrottleLimits` members in the order QEMU applies them.
const LIMITS: &[(&str, Field)] = &[
    ("bps-total", Field::Avg(BPS_TOTAL)),
    ("bps-read", Field::Avg(BPS_READ)),
    ("bps-write", Field::Avg(BPS_WRITE)),
    ("iops-total", Field::Avg(OPS_TOTAL)),
    ("iops-read", Field::Avg(OPS_READ)),
    ("iops-write", Field::Avg(OPS_WRITE)),
    ("bps-total-max", Field::Max(BPS_TOTAL)),
    ("bps-read-max", Field::Max(BPS_READ)),
    ("bps-write-max", Field::Max(BPS_WRITE)),
    ("iops-total-max", Field::Max(OPS_TOTAL)),
    ("iops-read-max", Field::Max(OPS_READ)),
    ("iops-write-max", Field::Max(OPS_WRITE)),
    ("bps-total-max-length", Field::Length(BPS_TOTAL)),
    ("bps-read-max-length", Field::Length(BPS_READ)),
    ("bps-write-max-length", Field::Length(BPS_WRITE)),
    ("iops-total-max-length", Field::Length(OPS_TOTAL)),
    ("iops-read-max-length", Field::Length(OPS_READ)),
    ("iops-write-max-length", Field::Length(OPS_WRITE)),
    ("iops-size", Field::OpSize),
];

/// An integer option: JSON numbers from QMP; from the command line
/// (`strings`), text as QEMU's keyval visitor reads it.
pub fn int_option(v: &Value, key: &str, strings: bool) -> std::result::Result<i64, String> {
    let type_error = || format!("Invalid parameter type for '{key}', expected: integer");
    match v {
        Value::Number(n) => n.as_i64().ok_or_else(type_error),
        Value::String(s) if strings => {
            let t = s.trim();
            let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => i64::from_str_radix(hex, 16),
                None => t.parse::<i64>(),
            };
            parsed.map_err(|_| format!("Parameter '{key}' expects integer"))
        }
        _ => Err(type_error()),
    }
}

impl ThrottleConfig {
    fn get(&self, field: Field) -> u64 {
        match field {
            Field::Avg(b) => self.buckets[b].avg,
            Field::Max(b) => self.buckets[b].max,
            Field::Length(b) => self.buckets[b].burst_length,
            Field::OpSize => self.op_size,
        }
    }

    /// Sets members of a `ThrottleLimits` object over this configuration
    /// and checks the result (QEMU's `throttle_limits_to_config`); `prefix`
    /// names the object in messages (`limits.`).
    pub fn apply_limits(
        &mut self,
        limits: &Map<String, Value>,
        prefix: &str,
        strings: bool,
    ) -> std::result::Result<(), String> {
        if let Some(k) = limits.keys().find(|k| !LIMITS.iter().any(|(n, _)| n == k)) {
            return Err(format!("Parameter '{prefix}{k}' is unexpected"));
        }
        let mut values = Vec::new();
        for (name, field) in LIMITS {
            if let Some(v) = limits.get(*name) {
                values.push((
                    *name,
                    *field,
                    int_option(v, &format!("{prefix}{name}"), strings)?,
                ));
            }
        }
        for (name, field, value) in values {
            match field {
                Field::Length(b) => {
                    if !(0..=i64::from(u32::MAX)).contains(&value) {
                        return Err(format!(
                            "{name} value must be in the range [0, {}]",
                            u32::MAX
                        ));
                    }
                    self.buckets[b].burst_length = value as u64;
                }
                // Negative rates are refused by the check below.
                Field::Avg(b) => self.buckets[b].avg = value.max(-1) as u64,
                Field::Max(b) => self.buckets[b].max = value.max(-1) as u64,
                Field::OpSize => self.op_size = value.max(0) as u64,
            }
        }
        self.validate()
    }

    /// Sets one legacy `x-` property (`x-iops-total`, ...), as
    /// `object-add` and `--object` take them before the object is complete.
    /// Returns whether `key` is such a property.
    pub fn set_legacy(
        &mut self,
        key: &str,
        v: &Value,
        strings: bool,
    ) -> std::result::Result<bool, String> {
        let Some((_, field)) = key
            .strip_prefix("x-")
            .and_then(|k| LIMITS.iter().find(|(n, _)| *n == k))
        else {
            return Ok(false);
        };
        let value = int_option(v, key, strings)?;
        if value < 0 {
            return Err("Property values cannot be negative".into());
        }
        let value = value as u64;
        match *field {
            Field::Avg(b) => self.buckets[b].avg = value,
            Field::Max(b) => self.buckets[b].max = value,
            Field::Length(b) => {
                if value > u64::from(u32::MAX) {
                    // QEMU's wording, missing space included.
                    return Err(format!("{key} value must be in therange [0, {}]", u32::MAX));
                }
                self.buckets[b].burst_length = value;
            }
            Field::OpSize => self.op_size = value,
        }
        Ok(true)
    }

    /// The value of a legacy `x-` property, if `key` is one.
    pub fn get_legacy(&self, key: &str) -> Option<u64> {
        let (_, field) = LIMITS
            .iter()
            .find(|(n, _)| Some(*n) == key.strip_prefix("x-"))?;
        Some(self.get(*field))
    }

    /// Every `ThrottleLimits` member, as `qom-get` shows them.
    pub fn to_limits(&self) -> Value {
        Value::Object(
            LIMITS
                .iter()
                .map(|(n, f)| (n.to_string(), Value::from(self.get(*f))))
                .collect(),
        )
    }

    /// QEMU's `throttle_is_valid`, with its messages.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let b = &self.buckets;
        let conflict = |total: usize, read: usize, write: usize, f: fn(&BucketLimit) -> u64| {
            f(&b[total]) != 0 && (f(&b[read]) != 0 || f(&b[write]) != 0)
        };
        if conflict(BPS_TOTAL, BPS_READ, BPS_WRITE, |x| x.avg)
            || conflict(OPS_TOTAL, OPS_READ, OPS_WRITE, |x| x.avg)
            || conflict(BPS_TOTAL, BPS_READ, BPS_WRITE, |x| x.max)
            || conflict(OPS_TOTAL, OPS_READ, OPS_WRITE, |x| x.max)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.op_size != 0
            && b[OPS_TOTAL].avg == 0
            && b[OPS_READ].avg == 0
            && b[OPS_WRITE].avg == 0
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for k in b {
            if k.avg > THROTTLE_VALUE_MAX || k.max > THROTTLE_VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if k.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if k.burst_length > 1 && k.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if k.max != 0 && k.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if k.max != 0 && k.max < k.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

/// Fill levels of one bucket.
#[derive(Clone, Copy, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

/// Buckets a request of each direction is checked against.
const CHECKED: [[usize; 4]; 2] = [
    [BPS_TOTAL, OPS_TOTAL, BPS_READ, OPS_READ],
    [BPS_TOTAL, OPS_TOTAL, BPS_WRITE, OPS_WRITE],
];

/// Nanoseconds to wait before a request may start, for one bucket
/// (QEMU's `throttle_compute_wait`).
fn bucket_wait(limit: &BucketLimit, level: &Level) -> u64 {
    if limit.avg == 0 {
        return 0;
    }
    let (size, burst_size) = if limit.max == 0 {
        // Short bursts are allowed even without a burst rate.
        (limit.avg as f64 / 10.0, 0.0)
    } else {
        (
            limit.max as f64 * limit.burst_length as f64,
            limit.max as f64 / 10.0,
        )
    };
    let extra = level.level - size;
    if extra > 0.0 {
        return (extra * NS_PER_SEC / limit.avg as f64) as u64;
    }
    if limit.burst_length > 1 {
        let extra = level.burst_level - burst_size;
        if extra > 0.0 {
            return (extra * NS_PER_SEC / limit.max as f64) as u64;
        }
    }
    0
}

/// A request waiting for the limits.
struct Waiter {
    id: u64,
    bytes: u64,
    go: oneshot::Sender<()>,
}

/// A node in the group, with its queued requests per direction.
struct MemberQueues {
    id: u64,
    queues: [VecDeque<Waiter>; 2],
}

struct GroupState {
    cfg: ThrottleConfig,
    levels: [Level; BUCKETS],
    previous_leak: Instant,
    /// Members in the order they joined: the round-robin order.
    members: Vec<MemberQueues>,
    /// Per direction, the member served last.
    tokens: [u64; 2],
    timer_armed: [bool; 2],
    /// Per direction, which armed timer is current; older ones are void.
    timer_gen: [u64; 2],
    next_id: u64,
}

impl GroupState {
    fn leak(&mut self, now: Instant) {
        let delta = now.saturating_duration_since(self.previous_leak).as_nanos() as f64;
        self.previous_leak = self.previous_leak.max(now);
        if delta <= 0.0 {
            return;
        }
        for (limit, level) in self.cfg.buckets.iter().zip(self.levels.iter_mut()) {
            level.level = (level.level - limit.avg as f64 * delta / NS_PER_SEC).max(0.0);
            if limit.burst_length > 1 {
                level.burst_level =
                    (level.burst_level - limit.max as f64 * delta / NS_PER_SEC).max(0.0);
            }
        }
    }

    fn wait_ns(&self, dir: Direction) -> u64 {
        CHECKED[dir as usize]
            .iter()
            .map(|&b| bucket_wait(&self.cfg.buckets[b], &self.levels[b]))
            .max()
            .unwrap_or(0)
    }

    /// Counts a request that starts now (QEMU's `throttle_account`).
    fn account(&mut self, dir: Direction, bytes: u64) {
        let op_size = self.cfg.op_size;
        let units = if op_size != 0 && bytes > op_size {
            bytes as f64 / op_size as f64
        } else {
            1.0
        };
        let (b, o) = match dir {
            Direction::Read => (BPS_READ, OPS_READ),
            Direction::Write => (BPS_WRITE, OPS_WRITE),
        };
        for (bucket, amount) in [
            (BPS_TOTAL, bytes as f64),
            (b, bytes as f64),
            (OPS_TOTAL, units),
            (o, units),
        ] {
            let level = &mut self.levels[bucket];
            level.level += amount;
            if self.cfg.buckets[bucket].burst_length > 1 {
                level.burst_level += amount;
            }
        }
    }

    fn any_pending(&self, dir: Direction) -> bool {
        self.members
            .iter()
            .any(|m| !m.queues[dir as usize].is_empty())
    }

    /// The next member with requests queued in `dir`, round-robin: the
    /// token first if `token_first` (its timer fired), else the members
    /// after it, the token itself last.
    fn next_token(&self, dir: Direction, token_first: bool) -> Option<usize> {
        let n = self.members.len();
        let start = self
            .members
            .iter()
            .position(|m| m.id == self.tokens[dir as usize])
            .unwrap_or(n.saturating_sub(1));
        let skip = usize::from(!token_first);
        (skip..n + skip)
            .map(|i| (start + i) % n)
            .find(|&i| !self.members[i].queues[dir as usize].is_empty())
    }

    fn member(&mut self, id: u64) -> Option<&mut MemberQueues> {
        self.members.iter_mut().find(|m| m.id == id)
    }
}

/// A throttle group: limits and fill levels shared by its member nodes.
pub struct ThrottleGroup {
    name: String,
    state: Mutex<GroupState>,
}

impl ThrottleGroup {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limits as the user set them.
    pub fn config(&self) -> ThrottleConfig {
        self.state.lock().cfg.clone()
    }

    /// Nodes using the group.
    pub fn member_count(&self) -> usize {
        self.state.lock().members.len()
    }

    /// Replaces the limits (`qom-set ... limits`): levels start empty, as
    /// in QEMU's `throttle_config`, and queued requests are looked at again.
    pub fn set_config(self: &Arc<Self>, cfg: ThrottleConfig) {
        let mut st = self.state.lock();
        st.cfg = cfg;
        st.levels = [Level::default(); BUCKETS];
        st.previous_leak = Instant::now();
        for dir in [Direction::Read, Direction::Write] {
            st.timer_armed[dir as usize] = false;
            st.timer_gen[dir as usize] += 1;
            self.schedule_next(&mut st, dir, false);
        }
    }

    /// Lets queued requests of `dir` go while the limits allow, round-robin
    /// between members; arms the direction's timer for the next one
    /// (QEMU's `schedule_next_request`). When `timer_fired`, the member
    /// the timer was armed for goes first.
    fn schedule_next(self: &Arc<Self>, st: &mut GroupState, dir: Direction, timer_fired: bool) {
        let d = dir as usize;
        let mut token_first = timer_fired;
        while let Some(idx) = st.next_token(dir, std::mem::take(&mut token_first)) {
            let now = Instant::now();
            st.leak(now);
            st.tokens[d] = st.members[idx].id;
            let wait = st.wait_ns(dir);
            if wait > 0 {
                st.timer_armed[d] = true;
                st.timer_gen[d] += 1;
                let gen = st.timer_gen[d];
                let group = self.clone();
                // A wait beyond what the clock can hold is a year: it is
                // looked at again then.
                let at = now
                    .checked_add(Duration::from_nanos(wait))
                    .unwrap_or(now + Duration::from_secs(365 * 86400));
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    group.timer_fired(dir, gen);
                });
                return;
            }
            let Some(w) = st.members[idx].queues[d].pop_front() else {
                break;
            };
            if w.go.is_closed() {
                continue;
            }
            st.account(dir, w.bytes);
            let _ = w.go.send(());
        }
    }

    fn timer_fired(self: &Arc<Self>, dir: Direction, gen: u64) {
        let mut st = self.state.lock();
        let d = dir as usize;
        if !st.timer_armed[d] || st.timer_gen[d] != gen {
            return;
        }
        st.timer_armed[d] = false;
        self.schedule_next(&mut st, dir, true);
    }

    /// Takes a queued request out of its queue; `start` counts it as
    /// started. Returns false if it was no longer queued (it was let go).
    fn unqueue(self: &Arc<Self>, member: u64, dir: Direction, id: u64, start: bool) -> bool {
        let mut st = self.state.lock();
        let Some(m) = st.member(member) else {
            return false;
        };
        let q = &mut m.queues[dir as usize];
        let Some(pos) = q.iter().position(|w| w.id == id) else {
            return false;
        };
        let Some(w) = q.remove(pos) else {
            return false;
        };
        if start {
            st.account(dir, w.bytes);
        }
        true
    }
}

/// The registry of groups, by name (QEMU's `throttle_groups` list).
static GROUPS: LazyLock<Mutex<HashMap<String, Arc<ThrottleGroup>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Why a group cannot be removed.
#[derive(Debug, PartialEq, Eq)]
pub enum RemoveError {
    NotFound,
    InUse,
}

/// Creates group `name` with validated limits; `None` if the name is taken.
pub fn create_group(name: &str, cfg: ThrottleConfig) -> Option<Arc<ThrottleGroup>> {
    let mut groups = GROUPS.lock();
    if groups.contains_key(name) {
        return None;
    }
    let g = Arc::new(ThrottleGroup {
        name: name.to_string(),
        state: Mutex::new(GroupState {
            cfg,
            levels: [Level::default(); BUCKETS],
            previous_leak: Instant::now(),
            members: Vec::new(),
            tokens: [0; 2],
            timer_armed: [false; 2],
            timer_gen: [0; 2],
            next_id: 1,
        }),
    });
    groups.insert(name.to_string(), g.clone());
    Some(g)
}

pub fn find_group(name: &str) -> Option<Arc<ThrottleGroup>> {
    GROUPS.lock().get(name).cloned()
}

/// Removes group `name` unless a node uses it.
pub fn remove_group(name: &str) -> std::result::Result<(), RemoveError> {
    let mut groups = GROUPS.lock();
    let g = groups.get(name).ok_or(RemoveError::NotFound)?;
    if g.member_count() > 0 {
        return Err(RemoveError::InUse);
    }
    groups.remove(name);
    Ok(())
}

/// A node's membership in a group; leaving is idempotent.
pub struct ThrottleMember {
    group: Arc<ThrottleGroup>,
    id: u64,
    left: AtomicBool,
}

impl ThrottleMember {
    /// Joins group `name` (looked up and joined under the registry lock, so
    /// a concurrent removal sees the member).
    pub fn join(name: &str) -> Result<ThrottleMember> {
        let groups = GROUPS.lock();
        let group = groups
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Other(format!("Throttle group '{name}' does not exist")))?;
        let id = {
            let mut st = group.state.lock();
            let id = st.next_id;
            st.next_id += 1;
            st.members.push(MemberQueues {
                id,
                queues: [VecDeque::new(), VecDeque::new()],
            });
            id
        };
        drop(groups);
        Ok(ThrottleMember {
            group,
            id,
            left: AtomicBool::new(false),
        })
    }

    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    /// Leaves the group; queued requests (there are none once the node is
    /// drained) are let go.
    pub fn leave(&self) {
        if self.left.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut st = self.group.state.lock();
        if let Some(pos) = st.members.iter().position(|m| m.id == self.id) {
            let m = st.members.remove(pos);
            for w in m.queues.into_iter().flatten() {
                let _ = w.go.send(());
            }
        }
    }

    /// Lets every request queued by this member go at once, counted
    /// against the limits (a drain began: QEMU's `throttle_drain_begin`
    /// restarting the queues with limits off).
    pub fn release(&self) {
        let mut st = self.group.state.lock();
        let Some(m) = st.member(self.id) else {
            return;
        };
        let queues = std::mem::take(&mut m.queues);
        for (d, q) in queues.into_iter().enumerate() {
            let dir = if d == Direction::Read as usize {
                Direction::Read
            } else {
                Direction::Write
            };
            for w in q {
                st.account(dir, w.bytes);
                let _ = w.go.send(());
            }
        }
    }

    /// Waits until a request of `bytes` in `dir` may start under the
    /// group's limits, and counts it (QEMU's
    /// `throttle_group_co_io_limits_intercept`). While `quiesced()` says
    /// the node is drained, the request does not wait.
    pub async fn intercept(&self, bytes: u64, dir: Direction, quiesced: impl Fn() -> bool) {
        let d = dir as usize;
        let (id, mut go) = {
            let mut st = self.group.state.lock();
            if quiesced() || self.left.load(Ordering::SeqCst) {
                st.account(dir, bytes);
                return;
            }
            if !st.timer_armed[d] && !st.any_pending(dir) {
                st.leak(Instant::now());
                if st.wait_ns(dir) == 0 {
                    st.account(dir, bytes);
                    return;
                }
            }
            let id = st.next_id;
            st.next_id += 1;
            let (tx, rx) = oneshot::channel();
            let Some(m) = st.member(self.id) else {
                return;
            };
            m.queues[d].push_back(Waiter { id, bytes, go: tx });
            if !st.timer_armed[d] {
                self.group.schedule_next(&mut st, dir, false);
            }
            (id, rx)
        };
        // A cancelled request leaves the queue.
        let mut queued = Queued {
            group: &self.group,
            member: self.id,
            dir,
            id,
            armed: true,
        };
        // Woken by the group's timer or by a drain ([`Self::release`]).
        let _ = (&mut go).await;
        queued.armed = false;
    }
}

impl Drop for ThrottleMember {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Takes a waiting request out of its queue if its future is dropped.
struct Queued<'a> {
    group: &'a Arc<ThrottleGroup>,
    member: u64,
    dir: Direction,
    id: u64,
    armed: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.group.unqueue(self.member, self.dir, self.id, false);
        }
    }
}

/// Options of a `throttle` node (`BlockdevOptionsThrottle`).
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ThrottleOptions {
    pub file: Value,
    #[serde(default)]
    pub throttle_group: Option<String>,
}

impl ThrottleOptions {
    /// The group, which QEMU's schema requires.
    pub fn group_name(&self) -> Result<&str> {
        self.throttle_group
            .as_deref()
            .ok_or_else(|| Error::Other("Parameter 'throttle-group' is missing".into()))
    }
}

/// The `throttle` filter driver: each request waits for its group's limits.
pub struct ThrottleDriver {
    member: ThrottleMember,
}

impl ThrottleDriver {
    pub fn new(member: ThrottleMember) -> ThrottleDriver {
        ThrottleDriver { member }
    }

    async fn intercept(&self, node: &Node, bytes: u64, dir: Direction) {
        self.member
            .intercept(bytes, dir, || node.quiesce_count() > 0)
            .await
    }
}

#[async_trait]
impl BlockDriver for ThrottleDriver {
    fn driver_name(&self) -> &'static str {
        "throttle"
    }

    fn drained_begin(&self, _node: &Node) {
        self.member.release();
    }

    /// A filter: its child switches on its own.
    async fn reopen(&self, _node: &Node, _read_only: bool) -> Result<()> {
        Ok(())
    }

    fn is_filter(&self) -> bool {
        true
    }

    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
        self.intercept(node, buf.len() as u64, Direction::Read)
            .await;
        node.required_child(Role::File)?.read(offset, buf).await
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        self.intercept(node, data.len() as u64, Direction::Write)
            .await;
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
        self.intercept(node, len, Direction::Write).await;
        node.required_child(Role::File)?
            .write_zeroes(offset, len, flags)
            .await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.intercept(node, len, Direction::Write).await;
        node.required_child(Role::File)?.discard(offset, len).await
    }

    async fn write_compressed(&self, node: &Node, offset: u64, data: IoBytes) -> Result<()> {
        self.intercept(node, data.len() as u64, Direction::Write)
            .await;
        node.required_child(Role::File)?
            .write_compressed(offset, data)
            .await
    }

    async fn flush(&self, node: &Node) -> Result<()> {
        node.required_child(Role::File)?.flush().await
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::Passthrough {
            len,
            child: Role::File,
            offset,
        })
    }

    fn close(&self) {
        self.member.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(limits: Value) -> std::result::Result<ThrottleConfig, String> {
        let mut c = ThrottleConfig::default();
        c.apply_limits(limits.as_object().unwrap(), "limits.", false)?;
        Ok(c)
    }

    #[test]
    fn limits_are_checked_with_qemus_messages() {
        let e = |v: Value| cfg(v).unwrap_err();
        assert_eq!(
            e(serde_json::json!({"iops-total": 10, "iops-read": 5})),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            e(serde_json::json!({"iops-size": 10})),
            "iops size requires an iops value to be set"
        );
        assert_eq!(
            e(serde_json::json!({"iops-total": -1})),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            e(serde_json::json!({"iops-total": 10, "iops-total-max-length": 5000000000u64})),
            "iops-total-max-length value must be in the range [0, 4294967295]"
        );
        assert_eq!(
            e(serde_json::json!({"bogus": 1})),
            "Parameter 'limits.bogus' is unexpected"
        );
        assert_eq!(
            e(serde_json::json!({"iops-total": "x"})),
            "Invalid parameter type for 'limits.iops-total', expected: integer"
        );
        let c = cfg(serde_json::json!({"iops-total": 10, "iops-total-max": 20,
                                       "iops-total-max-length": 3}))
        .unwrap();
        assert_eq!(c.to_limits()["iops-total-max-length"], 3);
        assert_eq!(c.get_legacy("x-iops-total-max"), Some(20));
    }

    #[test]
    fn a_bucket_waits_for_what_exceeds_its_size() {
        let limit = BucketLimit {
            avg: 100,
            max: 0,
            burst_length: 1,
        };
        // Without a burst rate the bucket holds avg/10 = 10 units.
        let level = Level {
            level: 10.0,
            burst_level: 0.0,
        };
        assert_eq!(bucket_wait(&limit, &level), 0);
        let level = Level {
            level: 11.0,
            burst_level: 0.0,
        };
        assert_eq!(bucket_wait(&limit, &level), 10_000_000);
    }
}
