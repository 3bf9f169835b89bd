//! The NBD server driven by a raw-socket client written to the protocol
//! document: handshake and options, requests and their validation,
//! structured replies, metadata contexts, protocol violations (that
//! connection closes, others carry on), export removal, shutdown.

use serde_json::json;
use sluice_core::{Graph, IoBytes, PermPair, WriteFlags};
use sluice_drivers::blockdev_add;
use sluice_exports::nbd::proto::*;
use sluice_exports::{ExportConfig, ListenAddr, NbdServer, RemoveMode, ServerConfig};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

const SIZE: u64 = 4 << 20;

struct Fixture {
    rt: tokio::runtime::Runtime,
    graph: Graph,
    server: NbdServer,
    sock: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "sluice-nbd-test-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// A server with a writable 4 MiB memory export "mem" (64 KiB of 0xab at
/// offset 0, 4 KiB of 0x01 at 1 MiB), a read-only export "ro" of the
/// same node, and "aligned": a blkdebug node with align=512 over it.
fn fixture(tag: &str) -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir(tag);
    let sock = dir.0.join("nbd.sock");
    let graph = Graph::new();
    let server = NbdServer::new(ServerConfig::default());
    rt.block_on(async {
        let w = graph.writer().await;
        let mem = blockdev_add(
            &w,
            json!({"driver": "memory", "node-name": "mem", "size": SIZE}),
        )
        .await
        .unwrap();
        let aligned = blockdev_add(
            &w,
            json!({"driver": "blkdebug", "node-name": "aligned", "image": "mem", "align": 512}),
        )
        .await
        .unwrap();
        let loader = w
            .add_root(
                "test",
                "loader",
                &mem,
                PermPair::new(
                    sluice_core::Perm::CONSISTENT_READ | sluice_core::Perm::WRITE,
                    sluice_core::Perm::ALL,
                ),
            )
            .await
            .unwrap();
        loader
            .write(0, IoBytes::copy_from(&[0xab; 65536]), WriteFlags::default())
            .await
            .unwrap();
        loader
            .write(
                1 << 20,
                IoBytes::copy_from(&[0x01; 4096]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        drop(loader);
        let mut cfg = ExportConfig::new("mem");
        cfg.writable = true;
        cfg.description = Some("a RAM disk".into());
        server.add_export(&w, cfg, &mem).await.unwrap();
        let mut ro = ExportConfig::new("ro");
        ro.allocation_depth = false;
        server.add_export(&w, ro, &mem).await.unwrap();
        let mut al = ExportConfig::new("aligned");
        al.writable = true;
        server.add_export(&w, al, &aligned).await.unwrap();
        drop(w);
        server
            .listen(&ListenAddr::Unix(sock.clone()))
            .await
            .unwrap();
    });
    Fixture {
        rt,
        graph,
        server,
        sock,
        _dir: dir,
    }
}

struct Client {
    s: UnixStream,
}

#[derive(Debug)]
struct Rep {
    opt: u32,
    ty: u32,
    data: Vec<u8>,
}

struct ChunkIn {
    flags: u16,
    ty: u16,
    handle: u64,
    data: Vec<u8>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    fn connect(path: &PathBuf) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client { s }
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// Greeting and client flags (fixed newstyle, no zeroes).
    fn hello(&mut self) {
        let g = self.read_n(18);
        assert_eq!(be64(&g[0..]), NBDMAGIC);
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        let hflags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(hflags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.s
            .write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    fn rep(&mut self) -> Rep {
        let h = self.read_n(20);
        assert_eq!(be64(&h), REP_MAGIC);
        let len = be32(&h[16..]) as usize;
        Rep {
            opt: be32(&h[8..]),
            ty: be32(&h[12..]),
            data: self.read_n(len),
        }
    }

    fn structured(&mut self) {
        self.send_opt(OPT_STRUCTURED_REPLY, &[]);
        let r = self.rep();
        assert_eq!((r.opt, r.ty), (OPT_STRUCTURED_REPLY, REP_ACK));
    }

    fn meta(&mut self, opt: u32, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.send_opt(opt, &d);
        let mut out = Vec::new();
        loop {
            let r = self.rep();
            match r.ty {
                REP_META_CONTEXT => out.push((
                    be32(&r.data),
                    String::from_utf8(r.data[4..].to_vec()).unwrap(),
                )),
                REP_ACK => return out,
                t => panic!("unexpected reply {t:#x}"),
            }
        }
    }

    /// NBD_OPT_GO; returns (size, transmission flags) or the error reply.
    fn go(&mut self, name: &str, infos: &[u16]) -> Result<(u64, u16, Vec<Rep>), Rep> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.send_opt(OPT_GO, &d);
        let mut infos_out = Vec::new();
        let mut export = None;
        loop {
            let r = self.rep();
            match r.ty {
                REP_INFO => {
                    if u16::from_be_bytes([r.data[0], r.data[1]]) == INFO_EXPORT {
                        export = Some((
                            be64(&r.data[2..]),
                            u16::from_be_bytes([r.data[10], r.data[11]]),
                        ));
                    }
                    infos_out.push(r);
                }
                REP_ACK => {
                    let (size, flags) = export.expect("NBD_INFO_EXPORT sent");
                    return Ok((size, flags, infos_out));
                }
                _ => return Err(r),
            }
        }
    }

    fn request(&mut self, flags: u16, ty: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply: (errno, handle).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
        (be32(&h[4..]), be64(&h[8..]))
    }

    fn chunk(&mut self) -> ChunkIn {
        let h = self.read_n(20);
        assert_eq!(be32(&h), STRUCTURED_REPLY_MAGIC, "structured magic");
        let len = be32(&h[16..]) as usize;
        ChunkIn {
            flags: u16::from_be_bytes([h[4], h[5]]),
            ty: u16::from_be_bytes([h[6], h[7]]),
            handle: be64(&h[8..]),
            data: self.read_n(len),
        }
    }

    /// Every chunk of one reply (up to DONE).
    fn reply_chunks(&mut self) -> Vec<ChunkIn> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.flags & REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }

    /// Whether the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// A structured read, reassembled; Err(errno) on an error chunk.
    fn sread(
        &mut self,
        handle: u64,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> Result<(Vec<u8>, Vec<u16>), u32> {
        self.request(flags, CMD_READ, handle, offset, len, &[]);
        let mut out = vec![0x55u8; len as usize];
        let mut types = Vec::new();
        let mut covered = 0u64;
        let mut err = None;
        for c in self.reply_chunks() {
            assert_eq!(c.handle, handle);
            types.push(c.ty);
            match c.ty {
                REPLY_TYPE_OFFSET_DATA => {
                    let off = be64(&c.data) - offset;
                    let d = &c.data[8..];
                    out[off as usize..off as usize + d.len()].copy_from_slice(d);
                    covered += d.len() as u64;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let off = be64(&c.data) - offset;
                    let n = be32(&c.data[8..]) as usize;
                    out[off as usize..off as usize + n].fill(0);
                    covered += n as u64;
                }
                REPLY_TYPE_ERROR => err = Some(be32(&c.data)),
                REPLY_TYPE_NONE => {}
                t => panic!("unexpected chunk {t}"),
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        assert_eq!(covered, len as u64, "read reply covers the request");
        Ok((out, types))
    }

    /// An error from a non-read request under structured replies (0 = ok).
    fn status_of_reply(&mut self, handle: u64) -> u32 {
        let mut h = [0u8; 4];
        self.s.read_exact(&mut h).unwrap();
        if be32(&h) == SIMPLE_REPLY_MAGIC {
            let rest = self.read_n(12);
            assert_eq!(be64(&rest[4..]), handle);
            return be32(&rest);
        }
        assert_eq!(be32(&h), STRUCTURED_REPLY_MAGIC);
        let rest = self.read_n(16);
        assert_eq!(be64(&rest[4..]), handle);
        let len = be32(&rest[12..]) as usize;
        let data = self.read_n(len);
        let ty = u16::from_be_bytes([rest[2], rest[3]]);
        assert_eq!(ty, REPLY_TYPE_ERROR);
        assert_ne!(u16::from_be_bytes([rest[0], rest[1]]) & REPLY_FLAG_DONE, 0);
        be32(&data)
    }
}

/// A connected, structured client in transmission on `export`.
fn open(f: &Fixture, export: &str, contexts: &[&str]) -> (Client, u16) {
    let mut c = Client::connect(&f.sock);
    c.hello();
    c.structured();
    if !contexts.is_empty() {
        c.meta(OPT_SET_META_CONTEXT, export, contexts);
    }
    let (size, flags, _) = c.go(export, &[]).unwrap();
    assert_eq!(size, SIZE);
    (c, flags)
}

#[test]
fn handshake_options_and_unknown_options_keep_the_connection_usable() {
    let f = fixture("opts");
    let mut c = Client::connect(&f.sock);
    c.hello();
    // Unknown option, then STARTTLS: errors, and the session goes on.
    c.send_opt(42, b"junk");
    let r = c.rep();
    assert_eq!((r.opt, r.ty), (42, REP_ERR_UNSUP));
    assert!(String::from_utf8_lossy(&r.data).contains("Unsupported option 42"));
    c.send_opt(OPT_STARTTLS, &[]);
    assert_eq!(c.rep().ty, REP_ERR_POLICY);
    // LIST: one REP_SERVER per export, then ACK.
    c.send_opt(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.rep();
        if r.ty == REP_ACK {
            break;
        }
        assert_eq!(r.ty, REP_SERVER);
        let n = be32(&r.data) as usize;
        names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["mem", "ro", "aligned"]);
    // Meta contexts need structured replies first.
    let mut d = 3u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"mem");
    d.extend_from_slice(&0u32.to_be_bytes());
    c.send_opt(OPT_LIST_META_CONTEXT, &d);
    assert_eq!(c.rep().ty, REP_ERR_INVALID);
    c.structured();
    // A second STRUCTURED_REPLY is refused.
    c.send_opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.rep().ty, REP_ERR_INVALID);
    let all = c.meta(OPT_LIST_META_CONTEXT, "mem", &[]);
    assert_eq!(
        all.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
        [CTX_BASE_ALLOCATION, CTX_ALLOCATION_DEPTH]
    );
    let qemu = c.meta(OPT_LIST_META_CONTEXT, "ro", &["qemu:"]);
    assert!(qemu.is_empty(), "ro has allocation-depth off");
    let set = c.meta(
        OPT_SET_META_CONTEXT,
        "mem",
        &["base:allocation", "x-nope:thing", "qemu:allocation-depth"],
    );
    assert_eq!(set.len(), 2);
    // INFO on an unknown export: ERR_UNKNOWN; on a known one: the facts.
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_opt(OPT_INFO, &d);
    assert_eq!(c.rep().ty, REP_ERR_UNKNOWN);
    // Malformed GO data: ERR_INVALID, still usable.
    c.send_opt(OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.rep().ty, REP_ERR_INVALID);
    let (size, flags, infos) = c
        .go("mem", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])
        .unwrap();
    assert_eq!(size, SIZE);
    for want in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_DF,
        FLAG_CAN_MULTI_CONN,
        FLAG_SEND_CACHE,
        FLAG_SEND_FAST_ZERO,
    ] {
        assert_ne!(flags & want, 0, "flag {want:#x}");
    }
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    let kinds: Vec<u16> = infos
        .iter()
        .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
        .collect();
    assert!(kinds.contains(&INFO_NAME) && kinds.contains(&INFO_DESCRIPTION));
    let bs = infos
        .iter()
        .find(|r| u16::from_be_bytes([r.data[0], r.data[1]]) == INFO_BLOCK_SIZE)
        .unwrap();
    assert_eq!(be32(&bs.data[2..]), 1);
    assert_eq!(be32(&bs.data[10..]), 32 << 20);
    // Transmission works, with the selected contexts.
    let (data, _) = c.sread(1, 0, 4096, 0).unwrap();
    assert!(data.iter().all(|&b| b == 0xab));
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 2 << 20, &[]);
    let chunks = c.reply_chunks();
    assert_eq!(chunks.len(), 2);
    assert!(chunks.iter().all(|c| c.ty == REPLY_TYPE_BLOCK_STATUS));
    c.request(0, CMD_DISC, 3, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn abort_and_export_name_and_simple_replies() {
    let f = fixture("simple");
    let mut c = Client::connect(&f.sock);
    c.hello();
    c.send_opt(OPT_ABORT, &[]);
    assert_eq!(c.rep().ty, REP_ACK);
    assert!(c.closed());
    // EXPORT_NAME of an unknown export: the server can only hang up.
    let mut c = Client::connect(&f.sock);
    c.hello();
    c.send_opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // EXPORT_NAME, simple replies.
    let mut c = Client::connect(&f.sock);
    c.hello();
    c.send_opt(OPT_EXPORT_NAME, b"mem");
    let r = c.read_n(10);
    assert_eq!(be64(&r), SIZE);
    c.request(0, CMD_READ, 7, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 7));
    assert_eq!(c.read_n(512), vec![0xab; 512]);
    // Past the end: EINVAL and no payload; the connection stays.
    c.request(0, CMD_READ, 8, SIZE - 512, 1024, &[]);
    assert_eq!(c.simple(), (EINVAL, 8));
    c.request(0, CMD_WRITE, 9, SIZE, 4, b"abcd");
    assert_eq!(c.simple(), (ENOSPC, 9));
    // DF without structured replies is not allowed.
    c.request(CMD_FLAG_DF, CMD_READ, 10, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 10));
    // Block status without contexts.
    c.request(0, CMD_BLOCK_STATUS, 11, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 11));
    // Unknown command.
    c.request(0, 99, 12, 0, 0, &[]);
    assert_eq!(c.simple(), (EINVAL, 12));
    c.request(0, CMD_WRITE, 13, 4096, 4, b"wxyz");
    assert_eq!(c.simple(), (0, 13));
    c.request(0, CMD_READ, 14, 4096, 4, &[]);
    assert_eq!(c.simple(), (0, 14));
    assert_eq!(c.read_n(4), b"wxyz");
}

