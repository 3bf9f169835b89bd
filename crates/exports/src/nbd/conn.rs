//! One client connection: the fixed newstyle handshake, then the
//! transmission phase.

use super::proto::*;
use super::server::{ClientGuard, ConnTrack, Export, ExportView, ServerInner};
use sluice_core::{Error, IoBuf, IoBytes, WriteFlags, ZeroFlags};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// How long a client may take to negotiate.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The buffer budget is counted in units of this many bytes.
pub(crate) const BUDGET_UNIT: u32 = 64 << 10;

/// Metadata contexts a client can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ctx {
    BaseAllocation,
    AllocationDepth,
}

impl Ctx {
    fn name(self) -> &'static str {
        match self {
            Ctx::BaseAllocation => CTX_BASE_ALLOCATION,
            Ctx::AllocationDepth => CTX_ALLOCATION_DEPTH,
        }
    }

    /// The context id sent to the client.
    fn id(self) -> u32 {
        match self {
            Ctx::BaseAllocation => 0,
            Ctx::AllocationDepth => 1,
        }
    }
}

/// What negotiation settled.
struct Negotiated {
    guard: ClientGuard,
    structured: bool,
    contexts: Vec<Ctx>,
    /// Requests must be aligned to this (the minimum block size the client
    /// was told about; 1 when it did not ask).
    align: u32,
}

/// Why negotiation ended without entering transmission.
enum HandshakeEnd {
    /// The client aborted or went away; nothing to report.
    Closed,
    /// The client broke the protocol.
    Violation(String),
}

impl From<io::Error> for HandshakeEnd {
    fn from(_: io::Error) -> Self {
        HandshakeEnd::Closed
    }
}

pub(crate) async fn serve<R, W>(
    server: Arc<ServerInner>,
    track: ConnTrack,
    r: R,
    w: W,
    permit: Option<OwnedSemaphorePermit>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(64 << 10, r);
    let mut writer = BufWriter::with_capacity(64 << 10, w);
    let mut shutdown = server.shutdown.subscribe();
    if server.is_shutting_down() {
        return;
    }
    // A client gets HANDSHAKE_TIMEOUT to negotiate (QEMU's
    // handshake-max-seconds), so an idle one cannot hold a connection slot.
    let negotiated = tokio::select! {
        res = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&server, &mut reader, &mut writer)) => {
            res.unwrap_or_else(|_| Err(HandshakeEnd::Violation("negotiation timed out".into())))
        }
        _ = shutdown.wait_for(|s| *s) => Err(HandshakeEnd::Closed),
    };
    match negotiated {
        Ok(n) => transmission(server, reader, writer, n).await,
        Err(HandshakeEnd::Violation(why)) => {
            tracing::info!("NBD client dropped during negotiation: {why}");
        }
        Err(HandshakeEnd::Closed) => {}
    }
    drop(permit);
    drop(track);
}

async fn send_rep<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    opt: u32,
    rep: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[0..8].copy_from_slice(&REP_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&rep.to_be_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&h).await?;
    w.write_all(data).await?;
    w.flush().await
}

async fn send_err<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    opt: u32,
    rep: u32,
    msg: &str,
) -> io::Result<()> {
    let msg = truncate(msg, MAX_STRING);
    send_rep(w, opt, rep, msg.as_bytes()).await
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A cursor over an option's payload.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let b = self.data.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.data.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let b = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(b)
    }
    /// A length-prefixed string of at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> std::result::Result<&'a str, &'static str> {
        let n = self.u32().ok_or("option data too short")? as usize;
        if n > MAX_STRING {
            return Err("string too long");
        }
        let b = self.bytes(n).ok_or("option data too short")?;
        std::str::from_utf8(b).map_err(|_| "string is not valid UTF-8")
    }
    fn done(&self) -> bool {
        self.pos == self.data.len()
    }
}

