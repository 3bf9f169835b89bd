//! One connection in the transmission phase: many requests in flight, a
//! writer task that sends them in order and a reader task that matches
//! replies to their handles.
//!
//! A request is registered (with its buffer) before it is sent and stays
//! registered until its reply has been read, even if its caller went away:
//! the reader needs its length to check and consume the reply. Once the
//! connection breaks every registered request fails, and so does every
//! later one on this connection.

use super::handshake::ExportInfo;
use super::proto::*;
use parking_lot::Mutex;
use sluice_core::{IoBuf, IoBytes};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Requests in flight on one connection (QEMU's client allows 16).
const MAX_IN_FLIGHT: usize = 16;

/// The longest error chunk read: a maximal message plus the fixed fields.
const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING as u32 + 8;

/// Block status descriptors read from one chunk; sluice asks for one.
const MAX_DESCRIPTORS: u32 = 1024;

/// A successful reply.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done,
    Read(IoBuf),
    /// The first `base:allocation` extent: its length and flags.
    Status(u32, u32),
}

/// A failed request.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server replied with an error.
    Server { errno: i32, message: String },
    /// The connection broke before the reply came.
    Lost(Arc<str>),
}

type Answer = Result<Outcome, Failure>;

enum Kind {
    Read { buf: IoBuf, covered: u64 },
    Status { ctx: u32, first: Option<(u32, u32)> },
    Other,
}

struct Pending {
    req: RequestHeader,
    kind: Kind,
    /// The first error chunk of a structured reply.
    error: Option<(u32, String)>,
    tx: oneshot::Sender<Answer>,
    /// The request's slot: free again once its reply has been read, even
    /// if its caller went away meanwhile.
    _slot: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Table {
    next_handle: u64,
    pending: HashMap<u64, Pending>,
    /// Set once the connection broke: why.
    failed: Option<Arc<str>>,
}

enum Outgoing {
    Request([u8; RequestHeader::LEN], Option<IoBytes>),
    Disconnect,
}

/// Called once when a connection breaks, before its requests fail, so
/// that the driver stops handing it out first.
pub(crate) type OnLost = Box<dyn Fn(&Arc<str>) + Send + Sync>;

pub(crate) struct Conn {
    pub info: ExportInfo,
    table: Mutex<Table>,
    out: mpsc::UnboundedSender<Outgoing>,
    slots: Arc<Semaphore>,
    tasks: Mutex<Vec<AbortHandle>>,
    on_lost: OnLost,
}

impl Conn {
    /// Starts the reader and writer tasks of a negotiated connection.
    pub fn start(info: ExportInfo, r: BoxRead, w: BoxWrite, on_lost: OnLost) -> Arc<Conn> {
        let (out, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            info,
            table: Mutex::new(Table {
                next_handle: 1,
                ..Table::default()
            }),
            out,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tasks: Mutex::new(Vec::new()),
            on_lost,
        });
        let reader = tokio::spawn(read_loop(conn.clone(), r));
        let writer = tokio::spawn(write_loop(conn.clone(), w, rx));
        conn.tasks
            .lock()
            .extend([reader.abort_handle(), writer.abort_handle()]);
        // The reader may have failed before its tasks were listed here:
        // stop them now (the writer would otherwise wait forever).
        if conn.is_failed() {
            for t in conn.tasks.lock().drain(..) {
                t.abort();
            }
        }
        conn
    }

    pub fn is_failed(&self) -> bool {
        self.table.lock().failed.is_some()
    }

    /// Why the connection broke, once it has.
    pub fn failure(&self) -> Option<Arc<str>> {
        self.table.lock().failed.clone()
    }