#[test]
fn reads_writes_and_zeroes_with_structured_replies() {
    let f = fixture("rw");
    let (mut c, _) = open(&f, "mem", &[]);
    // Data then hole, as separate chunks.
    let (data, types) = c.sread(1, 0, 131072, 0).unwrap();
    assert_eq!(&data[..65536], &[0xab; 65536][..]);
    assert_eq!(&data[65536..], &[0; 65536][..]);
    assert_eq!(types, [REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE]);
    // Small reads and DF reads: one data chunk.
    let (small, types) = c.sread(20, 61440, 8192, 0).unwrap();
    assert_eq!(small, data[61440..69632]);
    assert_eq!(types, [REPLY_TYPE_OFFSET_DATA]);
    let (data2, types) = c.sread(2, 0, 131072, CMD_FLAG_DF).unwrap();
    assert_eq!(data, data2);
    assert_eq!(types, [REPLY_TYPE_OFFSET_DATA]);
    // Write with FUA, read back.
    c.request(CMD_FLAG_FUA, CMD_WRITE, 3, 100_000, 3, b"xyz");
    assert_eq!(c.status_of_reply(3), 0);
    assert_eq!(c.sread(4, 100_000, 3, 0).unwrap().0, b"xyz");
    // Write zeroes, trim, flush, cache.
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 0, 8192, &[]);
    assert_eq!(c.status_of_reply(5), 0);
    assert_eq!(c.sread(6, 0, 8192, 0).unwrap().0, vec![0; 8192]);
    c.request(0, CMD_TRIM, 7, 1 << 20, 4096, &[]);
    assert_eq!(c.status_of_reply(7), 0);
    c.request(0, CMD_FLUSH, 8, 0, 0, &[]);
    assert_eq!(c.status_of_reply(8), 0);
    c.request(0, CMD_CACHE, 9, 0, 1 << 20, &[]);
    assert_eq!(c.status_of_reply(9), 0);
    // Validation errors.
    assert_eq!(c.sread(10, SIZE, 1, 0), Err(EINVAL));
    assert_eq!(c.sread(11, u64::MAX - 10, 100, 0), Err(EINVAL));
    assert_eq!(c.sread(12, 0, (32 << 20) + 1, 0), Err(EINVAL));
    c.request(CMD_FLAG_REQ_ONE, CMD_WRITE, 13, 0, 1, b"a");
    assert_eq!(c.status_of_reply(13), EINVAL, "flag not valid for write");
    c.request(0, CMD_FLUSH, 14, 1, 0, &[]);
    assert_eq!(c.status_of_reply(14), EINVAL);
    c.request(0, CMD_TRIM, 15, SIZE - 1, 2, &[]);
    assert_eq!(c.status_of_reply(15), EINVAL);
    c.request(0, CMD_WRITE_ZEROES, 16, SIZE - 1, 2, &[]);
    assert_eq!(c.status_of_reply(16), ENOSPC);
    // Block status without a context selected.
    c.request(0, CMD_BLOCK_STATUS, 17, 0, 512, &[]);
    assert_eq!(c.status_of_reply(17), EINVAL);
    // Still alive.
    assert_eq!(c.sread(18, 100_000, 3, 0).unwrap().0, b"xyz");
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let f = fixture("ro");
    let (mut c, flags) = open(&f, "ro", &[]);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & FLAG_SEND_TRIM, 0);
    c.request(0, CMD_WRITE, 1, 0, 4, b"abcd");
    assert_eq!(c.status_of_reply(1), EPERM);
    c.request(0, CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(c.status_of_reply(2), EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(c.status_of_reply(3), EPERM);
    assert_eq!(c.sread(4, 0, 4, 0).unwrap().0, [0xab; 4]);
}

#[test]
fn misaligned_requests_get_einval_when_block_size_was_negotiated() {
    let f = fixture("align");
    let mut c = Client::connect(&f.sock);
    c.hello();
    c.structured();
    let (_, _, infos) = c.go("aligned", &[INFO_BLOCK_SIZE]).unwrap();
    let bs = infos
        .iter()
        .find(|r| u16::from_be_bytes([r.data[0], r.data[1]]) == INFO_BLOCK_SIZE)
        .unwrap();
    assert_eq!(be32(&bs.data[2..]), 512, "minimum block size");
    assert_eq!(c.sread(1, 1, 512, 0), Err(EINVAL));
    c.request(0, CMD_WRITE, 2, 512, 100, &[7u8; 100]);
    assert_eq!(c.status_of_reply(2), EINVAL);
    assert_eq!(c.sread(3, 512, 512, 0).unwrap().0, vec![0xab; 512]);
    // A client that did not ask for block sizes gets unaligned requests
    // served by the block layer.
    let (mut c2, _) = open(&f, "aligned", &[]);
    assert_eq!(c2.sread(1, 1, 3, 0).unwrap().0, [0xab; 3]);
    // FAST_ZERO: zeroing that would need the slow path fails at once with
    // ENOTSUP and changes nothing; the fast path works.
    c2.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 2, 1, 100, &[]);
    assert_eq!(c2.status_of_reply(2), ENOTSUP);
    assert_eq!(c2.sread(3, 0, 8, 0).unwrap().0, [0xab; 8]);
    c2.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 4, 4096, 4096, &[]);
    assert_eq!(c2.status_of_reply(4), 0);
    assert_eq!(c2.sread(5, 4096, 4096, 0).unwrap().0, vec![0; 4096]);
    // Without FAST_ZERO the unaligned request falls back and succeeds.
    c2.request(0, CMD_WRITE_ZEROES, 6, 1, 100, &[]);
    assert_eq!(c2.status_of_reply(6), 0);
    let (d, _) = c2.sread(7, 0, 102, 0).unwrap();
    assert_eq!(d[0], 0xab);
    assert!(d[1..101].iter().all(|&b| b == 0));
    assert_eq!(d[101], 0xab);
}

