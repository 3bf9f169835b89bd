//! The client side of the fixed newstyle handshake: structured replies,
//! the `base:allocation` metadata context, then `NBD_OPT_GO` (or
//! `NBD_OPT_EXPORT_NAME` from servers without it).

use super::proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest option reply the client reads: the longest string the
/// protocol allows plus the fixed fields around it.
const MAX_REPLY_LEN: u32 = MAX_STRING as u32 + 64;

/// What the server told us about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// Requests are aligned to this (a power of two; 1 when unconstrained).
    pub min_block: u32,
    /// The largest read or write payload of one request.
    pub max_payload: u32,
    pub structured: bool,
    /// The id of `base:allocation`, when the server selected it.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Why a handshake failed, as a sentence for the user.
pub(crate) type Why = String;

fn io_why(e: std::io::Error) -> Why {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the server closed the connection during negotiation".into()
    } else {
        format!("negotiation failed: {e}")
    }
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, data: &[u8]) -> Result<(), Why> {
    let len = u32::try_from(data.len()).map_err(|_| "option too long".to_string())?;
    let mut msg = option_request(opt, len).to_vec();
    msg.extend_from_slice(data);
    w.write_all(&msg).await.map_err(io_why)?;
    w.flush().await.map_err(io_why)
}

/// Reads one option reply to `opt`, its length checked before allocating.
async fn read_reply<R: AsyncRead + Unpin>(r: &mut R, opt: u32) -> Result<(u32, Vec<u8>), Why> {
    let mut h = [0u8; OptionReply::LEN];
    r.read_exact(&mut h).await.map_err(io_why)?;
    let rep = OptionReply::decode(&h)
        .map_err(|m| format!("bad option reply magic {m:#x} from the server"))?;
    if rep.opt != opt {
        return Err(format!(
            "the server answered option {} ({}) to option {opt} ({})",
            rep.opt,
            opt_name(rep.opt),
            opt_name(opt)
        ));
    }
    if rep.len > MAX_REPLY_LEN {
        return Err(format!(
            "option reply of {} bytes to '{}' is too long",
            rep.len,
            opt_name(opt)
        ));
    }
    let mut data = vec![0u8; rep.len as usize];
    r.read_exact(&mut data).await.map_err(io_why)?;
    Ok((rep.rep, data))
}

/// The message an error reply carries, for the user.
fn err_text(rep: u32, data: &[u8]) -> String {
    let kind = match rep {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "forbidden by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(data);
    if msg.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {msg}")
    }
}

/// A length-prefixed string for option data.
fn put_string(out: &mut Vec<u8>, s: &str) -> Result<(), Why> {
    if s.len() > MAX_STRING {
        return Err(format!("export name of {} bytes is too long", s.len()));
    }
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Negotiates `export` over a fresh connection.
pub(crate) async fn negotiate<R, W>(r: &mut R, w: &mut W, export: &str) -> Result<ExportInfo, Why>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = [0u8; 16];
    r.read_exact(&mut hello).await.map_err(io_why)?;
    let mut c = Cursor::new(&hello);
    let (m1, m2) = (c.u64().unwrap_or(0), c.u64().unwrap_or(0));
    if m1 != NBDMAGIC {
        return Err(format!("not an NBD server (magic {m1:#x})"));
    }
    if m2 == OLDSTYLE_MAGIC {
        return Err("the server speaks oldstyle negotiation, which is not supported".into());
    }
    if m2 != IHAVEOPT {
        return Err(format!("not a newstyle NBD server (magic {m2:#x})"));
    }
    let hflags = r.read_u16().await.map_err(io_why)?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes()).await.map_err(io_why)?;
    if !fixed {
        // Plain newstyle knows only NBD_OPT_EXPORT_NAME.
        return export_name(r, w, export, no_zeroes, false, None).await;
    }

    send_option(w, OPT_STRUCTURED_REPLY, &[]).await?;
    let structured = match read_reply(r, OPT_STRUCTURED_REPLY).await? {
        (REP_ACK, _) => true,
        (rep, _) if rep & REP_FLAG_ERROR != 0 => false,
        (rep, _) => return Err(format!("unexpected reply {rep} to 'structured reply'")),
    };
    let base_allocation = if structured {
        set_meta_context(r, w, export).await?
    } else {
        None
    };

    let mut data = Vec::new();
    put_string(&mut data, export)?;
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(w, OPT_GO, &data).await?;
    let mut export_info: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32)> = None;
    loop {
        let (rep, data) = read_reply(r, OPT_GO).await?;
        match rep {
            REP_INFO => {
                let mut c = Cursor::new(&data);
                let bad = || format!("malformed information reply to 'go' ({} bytes)", data.len());
                match c.u16().ok_or_else(bad)? {
                    INFO_EXPORT => {
                        let size = c.u64().ok_or_else(bad)?;
                        let flags = c.u16().ok_or_else(bad)?;
                        if !c.done() {
                            return Err(bad());
                        }
                        export_info = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE => {
                        let min = c.u32().ok_or_else(bad)?;
                        let preferred = c.u32().ok_or_else(bad)?;
                        let max = c.u32().ok_or_else(bad)?;
                        if !c.done() {
                            return Err(bad());
                        }
                        sizes = Some(check_block_sizes(min, preferred, max)?);
                    }
                    // Names and descriptions are not needed.
                    _ => {}
                }
            }
            REP_ACK => break,
            REP_ERR_UNSUP => {
                return export_name(r, w, export, no_zeroes, structured, base_allocation).await
            }
            rep if rep & REP_FLAG_ERROR != 0 => {
                return Err(format!(
                    "the server refused export '{export}': {}",
                    err_text(rep, &data)
                ))
            }
            rep => return Err(format!("unexpected reply {rep} to 'go'")),
        }
    }
    let (size, flags) = export_info
        .ok_or_else(|| "the server accepted 'go' without describing the export".to_string())?;
    finish(size, flags, sizes, structured, base_allocation)
}