async fn handshake<R, W>(
    server: &Arc<ServerInner>,
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
) -> Result<Negotiated, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;
    let cflags = r.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeEnd::Violation(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut contexts: Vec<Ctx> = Vec::new();
    let mut contexts_export: Option<String> = None;
    loop {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeEnd::Violation(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeEnd::Violation(format!(
                "option {opt} of {len} bytes is too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        if opt == OPT_EXPORT_NAME {
            if len as usize > MAX_STRING {
                return Err(HandshakeEnd::Violation("export name too long".into()));
            }
            let Ok(name) = std::str::from_utf8(&data) else {
                return Err(HandshakeEnd::Violation("export name not UTF-8".into()));
            };
            let Some(guard) = server.attach(name) else {
                // This option cannot fail politely: the protocol says close.
                return Err(HandshakeEnd::Violation(not_present(name)));
            };
            let export = guard.export().clone();
            let mut out = Vec::with_capacity(134);
            out.extend_from_slice(&export.root.size().to_be_bytes());
            out.extend_from_slice(&export.flags(structured).to_be_bytes());
            if !no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            w.write_all(&out).await?;
            w.flush().await?;
            if contexts_export.as_deref() != Some(export.config.name.as_str()) {
                contexts.clear();
            }
            return Ok(Negotiated {
                guard,
                structured,
                contexts,
                align: 1,
            });
        }
        if !fixed {
            // Plain newstyle knows no other option.
            return Err(HandshakeEnd::Violation(format!(
                "option {opt} from a client without fixed newstyle"
            )));
        }
        if server.is_shutting_down() && opt != OPT_ABORT {
            send_err(w, opt, REP_ERR_SHUTDOWN, "Server is shutting down").await?;
            return Err(HandshakeEnd::Closed);
        }
        match opt {
            OPT_ABORT => {
                // The client may already be gone; either way we are done.
                let _ = send_rep(w, opt, REP_ACK, &[]).await;
                return Err(HandshakeEnd::Closed);
            }
            OPT_LIST => {
                if len != 0 {
                    send_err(w, opt, REP_ERR_INVALID, "list: no data expected").await?;
                    continue;
                }
                for (name, desc) in server.list() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    if let Some(desc) = desc {
                        d.extend_from_slice(truncate(&desc, MAX_STRING).as_bytes());
                    }
                    send_rep(w, opt, REP_SERVER, &d).await?;
                }
                send_rep(w, opt, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    send_err(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "structured reply: no data expected",
                    )
                    .await?;
                } else if structured {
                    send_err(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "structured reply already negotiated",
                    )
                    .await?;
                } else {
                    structured = true;
                    send_rep(w, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_STARTTLS => {
                send_err(w, opt, REP_ERR_POLICY, "TLS not configured").await?;
            }
            OPT_INFO | OPT_GO => {
                let mut c = Cursor {
                    data: &data,
                    pos: 0,
                };
                let name = match c.string() {
                    Ok(n) => n.to_string(),
                    Err(why) => {
                        let rep = if why == "string too long" {
                            REP_ERR_TOO_BIG
                        } else {
                            REP_ERR_INVALID
                        };
                        send_err(w, opt, rep, &format!("{}: {why}", opt_name(opt))).await?;
                        continue;
                    }
                };
                let mut requests = Vec::new();
                let ok = (|| {
                    let n = c.u16()?;
                    for _ in 0..n {
                        requests.push(c.u16()?);
                    }
                    c.done().then_some(())
                })();
                if ok.is_none() {
                    send_err(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        &format!("{}: malformed information requests", opt_name(opt)),
                    )
                    .await?;
                    continue;
                }
                let Some(view) = server.view(&name) else {
                    send_err(w, opt, REP_ERR_UNKNOWN, &not_present(&name)).await?;
                    continue;
                };
                let wants_block_size = requests.contains(&INFO_BLOCK_SIZE);
                send_info(w, opt, &view, &requests, structured).await?;
                if opt == OPT_INFO {
                    send_rep(w, opt, REP_ACK, &[]).await?;
                    continue;
                }
                let Some(guard) = server.attach(&name) else {
                    send_err(w, opt, REP_ERR_UNKNOWN, &not_present(&name)).await?;
                    continue;
                };
                send_rep(w, opt, REP_ACK, &[]).await?;
                if contexts_export.as_deref() != Some(guard.export().config.name.as_str()) {
                    contexts.clear();
                }
                let align = if wants_block_size { view.min_block } else { 1 };
                return Ok(Negotiated {
                    guard,
                    structured,
                    contexts,
                    align,
                });
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if !structured {
                    send_err(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        &format!(
                            "request option '{}' when structured reply is not negotiated",
                            opt_name(opt)
                        ),
                    )
                    .await?;
                    continue;
                }
                let parsed = parse_meta_query(&data);
                let (name, queries) = match parsed {
                    Ok(p) => p,
                    Err(why) => {
                        send_err(
                            w,
                            opt,
                            REP_ERR_INVALID,
                            &format!("{}: {why}", opt_name(opt)),
                        )
                        .await?;
                        continue;
                    }
                };
                let Some(view) = server.view(&name) else {
                    send_err(w, opt, REP_ERR_UNKNOWN, &not_present(&name)).await?;
                    continue;
                };
                let mut found: Vec<Ctx> = Vec::new();
                let mut add = |c: Ctx| {
                    if !found.contains(&c) {
                        found.push(c);
                    }
                };
                if queries.is_empty() && !set {
                    add(Ctx::BaseAllocation);
                    if view.allocation_depth {
                        add(Ctx::AllocationDepth);
                    }
                }
                for q in &queries {
                    match q.as_str() {
                        CTX_BASE_ALLOCATION => add(Ctx::BaseAllocation),
                        "base:" if !set => add(Ctx::BaseAllocation),
                        CTX_ALLOCATION_DEPTH if view.allocation_depth => add(Ctx::AllocationDepth),
                        "qemu:" if !set && view.allocation_depth => add(Ctx::AllocationDepth),
                        _ => {}
                    }
                }
                for c in &found {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(if set { c.id() } else { 0 }).to_be_bytes());
                    d.extend_from_slice(c.name().as_bytes());
                    send_rep(w, opt, REP_META_CONTEXT, &d).await?;
                }
                send_rep(w, opt, REP_ACK, &[]).await?;
                if set {
                    contexts = found;
                    contexts_export = Some(view.name.clone());
                }
            }
            _ => {
                send_err(
                    w,
                    opt,
                    REP_ERR_UNSUP,
                    &format!("Unsupported option {opt} ({})", opt_name(opt)),
                )
                .await?;
            }
        }
    }
}

/// Export name and queries of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
fn parse_meta_query(data: &[u8]) -> Result<(String, Vec<String>), &'static str> {
    let mut c = Cursor { data, pos: 0 };
    let name = c.string()?.to_string();
    let n = c.u32().ok_or("option data too short")?;
    // Each query takes at least 4 bytes: a count beyond that is a lie.
    if n as usize > data.len() / 4 {
        return Err("too many queries");
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(c.string()?.to_string());
    }
    if !c.done() {
        return Err("trailing data");
    }
    Ok((name, queries))
}

async fn send_info<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    opt: u32,
    view: &ExportView,
    requests: &[u16],
    structured: bool,
) -> io::Result<()> {
    if requests.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(view.name.as_bytes());
        send_rep(w, opt, REP_INFO, &d).await?;
    }
    if requests.contains(&INFO_DESCRIPTION) {
        if let Some(desc) = &view.description {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(truncate(desc, MAX_STRING).as_bytes());
            send_rep(w, opt, REP_INFO, &d).await?;
        }
    }
    // Block sizes go to every client, as QEMU does; the minimum is only
    // more than 1 for a client that asked (others get unaligned requests
    // handled by the block layer).
    let min = if requests.contains(&INFO_BLOCK_SIZE) || opt == OPT_INFO {
        view.min_block
    } else {
        1
    };
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&min.max(4096).to_be_bytes());
    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    send_rep(w, opt, REP_INFO, &d).await?;
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&view.size.to_be_bytes());
    let flags = if structured {
        view.flags_structured
    } else {
        view.flags_plain
    };
    d.extend_from_slice(&flags.to_be_bytes());
    send_rep(w, opt, REP_INFO, &d).await
}