#[test]
fn block_status_contexts_match_the_allocation() {
    let f = fixture("status");
    let (mut c, _) = open(&f, "mem", &["base:allocation", "qemu:allocation-depth"]);
    c.request(0, CMD_BLOCK_STATUS, 1, 0, SIZE as u32, &[]);
    let chunks = c.reply_chunks();
    assert_eq!(chunks.len(), 2);
    let parse = |d: &[u8]| -> (u32, Vec<(u32, u32)>) {
        let id = be32(d);
        let descs = d[4..].chunks(8).map(|e| (be32(e), be32(&e[4..]))).collect();
        (id, descs)
    };
    let (id0, base) = parse(&chunks[0].data);
    let (id1, depth) = parse(&chunks[1].data);
    assert_ne!(id0, id1);
    let mib = 1 << 20;
    assert_eq!(
        base,
        [
            (65536, 0),
            (mib - 65536, STATE_HOLE | STATE_ZERO),
            (4096, 0),
            (SIZE as u32 - mib - 4096, STATE_HOLE | STATE_ZERO)
        ]
    );
    assert_eq!(
        depth,
        [
            (65536, 1),
            (mib - 65536, 0),
            (4096, 1),
            (SIZE as u32 - mib - 4096, 0)
        ]
    );
    // REQ_ONE: one descriptor per context.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 2, 0, SIZE as u32, &[]);
    for ch in c.reply_chunks() {
        assert_eq!(ch.data.len(), 12);
        assert_eq!(be32(&ch.data[4..]), 65536);
    }
    // Past the end.
    c.request(0, CMD_BLOCK_STATUS, 3, SIZE - 512, 1024, &[]);
    assert_eq!(c.status_of_reply(3), EINVAL);
}