/// Selects `base:allocation`; its id, or `None` when the server has none.
async fn set_meta_context<R, W>(r: &mut R, w: &mut W, export: &str) -> Result<Option<u32>, Why>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut data = Vec::new();
    put_string(&mut data, export)?;
    data.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut data, CTX_BASE_ALLOCATION)?;
    send_option(w, OPT_SET_META_CONTEXT, &data).await?;
    let mut id = None;
    // Each reply is read whole and bounded; a server can send at most
    // one context per query, and one more would be a protocol error.
    for _ in 0..=1 {
        let (rep, data) = read_reply(r, OPT_SET_META_CONTEXT).await?;
        match rep {
            REP_META_CONTEXT => {
                let mut c = Cursor::new(&data);
                let ctx = c
                    .u32()
                    .ok_or_else(|| "malformed metadata context reply".to_string())?;
                if c.rest() != CTX_BASE_ALLOCATION.as_bytes() || id.is_some() {
                    return Err(
                        "the server selected a metadata context that was not asked for".to_string(),
                    );
                }
                id = Some(ctx);
            }
            REP_ACK => return Ok(id),
            // An export without metadata: block status reads as data.
            rep if rep & REP_FLAG_ERROR != 0 => return Ok(None),
            rep => return Err(format!("unexpected reply {rep} to 'set meta context'")),
        }
    }
    Err("the server sent too many metadata contexts".into())
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with the export or hangs up.
async fn export_name<R, W>(
    r: &mut R,
    w: &mut W,
    export: &str,
    no_zeroes: bool,
    structured: bool,
    base_allocation: Option<u32>,
) -> Result<ExportInfo, Why>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if export.len() > MAX_STRING {
        return Err(format!("export name of {} bytes is too long", export.len()));
    }
    send_option(w, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let mut b = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { b.len() };
    r.read_exact(&mut b[..n]).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format!("the server has no export '{export}' (it closed the connection)")
        } else {
            io_why(e)
        }
    })?;
    let mut c = Cursor::new(&b[..10]);
    let size = c.u64().unwrap_or(0);
    let flags = c.u16().unwrap_or(0);
    finish(size, flags, None, structured, base_allocation)
}

/// Checks the server's block size constraints (the protocol's rules):
/// returns the minimum and the maximum payload sluice will use.
fn check_block_sizes(min: u32, preferred: u32, max: u32) -> Result<(u32, u32), Why> {
    if !min.is_power_of_two() || min > 64 << 10 {
        return Err(format!(
            "the server's minimum block size {min} is not a power of two up to 64 KiB"
        ));
    }
    if !preferred.is_power_of_two() || preferred < min {
        return Err(format!(
            "the server's preferred block size {preferred} is not a power of two of at least {min}"
        ));
    }
    if max < min || (max != u32::MAX && max & (min - 1) != 0) {
        return Err(format!(
            "the server's maximum block size {max} is not a multiple of its minimum {min}"
        ));
    }
    Ok((min, max))
}

fn finish(
    size: u64,
    flags: u16,
    sizes: Option<(u32, u32)>,
    structured: bool,
    base_allocation: Option<u32>,
) -> Result<ExportInfo, Why> {
    if size > i64::MAX as u64 {
        return Err(format!("the export size {size} is too large"));
    }
    let (min_block, max) = sizes.unwrap_or((1, MAX_PAYLOAD));
    // Never more than the protocol's portable maximum, and whole blocks.
    let max_payload = max.min(MAX_PAYLOAD) & !(min_block - 1);
    Ok(ExportInfo {
        // A tail shorter than the minimum block cannot be addressed, so it
        // is left out, as QEMU does.
        size: size & !(u64::from(min_block) - 1),
        flags,
        min_block,
        max_payload,
        structured,
        base_allocation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_follow_the_protocol_rules() {
        assert_eq!(check_block_sizes(512, 4096, 1 << 25), Ok((512, 1 << 25)));
        assert_eq!(check_block_sizes(1, 4096, u32::MAX), Ok((1, u32::MAX)));
        assert!(check_block_sizes(0, 4096, 1 << 25).is_err());
        assert!(check_block_sizes(3, 4096, 1 << 25).is_err());
        assert!(check_block_sizes(1 << 20, 1 << 20, 1 << 25).is_err());
        assert!(check_block_sizes(512, 256, 1 << 25).is_err());
        assert!(check_block_sizes(512, 4096, 1000).is_err());
    }

    #[test]
    fn sizes_and_payloads_are_whole_blocks() {
        let i = finish(10_000, 0, Some((4096, u32::MAX)), true, None).unwrap();
        assert_eq!((i.size, i.max_payload), (8192, MAX_PAYLOAD));
        assert!(finish(u64::MAX, 0, None, false, None).is_err());
    }
}