/// One request as read from the wire.
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    ty: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

/// State shared by a connection's request tasks.
struct ConnCtx<W> {
    export: Arc<Export>,
    writer: Mutex<BufWriter<W>>,
    structured: bool,
    contexts: Vec<Ctx>,
    align: u32,
    /// Set when a reply could not be written: the connection is dead.
    dead: tokio::sync::watch::Sender<bool>,
    /// The server-wide budget of request buffer memory.
    budget: Arc<Semaphore>,
}

/// Units of the buffer budget a payload of `len` bytes takes.
fn budget_units(len: u32) -> u32 {
    len.div_ceil(BUDGET_UNIT).max(1)
}

/// What reading the next request gave.
enum Next {
    Request(
        Request,
        Option<IoBytes>,
        OwnedSemaphorePermit,
        Option<OwnedSemaphorePermit>,
    ),
    Disconnect,
    Violation(String),
    Closed,
}

async fn read_request<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    slots: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
) -> io::Result<Next> {
    let mut h = [0u8; 28];
    r.read_exact(&mut h).await?;
    let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Ok(Next::Violation(format!("bad request magic {magic:#x}")));
    }
    let req = Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        ty: u16::from_be_bytes([h[6], h[7]]),
        handle: u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(h[16..24].try_into().expect("8 bytes")),
        len: u32::from_be_bytes(h[24..28].try_into().expect("4 bytes")),
    };
    if req.ty == CMD_DISC {
        return Ok(Next::Disconnect);
    }
    if req.ty == CMD_WRITE && req.len > MAX_PAYLOAD {
        // The payload cannot be skipped without reading it: the stream is
        // lost, so the connection goes (as qemu-nbd does).
        return Ok(Next::Violation(format!(
            "write payload of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum",
            req.len
        )));
    }
    // At most MAX_IN_FLIGHT requests (and payloads) per connection.
    let Ok(permit) = slots.clone().acquire_owned().await else {
        return Ok(Next::Closed);
    };
    let mut held = None;
    let payload = if req.ty == CMD_WRITE && req.len > 0 {
        // Every connection's payloads together stay within the budget.
        held = budget
            .clone()
            .acquire_many_owned(budget_units(req.len))
            .await
            .ok();
        let mut buf = IoBuf::recycled(req.len as usize);
        r.read_exact(&mut buf).await?;
        Some(buf.freeze())
    } else {
        None
    };
    Ok(Next::Request(req, payload, permit, held))
}