#[test]
fn protocol_violations_close_only_that_connection() {
    let f = fixture("violations");
    let (mut good, _) = open(&f, "mem", &[]);
    // Bad request magic.
    let (mut bad, _) = open(&f, "mem", &[]);
    bad.s.write_all(&[0xde; 28]).unwrap();
    assert!(bad.closed());
    assert_eq!(good.sread(1, 0, 4, 0).unwrap().0, [0xab; 4]);
    // Oversized write payload.
    let (mut bad, _) = open(&f, "mem", &[]);
    bad.request(0, CMD_WRITE, 1, 0, (32 << 20) + 1, &[]);
    assert!(bad.closed());
    assert_eq!(good.sread(2, 0, 4, 0).unwrap().0, [0xab; 4]);
    // Unknown client flags.
    let mut bad = Client::connect(&f.sock);
    bad.read_n(18);
    bad.s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(bad.closed());
    // Bad option magic.
    let mut bad = Client::connect(&f.sock);
    bad.hello();
    bad.s.write_all(&[0u8; 16]).unwrap();
    assert!(bad.closed());
    // A huge option length: no allocation, just a closed connection.
    let mut bad = Client::connect(&f.sock);
    bad.hello();
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    bad.s.write_all(&m).unwrap();
    assert!(bad.closed());
    // Garbage before the handshake, then a disconnect mid-request.
    let mut bad = Client::connect(&f.sock);
    bad.read_n(18);
    drop(bad);
    let (mut bad, _) = open(&f, "mem", &[]);
    bad.request(0, CMD_WRITE, 1, 0, 65536, &[1; 100]);
    drop(bad);
    assert_eq!(good.sread(3, 0, 4, 0).unwrap().0, [0xab; 4]);
}