    /// Sends one request and waits for its whole reply.
    pub async fn submit(
        &self,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<IoBytes>,
    ) -> Answer {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Failure::Lost("the connection is closed".into()))?;
        let (tx, rx) = oneshot::channel();
        let kind = match ty {
            CMD_READ => Kind::Read {
                buf: IoBuf::zeroed(len as usize),
                covered: 0,
            },
            CMD_BLOCK_STATUS => Kind::Status {
                ctx: self.info.base_allocation.unwrap_or(0),
                first: None,
            },
            _ => Kind::Other,
        };
        let header = {
            let mut t = self.table.lock();
            if let Some(why) = &t.failed {
                return Err(Failure::Lost(why.clone()));
            }
            let handle = t.next_handle;
            t.next_handle += 1;
            let req = RequestHeader {
                flags,
                ty,
                handle,
                offset,
                len,
            };
            t.pending.insert(
                handle,
                Pending {
                    req,
                    kind,
                    error: None,
                    tx,
                    _slot: slot,
                },
            );
            req.encode()
        };
        if self.out.send(Outgoing::Request(header, payload)).is_err() {
            self.fail("the connection's writer stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err(Failure::Lost("the connection closed".into())))
    }

    /// Breaks the connection: later requests fail, and so do those in
    /// flight (after the driver has been told).
    pub fn fail(&self, why: String) {
        let why: Arc<str> = why.into();
        let pending = {
            let mut t = self.table.lock();
            if t.failed.is_some() {
                return;
            }
            t.failed = Some(why.clone());
            std::mem::take(&mut t.pending)
        };
        (self.on_lost)(&why);
        for (_, p) in pending {
            let _ = p.tx.send(Err(Failure::Lost(why.clone())));
        }
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }

    /// Says goodbye (`NBD_CMD_DISC`) and stops reading: the node is closing
    /// and nothing is in flight.
    pub fn disconnect(&self) {
        {
            let mut t = self.table.lock();
            if t.failed.is_none() {
                t.failed = Some("the node was closed".into());
            }
        }
        let _ = self.out.send(Outgoing::Disconnect);
        // The reader goes now; the writer ends after the goodbye.
        if let Some(reader) = self.tasks.lock().first() {
            reader.abort();
        }
    }
}

async fn write_loop(conn: Arc<Conn>, w: BoxWrite, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let res: std::io::Result<()> = async {
        while let Some(mut msg) = rx.recv().await {
            // Everything queued goes out before one flush.
            loop {
                match msg {
                    Outgoing::Request(header, payload) => {
                        w.write_all(&header).await?;
                        if let Some(p) = payload {
                            w.write_all(&p).await?;
                        }
                    }
                    Outgoing::Disconnect => {
                        let disc = RequestHeader {
                            flags: 0,
                            ty: CMD_DISC,
                            handle: 0,
                            offset: 0,
                            len: 0,
                        };
                        w.write_all(&disc.encode()).await?;
                        w.flush().await?;
                        return w.shutdown().await;
                    }
                }
                match rx.try_recv() {
                    Ok(next) => msg = next,
                    Err(_) => break,
                }
            }
            w.flush().await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = res {
        conn.fail(format!("sending to the server failed: {e}"));
    }
}

async fn read_loop(conn: Arc<Conn>, r: BoxRead) {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let why = loop {
        if let Err(why) = read_reply(&conn, &mut r).await {
            break why;
        }
    };
    conn.fail(why);
}

fn io_why(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the server closed the connection".into()
    } else {
        format!("receiving from the server failed: {e}")
    }
}

/// Takes the request `handle` out of the table while its reply is read.
fn take(conn: &Conn, handle: u64) -> Result<Pending, String> {
    conn.table
        .lock()
        .pending
        .remove(&handle)
        .ok_or_else(|| format!("protocol error: reply for unknown handle {handle}"))
}

/// Returns a request to the table: its reply goes on, or the connection
/// is about to fail it with the reason.
fn put_back(conn: &Conn, handle: u64, p: Pending) {
    let mut t = conn.table.lock();
    match &t.failed {
        Some(why) => {
            let why = why.clone();
            drop(t);
            let _ = p.tx.send(Err(Failure::Lost(why)));
        }
        None => {
            t.pending.insert(handle, p);
        }
    }
}

/// Reads one simple reply or one structured chunk. `Err` is a protocol
/// violation or a broken connection: the connection must go.
async fn read_reply<R: AsyncRead + Unpin>(conn: &Conn, r: &mut R) -> Result<(), String> {
    let magic = r.read_u32().await.map_err(io_why)?;
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let errno = r.read_u32().await.map_err(io_why)?;
            let handle = r.read_u64().await.map_err(io_why)?;
            let mut p = take(conn, handle)?;
            let answer = if errno != 0 {
                Err(Failure::Server {
                    errno: host_errno(errno),
                    message: String::new(),
                })
            } else {
                match std::mem::replace(&mut p.kind, Kind::Other) {
                    Kind::Read { mut buf, .. } => {
                        if conn.info.structured {
                            put_back(conn, handle, p);
                            return Err(format!(
                                "protocol error: simple reply with data to read {handle} after structured replies were negotiated"
                            ));
                        }
                        if let Err(e) = r.read_exact(&mut buf).await {
                            put_back(conn, handle, p);
                            return Err(io_why(e));
                        }
                        Ok(Outcome::Read(buf))
                    }
                    Kind::Status { .. } => {
                        put_back(conn, handle, p);
                        return Err(format!(
                            "protocol error: simple reply to block status request {handle}"
                        ));
                    }
                    Kind::Other => Ok(Outcome::Done),
                }
            };
            let _ = p.tx.send(answer);
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC if conn.info.structured => {
            let mut h = [0u8; 16];
            r.read_exact(&mut h).await.map_err(io_why)?;
            let chunk = ChunkHeader::decode_after_magic(&h);
            let mut p = take(conn, chunk.handle)?;
            if let Err(why) = read_chunk(&mut p, &chunk, r).await {
                put_back(conn, chunk.handle, p);
                return Err(why);
            }
            if chunk.flags & REPLY_FLAG_DONE == 0 {
                put_back(conn, chunk.handle, p);
                return Ok(());
            }
            let answer = match finish(&mut p, chunk.handle) {
                Ok(a) => a,
                Err(why) => {
                    put_back(conn, chunk.handle, p);
                    return Err(why);
                }
            };
            let _ = p.tx.send(answer);
            Ok(())
        }
        other => Err(format!("protocol error: invalid reply magic {other:#x}")),
    }
}

/// Reads one chunk's payload into its request, checking it against what
/// was asked before allocating or copying anything.
async fn read_chunk<R: AsyncRead + Unpin>(
    p: &mut Pending,
    chunk: &ChunkHeader,
    r: &mut R,
) -> Result<(), String> {
    let handle = chunk.handle;
    let req = p.req;
    let violation = |what: &str| {
        format!(
            "protocol error: {what} (chunk type {} of {} bytes in the reply to {} request {handle} at offset {} length {})",
            chunk.ty,
            chunk.len,
            cmd_name(req.ty),
            req.offset,
            req.len
        )
    };
    // Where `[offset, offset + len)` lies within the request, if it does.
    let within = |offset: u64, len: u64| -> Option<usize> {
        let start = offset.checked_sub(req.offset)?;
        (start.checked_add(len)? <= u64::from(req.len)).then_some(start as usize)
    };
    match chunk.ty {
        REPLY_TYPE_NONE => {
            if chunk.len != 0 || chunk.flags & REPLY_FLAG_DONE == 0 {
                return Err(violation("a 'none' chunk must be empty and final"));
            }
        }
        REPLY_TYPE_OFFSET_DATA => {
            let Kind::Read { buf, covered } = &mut p.kind else {
                return Err(violation("data for a request that reads nothing"));
            };
            if chunk.len <= 8 {
                return Err(violation("data chunk without data"));
            }
            let n = u64::from(chunk.len - 8);
            let offset = r.read_u64().await.map_err(io_why)?;
            let start = within(offset, n).ok_or_else(|| {
                violation(&format!("data at offset {offset} outside the request"))
            })?;
            r.read_exact(&mut buf[start..start + n as usize])
                .await
                .map_err(io_why)?;
            *covered += n;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let Kind::Read { buf, covered } = &mut p.kind else {
                return Err(violation("a hole for a request that reads nothing"));
            };
            if chunk.len != 12 {
                return Err(violation("a hole chunk must be 12 bytes"));
            }
            let offset = r.read_u64().await.map_err(io_why)?;
            let n = r.read_u32().await.map_err(io_why)?;
            let start = within(offset, u64::from(n))
                .filter(|_| n > 0)
                .ok_or_else(|| {
                    violation(&format!("hole at offset {offset} outside the request"))
                })?;
            buf[start..start + n as usize].fill(0);
            *covered += u64::from(n);
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let Kind::Status { ctx, first } = &mut p.kind else {
                return Err(violation("block status for another request"));
            };
            if chunk.len < 12 || (chunk.len - 4) & 7 != 0 || chunk.len > 4 + 8 * MAX_DESCRIPTORS {
                return Err(violation("malformed block status"));
            }
            let mut data = vec![0u8; chunk.len as usize];
            r.read_exact(&mut data).await.map_err(io_why)?;
            let mut c = Cursor::new(&data);
            let id = c.u32().unwrap_or(0);
            let len = c.u32().unwrap_or(0);
            let flags = c.u32().unwrap_or(0);
            if id != *ctx {
                return Err(violation(&format!(
                    "status for unknown metadata context {id}"
                )));
            }
            if first.is_some() {
                return Err(violation("a second block status for the same context"));
            }
            if len == 0 {
                return Err(violation("an empty block status extent"));
            }
            *first = Some((len, flags));
        }
        ty if ty & REPLY_TYPE_FLAG_ERROR != 0 => {
            if chunk.len < 6 || chunk.len > MAX_ERROR_CHUNK {
                return Err(violation("malformed error chunk"));
            }
            let mut data = vec![0u8; chunk.len as usize];
            r.read_exact(&mut data).await.map_err(io_why)?;
            let mut c = Cursor::new(&data);
            let errno = c.u32().unwrap_or(0);
            let msg_len = c.u16().unwrap_or(0);
            let msg = c
                .bytes(msg_len as usize)
                .ok_or_else(|| violation("error message longer than its chunk"))?;
            if errno == 0 {
                return Err(violation("error chunk without an error"));
            }
            if ty == REPLY_TYPE_ERROR && !c.done() {
                return Err(violation("trailing bytes after an error"));
            }
            if ty == REPLY_TYPE_ERROR_OFFSET {
                let offset = c.u64().filter(|_| c.done());
                if offset.and_then(|o| within(o, 1)).is_none() {
                    return Err(violation("error offset outside the request"));
                }
            }
            if p.error.is_none() {
                p.error = Some((errno, String::from_utf8_lossy(msg).into_owned()));
            }
        }
        _ => return Err(violation("unknown chunk type")),
    }
    Ok(())
}

/// The answer of a request whose last chunk came.
fn finish(p: &mut Pending, handle: u64) -> Result<Answer, String> {
    if let Some((errno, message)) = p.error.take() {
        return Ok(Err(Failure::Server {
            errno: host_errno(errno),
            message,
        }));
    }
    match std::mem::replace(&mut p.kind, Kind::Other) {
        Kind::Read { buf, covered } => {
            if covered != u64::from(p.req.len) {
                return Err(format!(
                    "protocol error: the reply to read {handle} at offset {} length {} covered {covered} bytes",
                    p.req.offset, p.req.len
                ));
            }
            Ok(Ok(Outcome::Read(buf)))
        }
        Kind::Status { first, .. } => match first {
            Some((len, flags)) => Ok(Ok(Outcome::Status(len, flags))),
            None => Err(format!(
                "protocol error: the reply to block status {handle} has no extent"
            )),
        },
        Kind::Other => Ok(Ok(Outcome::Done)),
    }
}