async fn transmission<R, W>(
    server: Arc<ServerInner>,
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    n: Negotiated,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = n.guard.export().clone();
    let ctx = Arc::new(ConnCtx {
        export: export.clone(),
        writer: Mutex::new(writer),
        structured: n.structured,
        contexts: n.contexts,
        align: n.align,
        dead: tokio::sync::watch::Sender::new(false),
        budget: server.buffers.clone(),
    });
    let budget = server.buffers.clone();
    let slots = Arc::new(Semaphore::new(super::server::MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut shutdown = server.shutdown.subscribe();
    let mut close = export.close.subscribe();
    let mut dead = ctx.dead.subscribe();
    loop {
        while tasks.try_join_next().is_some() {}
        let next = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => Next::Closed,
            _ = close.wait_for(|c| *c) => Next::Closed,
            _ = dead.wait_for(|d| *d) => Next::Closed,
            res = read_request(&mut reader, &slots, &budget) => res.unwrap_or(Next::Closed),
        };
        match next {
            Next::Request(req, payload, permit, held) => {
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    if let Err(e) = handle(&ctx, req, payload).await {
                        tracing::debug!("NBD reply failed: {e}");
                        ctx.dead.send_replace(true);
                    }
                    drop(held);
                    drop(permit);
                });
            }
            Next::Violation(why) => {
                tracing::info!("NBD client dropped: {why}");
                break;
            }
            Next::Disconnect | Next::Closed => break,
        }
    }
    // Answer what was admitted, then close.
    while tasks.join_next().await.is_some() {}
    {
        let mut w = ctx.writer.lock().await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
    drop(ctx);
    drop(export);
    drop(n.guard);
}