#[test]
fn many_requests_in_flight_and_many_clients() {
    let f = fixture("many");
    let mut clients: Vec<Client> = (0..4).map(|_| open(&f, "mem", &[]).0).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        // 64 pipelined writes, replies in any order.
        for k in 0..64u64 {
            let off = (i as u64 * 64 + k) * 4096 + (2 << 20);
            c.request(
                0,
                CMD_WRITE,
                k,
                off,
                4096,
                &[(i * 64 + k as usize) as u8; 4096],
            );
        }
    }
    for c in clients.iter_mut() {
        let mut seen: Vec<u64> = (0..64)
            .map(|_| {
                let mut h = [0u8; 16];
                c.s.read_exact(&mut h).unwrap();
                assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
                assert_eq!(be32(&h[4..]), 0);
                be64(&h[8..])
            })
            .collect();
        seen.sort();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
    }
    let c = &mut clients[0];
    for i in 0..4u64 {
        for k in [0u64, 63] {
            let off = (i * 64 + k) * 4096 + (2 << 20);
            let (d, _) = c.sread(1000 + i * 64 + k, off, 4096, 0).unwrap();
            assert_eq!(d, vec![(i * 64 + k) as u8; 4096]);
        }
    }
}

#[test]
fn export_removal_safe_refuses_and_hard_closes() {
    let f = fixture("remove");
    let (mut c, _) = open(&f, "mem", &[]);
    let err =
        f.rt.block_on(f.server.remove_export("mem", RemoveMode::Safe))
            .unwrap_err();
    assert!(err.to_string().contains("still in use"), "{err}");
    assert_eq!(f.server.exports()[0].clients, 1);
    // Still serving.
    assert_eq!(c.sread(1, 0, 4, 0).unwrap().0, [0xab; 4]);
    f.rt.block_on(f.server.remove_export("mem", RemoveMode::Hard))
        .unwrap();
    assert!(c.closed());
    assert!(f.server.exports().iter().all(|e| e.id != "mem"));
    // The export's root is gone: only "ro" and "aligned" use the node now.
    let mem = f.graph.node("mem").unwrap();
    let parents: Vec<String> = mem
        .parents()
        .iter()
        .map(|e| e.parent().describe())
        .collect();
    assert!(parents.iter().all(|p| !p.contains("'mem'")), "{parents:?}");
    // An unused export goes in safe mode.
    f.rt.block_on(f.server.remove_export("ro", RemoveMode::Safe))
        .unwrap();
    let err =
        f.rt.block_on(f.server.remove_export("ro", RemoveMode::Safe))
            .unwrap_err();
    assert_eq!(err.to_string(), "Export 'ro' is not found");
    // New clients no longer find it.
    let mut c = Client::connect(&f.sock);
    c.hello();
    assert_eq!(c.go("mem", &[]).unwrap_err().ty, REP_ERR_UNKNOWN);
}

