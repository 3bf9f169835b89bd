//! The NBD wire format, shared by the client (`driver=nbd`) and the server
//! in `sluice-exports`: constants from the NBD protocol document
//! (`doc/proto.md` of NetworkBlockDevice/nbd) and the fixed-size headers.
//! Everything on the wire is big-endian.

/// `NBDMAGIC`, the first thing a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// The second magic of an oldstyle server, which sluice does not speak.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The port of `nbd://host/` URLs without one.
pub const DEFAULT_PORT: u16 = 10809;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
/// Bit 31 marks every option error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;

// NBD_OPT_INFO / NBD_OPT_GO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// Bit 15 marks every error chunk type, known or not.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values allowed on the wire.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The largest request payload (read or write) accepted, as qemu-nbd.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The longest string (export name, query, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The largest option payload read during the handshake; anything larger
/// is treated as a denial of service and the connection closed.
pub const MAX_OPTION_LEN: u32 = 1 << 20;

pub const CTX_BASE_ALLOCATION: &str = "base:allocation";
pub const CTX_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Maps a host errno to one the protocol allows (as QEMU does).
pub fn wire_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EINVAL,
    }
}

/// Maps an error from the wire to the host's errno (as QEMU does: values
/// the protocol does not define become `EINVAL`).
pub fn host_errno(wire: u32) -> i32 {
    match wire {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// Command names for messages.
pub fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write zeroes",
        CMD_BLOCK_STATUS => "block status",
        _ => "<unknown>",
    }
}

/// A transmission-phase request header (28 bytes, then a write's payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub ty: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub const LEN: usize = 28;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut h = [0u8; Self::LEN];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&self.flags.to_be_bytes());
        h[6..8].copy_from_slice(&self.ty.to_be_bytes());
        h[8..16].copy_from_slice(&self.handle.to_be_bytes());
        h[16..24].copy_from_slice(&self.offset.to_be_bytes());
        h[24..28].copy_from_slice(&self.len.to_be_bytes());
        h
    }

    /// Decodes a header; `Err` carries a magic that is not a request's.
    pub fn decode(h: &[u8; Self::LEN]) -> Result<RequestHeader, u32> {
        let magic = be32(&h[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(RequestHeader {
            flags: be16(&h[4..6]),
            ty: be16(&h[6..8]),
            handle: be64(&h[8..16]),
            offset: be64(&h[16..24]),
            len: be32(&h[24..28]),
        })
    }
}

/// A simple reply header (16 bytes, then a successful simple read's data).
pub fn simple_reply(errno: u32, handle: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&errno.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h
}

/// A structured reply chunk header (20 bytes, then `len` bytes of payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub ty: u16,
    pub handle: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut h = [0u8; Self::LEN];
        h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&self.flags.to_be_bytes());
        h[6..8].copy_from_slice(&self.ty.to_be_bytes());
        h[8..16].copy_from_slice(&self.handle.to_be_bytes());
        h[16..20].copy_from_slice(&self.len.to_be_bytes());
        h
    }

    /// Decodes the 16 bytes that follow the structured reply magic.
    pub fn decode_after_magic(h: &[u8; 16]) -> ChunkHeader {
        ChunkHeader {
            flags: be16(&h[0..2]),
            ty: be16(&h[2..4]),
            handle: be64(&h[4..12]),
            len: be32(&h[12..16]),
        }
    }
}

/// An option request header (16 bytes, then `len` bytes of data).
pub fn option_request(opt: u32, len: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&len.to_be_bytes());
    h
}

/// An option reply header (20 bytes, then `len` bytes of data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReply {
    pub opt: u32,
    pub rep: u32,
    pub len: u32,
}

impl OptionReply {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut h = [0u8; Self::LEN];
        h[0..8].copy_from_slice(&REP_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&self.opt.to_be_bytes());
        h[12..16].copy_from_slice(&self.rep.to_be_bytes());
        h[16..20].copy_from_slice(&self.len.to_be_bytes());
        h
    }

    /// Decodes a header; `Err` carries a magic that is not a reply's.
    pub fn decode(h: &[u8; Self::LEN]) -> Result<OptionReply, u64> {
        let magic = be64(&h[0..8]);
        if magic != REP_MAGIC {
            return Err(magic);
        }
        Ok(OptionReply {
            opt: be32(&h[8..12]),
            rep: be32(&h[12..16]),
            len: be32(&h[16..20]),
        })
    }
}

/// A cursor over a message's payload: every read is bounds-checked.
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data, pos: 0 }
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be16)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be32)
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(be64)
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let b = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(b)
    }
    /// What is left, consumed.
    pub fn rest(&mut self) -> &'a [u8] {
        let b = &self.data[self.pos..];
        self.pos = self.data.len();
        b
    }
    pub fn done(&self) -> bool {
        self.pos == self.data.len()
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Option names for messages.
pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        4 => "peek export",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        11 => "extended headers",
        _ => "<unknown>",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let r = RequestHeader {
            flags: CMD_FLAG_FUA,
            ty: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(RequestHeader::decode(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] = 0;
        assert!(RequestHeader::decode(&bad).is_err());
        let c = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            ty: REPLY_TYPE_OFFSET_HOLE,
            handle: 7,
            len: 12,
        };
        let e = c.encode();
        assert_eq!(
            ChunkHeader::decode_after_magic(e[4..].try_into().unwrap()),
            c
        );
        let o = OptionReply {
            opt: OPT_GO,
            rep: REP_ACK,
            len: 0,
        };
        assert_eq!(OptionReply::decode(&o.encode()), Ok(o));
    }

    #[test]
    fn errnos_round_trip_and_unknown_ones_become_einval() {
        for e in [libc::EPERM, libc::EIO, libc::ENOSPC, libc::ENOTSUP] {
            assert_eq!(host_errno(wire_errno(e)), e);
        }
        assert_eq!(host_errno(9999), libc::EINVAL);
    }

    #[test]
    fn cursor_never_reads_past_the_end() {
        let mut c = Cursor::new(&[0, 1, 0, 0, 0]);
        assert_eq!(c.u16(), Some(1));
        assert_eq!(c.u32(), None);
        assert_eq!(c.bytes(usize::MAX), None);
        assert_eq!(c.rest(), &[0, 0, 0]);
        assert!(c.done());
    }
}