/// A structured reply chunk.
enum Chunk {
    Data { offset: u64, data: IoBytes },
    Hole { offset: u64, len: u32 },
    Status { id: u32, descs: Vec<(u32, u32)> },
    Error { errno: u32, msg: String },
    None,
}

impl<W: AsyncWrite + Unpin> ConnCtx<W> {
    async fn simple(&self, handle: u64, errno: u32, data: Option<&[u8]>) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&errno.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        let mut w = self.writer.lock().await;
        w.write_all(&h).await?;
        if let Some(d) = data {
            w.write_all(d).await?;
        }
        w.flush().await
    }

    /// Sends `chunks` as one structured reply; the last one carries DONE.
    async fn chunks(&self, handle: u64, chunks: Vec<Chunk>) -> io::Result<()> {
        let mut w = self.writer.lock().await;
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
            let mut h = Vec::with_capacity(64);
            h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            h.extend_from_slice(&flags.to_be_bytes());
            match c {
                Chunk::Data { offset, data } => {
                    h.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
                    h.extend_from_slice(&handle.to_be_bytes());
                    h.extend_from_slice(&(data.len() as u32 + 8).to_be_bytes());
                    h.extend_from_slice(&offset.to_be_bytes());
                    w.write_all(&h).await?;
                    w.write_all(&data).await?;
                }
                Chunk::Hole { offset, len } => {
                    h.extend_from_slice(&REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
                    h.extend_from_slice(&handle.to_be_bytes());
                    h.extend_from_slice(&12u32.to_be_bytes());
                    h.extend_from_slice(&offset.to_be_bytes());
                    h.extend_from_slice(&len.to_be_bytes());
                    w.write_all(&h).await?;
                }
                Chunk::Status { id, descs } => {
                    h.extend_from_slice(&REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
                    h.extend_from_slice(&handle.to_be_bytes());
                    h.extend_from_slice(&(4 + 8 * descs.len() as u32).to_be_bytes());
                    h.extend_from_slice(&id.to_be_bytes());
                    for (len, flags) in descs {
                        h.extend_from_slice(&len.to_be_bytes());
                        h.extend_from_slice(&flags.to_be_bytes());
                    }
                    w.write_all(&h).await?;
                }
                Chunk::Error { errno, msg } => {
                    let msg = truncate(&msg, MAX_STRING);
                    h.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
                    h.extend_from_slice(&handle.to_be_bytes());
                    h.extend_from_slice(&(6 + msg.len() as u32).to_be_bytes());
                    h.extend_from_slice(&errno.to_be_bytes());
                    h.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                    h.extend_from_slice(msg.as_bytes());
                    w.write_all(&h).await?;
                }
                Chunk::None => {
                    h.extend_from_slice(&REPLY_TYPE_NONE.to_be_bytes());
                    h.extend_from_slice(&handle.to_be_bytes());
                    h.extend_from_slice(&0u32.to_be_bytes());
                    w.write_all(&h).await?;
                }
            }
        }
        w.flush().await
    }

    /// Replies with an error: a structured error chunk when negotiated.
    async fn error(&self, handle: u64, errno: u32, msg: String) -> io::Result<()> {
        if self.structured {
            self.chunks(handle, vec![Chunk::Error { errno, msg }]).await
        } else {
            self.simple(handle, errno, None).await
        }
    }

    async fn ok(&self, handle: u64) -> io::Result<()> {
        self.simple(handle, 0, None).await
    }
}

fn err_reply(e: &Error) -> (u32, String) {
    (wire_errno(e.errno()), e.to_string())
}