#[test]
fn shutdown_closes_clients_and_removes_the_socket() {
    let f = fixture("shutdown");
    let (mut c, _) = open(&f, "mem", &[]);
    let mut negotiating = Client::connect(&f.sock);
    negotiating.hello();
    f.rt.block_on(f.server.shutdown());
    assert!(c.closed());
    assert!(negotiating.closed());
    assert!(!f.sock.exists());
    assert_eq!(f.server.connections(), 0);
    assert!(f.server.exports().is_empty());
}

#[test]
fn duplicate_exports_are_refused_with_qemus_words() {
    let f = fixture("dup");
    f.rt.block_on(async {
        let w = f.graph.writer().await;
        let mem = f.graph.node("mem").unwrap();
        let e = f
            .server
            .add_export(&w, ExportConfig::new("mem"), &mem)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "Block export id 'mem' is already in use");
        let mut cfg = ExportConfig::new("mem");
        cfg.id = "other".into();
        let e = f.server.add_export(&w, cfg, &mem).await.unwrap_err();
        assert_eq!(e.to_string(), "NBD server already has export named 'mem'");
    });
}

#[test]
fn max_connections_holds_new_clients_until_one_leaves() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir("maxconn");
    let sock = dir.0.join("s");
    let server = NbdServer::new(ServerConfig { max_connections: 1 });
    rt.block_on(server.listen(&ListenAddr::Unix(sock.clone())))
        .unwrap();
    let mut a = Client::connect(&sock);
    a.hello();
    // The second connection is accepted by the kernel but not served.
    let mut b = Client::connect(&sock);
    b.s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut g = [0u8; 1];
    assert!(b.s.read(&mut g).is_err(), "no greeting while full");
    b.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    a.send_opt(OPT_ABORT, &[]);
    assert_eq!(a.rep().ty, REP_ACK);
    drop(a);
    let greeting = b.read_n(18);
    assert_eq!(be64(&greeting), NBDMAGIC);
}

#[test]
fn tcp_listener_on_loopback() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = NbdServer::new(ServerConfig::default());
    let addr = rt
        .block_on(server.listen(&ListenAddr::Inet {
            host: "127.0.0.1".into(),
            port: 0,
        }))
        .unwrap()
        .unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(be64(&g), NBDMAGIC);
    rt.block_on(server.shutdown());
}

#[test]
fn allocation_depth_counts_layers_of_a_backing_chain() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir("chain");
    let sock = dir.0.join("s");
    let graph = Graph::new();
    let server = NbdServer::new(ServerConfig::default());
    rt.block_on(async {
        let w = graph.writer().await;
        let base = blockdev_add(
            &w,
            json!({"driver": "memory", "node-name": "base", "size": 1 << 20}),
        )
        .await
        .unwrap();
        let top = blockdev_add(
            &w,
            json!({"driver": "memory", "node-name": "top", "size": 1 << 20, "backing": "base"}),
        )
        .await
        .unwrap();
        let all = PermPair::new(
            sluice_core::Perm::CONSISTENT_READ | sluice_core::Perm::WRITE,
            sluice_core::Perm::ALL,
        );
        let lb = w.add_root("test", "lb", &base, all).await.unwrap();
        lb.write(0, IoBytes::copy_from(&[1; 8192]), WriteFlags::default())
            .await
            .unwrap();
        drop(lb);
        let lt = w.add_root("test", "lt", &top, all).await.unwrap();
        lt.write(4096, IoBytes::copy_from(&[2; 4096]), WriteFlags::default())
            .await
            .unwrap();
        drop(lt);
        server
            .add_export(&w, ExportConfig::new("top"), &top)
            .await
            .unwrap();
        drop(w);
        server
            .listen(&ListenAddr::Unix(sock.clone()))
            .await
            .unwrap();
    });
    let mut c = Client::connect(&sock);
    c.hello();
    c.structured();
    let set = c.meta(
        OPT_SET_META_CONTEXT,
        "top",
        &["qemu:allocation-depth", "base:allocation"],
    );
    assert_eq!(set.len(), 2);
    c.go("top", &[]).unwrap();
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 1 << 20, &[]);
    let chunks = c.reply_chunks();
    let by_id = |id: u32| -> Vec<(u32, u32)> {
        let ch = chunks.iter().find(|c| be32(&c.data) == id).unwrap();
        ch.data[4..]
            .chunks(8)
            .map(|e| (be32(e), be32(&e[4..])))
            .collect()
    };
    let depth_id = set
        .iter()
        .find(|(_, n)| n == CTX_ALLOCATION_DEPTH)
        .unwrap()
        .0;
    let base_id = set
        .iter()
        .find(|(_, n)| n == CTX_BASE_ALLOCATION)
        .unwrap()
        .0;
    assert_eq!(
        by_id(depth_id),
        [(4096, 2), (4096, 1), ((1 << 20) - 8192, 0)]
    );
    assert_eq!(
        by_id(base_id),
        [(8192, 0), ((1 << 20) - 8192, STATE_HOLE | STATE_ZERO)]
    );
    // Reads see the chain.
    let (d, _) = c.sread(2, 0, 12288, 0).unwrap();
    assert_eq!(&d[..4096], &[1; 4096][..]);
    assert_eq!(&d[4096..8192], &[2; 4096][..]);
    assert_eq!(&d[8192..], &[0; 4096][..]);
    rt.block_on(server.shutdown());
}