/// Checks a request before it reaches the graph: `Err` is the error reply.
fn validate<W>(ctx: &ConnCtx<W>, req: &Request) -> Result<(), (u32, String)> {
    let allowed = CMD_FLAG_FUA
        | match req.ty {
            CMD_READ if ctx.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    match req.ty {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES
        | CMD_BLOCK_STATUS => {}
        t => return Err((EINVAL, format!("invalid request type ({t}) received"))),
    }
    if req.flags & !allowed != 0 {
        return Err((
            EINVAL,
            format!(
                "unsupported flags {:#x} for request type {}",
                req.flags & !allowed,
                req.ty
            ),
        ));
    }
    let writes = matches!(req.ty, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && !ctx.export.config.writable {
        return Err((EPERM, "export is read-only".into()));
    }
    if req.ty == CMD_FLUSH {
        if req.offset != 0 || req.len != 0 {
            return Err((EINVAL, "flush with non-zero offset or length".into()));
        }
        return Ok(());
    }
    if req.ty == CMD_READ && req.len > MAX_PAYLOAD {
        return Err((
            EINVAL,
            format!("len ({}) is larger than max len ({MAX_PAYLOAD})", req.len),
        ));
    }
    let size = ctx.export.root.size();
    let end = req.offset.checked_add(req.len as u64);
    if end.is_none_or(|end| end > size) {
        let errno = if matches!(req.ty, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err((
            errno,
            format!(
                "operation past EOF; From: {}, Len: {}, Size: {size}",
                req.offset, req.len
            ),
        ));
    }
    // The minimum block size is a request alignment: a power of two.
    let align = ctx.align as u64;
    if align > 1 {
        let end = req.offset + req.len as u64;
        let mask = align - 1;
        if req.offset & mask != 0 || (end & mask != 0 && end != size) {
            return Err((
                EINVAL,
                format!(
                    "request at offset {} length {} is not aligned to the {align}-byte minimum block size",
                    req.offset, req.len
                ),
            ));
        }
    }
    if req.ty == CMD_BLOCK_STATUS {
        if !ctx.structured || ctx.contexts.is_empty() {
            return Err((EINVAL, "no metadata context negotiated".into()));
        }
        if req.len == 0 {
            return Err((EINVAL, "zero-length block status request".into()));
        }
    }
    Ok(())
}

async fn handle<W: AsyncWrite + Unpin + Send>(
    ctx: &ConnCtx<W>,
    req: Request,
    payload: Option<IoBytes>,
) -> io::Result<()> {
    if let Err((errno, msg)) = validate(ctx, &req) {
        return ctx.error(req.handle, errno, msg).await;
    }
    let root = &ctx.export.root;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = req.len as u64;
    let res: sluice_core::Result<()> = match req.ty {
        CMD_READ => return read(ctx, req).await,
        CMD_BLOCK_STATUS => return block_status(ctx, req).await,
        CMD_WRITE => match payload {
            Some(data) => {
                root.write(
                    req.offset,
                    data,
                    WriteFlags {
                        fua,
                        ..Default::default()
                    },
                )
                .await
            }
            None => Ok(()),
        },
        CMD_TRIM if len > 0 => match root.discard(req.offset, len).await {
            Ok(()) if fua => root.flush().await,
            other => other,
        },
        CMD_WRITE_ZEROES if len > 0 => {
            let flags = ZeroFlags {
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                no_fallback: req.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            root.write_zeroes(req.offset, len, flags).await
        }
        CMD_FLUSH => root.flush().await,
        // CACHE is a hint; the range was checked.
        _ => Ok(()),
    };
    match res {
        Ok(()) => ctx.ok(req.handle).await,
        Err(e) => {
            let (errno, msg) = err_reply(&e);
            ctx.error(req.handle, errno, msg).await
        }
    }
}

/// Zero runs of at least this many bytes (on this alignment within the
/// export) go as hole chunks.
const HOLE_MIN: usize = 16 << 10;

/// Whether `b` is all zeroes (word-wide, so the compiler vectorises it).
fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    let acc = words.by_ref().fold(0u128, |a, w| {
        a | u128::from_ne_bytes(w.try_into().expect("16 bytes"))
    });
    acc == 0 && words.remainder().iter().all(|&x| x == 0)
}

/// Splits a read's data into runs that hold data (`false`) or zeroes
/// (`true`), as (start within `data`, length). Zero runs are found on
/// [`HOLE_MIN`] boundaries of the export, so hole chunks stay aligned.
/// Looking at the bytes read costs less than asking the block layer
/// (a `SEEK_HOLE` on tmpfs walks the whole file).
fn zero_runs(offset: u64, data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let to_boundary = HOLE_MIN - (abs % HOLE_MIN as u64) as usize;
        let n = to_boundary.min(data.len() - pos);
        // Only whole HOLE_MIN blocks may become holes.
        let zero = n == HOLE_MIN && is_zero(&data[pos..pos + n]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += n,
            _ => runs.push((pos, n, zero)),
        }
        pos += n;
    }
    runs
}

async fn read<W: AsyncWrite + Unpin + Send>(ctx: &ConnCtx<W>, req: Request) -> io::Result<()> {
    let root = &ctx.export.root;
    let len = req.len as u64;
    if !ctx.structured {
        if len == 0 {
            return ctx.simple(req.handle, 0, Some(&[])).await;
        }
        let _held = ctx
            .budget
            .clone()
            .acquire_many_owned(budget_units(req.len))
            .await
            .ok();
        return match root.read(req.offset, req.len as usize).await {
            Ok(buf) => ctx.simple(req.handle, 0, Some(&buf)).await,
            Err(e) => ctx.simple(req.handle, err_reply(&e).0, None).await,
        };
    }
    if len == 0 {
        return ctx.chunks(req.handle, vec![Chunk::None]).await;
    }
    let _held = ctx
        .budget
        .clone()
        .acquire_many_owned(budget_units(req.len))
        .await
        .ok();
    let data = match root.read(req.offset, req.len as usize).await {
        Ok(d) => d.freeze(),
        Err(e) => {
            let (errno, msg) = err_reply(&e);
            return ctx
                .chunks(req.handle, vec![Chunk::Error { errno, msg }])
                .await;
        }
    };
    if req.flags & CMD_FLAG_DF != 0 {
        let chunk = Chunk::Data {
            offset: req.offset,
            data,
        };
        return ctx.chunks(req.handle, vec![chunk]).await;
    }
    let chunks = zero_runs(req.offset, &data)
        .into_iter()
        .map(|(start, n, zero)| {
            let offset = req.offset + start as u64;
            if zero {
                Chunk::Hole {
                    offset,
                    len: n as u32,
                }
            } else {
                Chunk::Data {
                    offset,
                    data: data.slice(start..start + n),
                }
            }
        })
        .collect();
    ctx.chunks(req.handle, chunks).await
}

/// Most descriptors sent per context in one reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

async fn block_status<W: AsyncWrite + Unpin + Send>(
    ctx: &ConnCtx<W>,
    req: Request,
) -> io::Result<()> {
    let root = &ctx.export.root;
    let end = req.offset + req.len as u64;
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut lists: Vec<Vec<(u32, u32)>> = vec![Vec::new(); ctx.contexts.len()];
    let mut pos = req.offset;
    while pos < end {
        let e = match root.block_status(pos, end - pos).await {
            Ok(e) => e,
            Err(e) => {
                let (errno, msg) = err_reply(&e);
                return ctx.error(req.handle, errno, msg).await;
            }
        };
        let n = e.length.clamp(1, end - pos);
        let mut full = false;
        for (list, c) in lists.iter_mut().zip(&ctx.contexts) {
            let flags = match c {
                Ctx::BaseAllocation => {
                    (if e.data { 0 } else { STATE_HOLE }) | (if e.zero { STATE_ZERO } else { 0 })
                }
                Ctx::AllocationDepth => {
                    if e.present {
                        e.depth + 1
                    } else {
                        0
                    }
                }
            };
            match list.last_mut() {
                Some(last) if last.1 == flags && !req_one => last.0 += n as u32,
                Some(_) if req_one => full = true,
                _ => list.push((n as u32, flags)),
            }
            if list.len() >= MAX_DESCRIPTORS {
                full = true;
            }
        }
        if full || req_one {
            break;
        }
        pos += n;
    }
    let chunks = ctx
        .contexts
        .iter()
        .zip(lists)
        .map(|(c, descs)| Chunk::Status { id: c.id(), descs })
        .collect();
    ctx.chunks(req.handle, chunks).await
}

/// The error message for an export name that is not there.
fn not_present(name: &str) -> String {
    format!("export '{name}' not present")
}
