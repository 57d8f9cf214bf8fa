//! What the kernel does with a UMEM over memory the caller owns, in
//! unaligned chunk mode, through real veth pairs in copy mode: the facts
//! `umem=guest` (guest RAM as the UMEM) rests on. Transmit descriptors may
//! start anywhere and cross pages; received bytes land at the fill address
//! plus the headroom plus 256, and nowhere else; the kernel refuses
//! addresses whose bytes would leave the region and descriptors longer than
//! a chunk; completions come in order but not always with the exact
//! address; sockets of several queues share one region, each with its own
//! completions.

mod common;

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use common::*;
use net_afxdp::testbed::VethPair;
use net_afxdp::{
    tx_checksum_request, RxDesc, SharedUmem, SharedUmemQueue, TxDesc, TxMetadata, XdpMode,
    XdpProgram, TX_METADATA_LEN, XDP_PACKET_HEADROOM,
};

const REGION: usize = 1 << 20;
/// What the test writes over the whole region first: any byte the kernel
/// writes shows up against it.
const CANARY: u8 = 0xa5;

/// An anonymous mapping standing in for guest RAM.
struct Region {
    ptr: *mut u8,
}

// SAFETY: plain memory; the tests touch it from one thread at a time
// (set-up runs on a thread inside the test's namespace).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn new() -> Region {
        // SAFETY: a fresh anonymous mapping, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        let region = Region { ptr: ptr.cast() };
        region.write(0, &vec![CANARY; REGION]);
        region
    }

    fn write(&self, offset: u64, bytes: &[u8]) {
        assert!(offset as usize + bytes.len() <= REGION);
        // SAFETY: in bounds of our mapping; the kernel does not hold these
        // bytes (not posted, or posted only after this write).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.add(offset as usize),
                bytes.len(),
            )
        }
    }

    /// A copy of the bytes at `[offset, offset + len)`.
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        assert!(offset as usize + len <= REGION);
        let mut out = vec![0; len];
        // SAFETY: in bounds; volatile reads tolerate the kernel writing
        // meanwhile (the tests read only after the kernel said it is done).
        for (i, b) in out.iter_mut().enumerate() {
            *b = unsafe { std::ptr::read_volatile(self.ptr.add(offset as usize + i)) };
        }
        out
    }

    /// Offsets of bytes that are not the canary, outside `written`.
    fn touched_outside(&self, written: &[(u64, usize)]) -> Vec<u64> {
        let all = self.read(0, REGION);
        all.iter()
            .enumerate()
            .filter(|&(i, &b)| {
                b != CANARY
                    && !written
                        .iter()
                        .any(|&(at, len)| (i as u64) >= at && (i as u64) < at + len as u64)
            })
            .map(|(i, _)| i as u64)
            .take(16)
            .collect()
    }

    /// Registers the region; the caller keeps `self` alive longer.
    fn umem(&self, chunk_size: u32, headroom: u32, tx_metadata: TxMetadata) -> SharedUmem {
        // SAFETY: page-aligned anonymous mapping of REGION bytes that each
        // test keeps until after the UMEM and its sockets are dropped.
        unsafe { SharedUmem::register(self.ptr, REGION, chunk_size, headroom, tx_metadata) }
            .expect("registering the region")
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our mapping; the UMEM and its sockets are gone by now
        // (declared after the region in every test).
        unsafe { libc::munmap(self.ptr.cast(), REGION) };
    }
}

fn ifindex(pair: &VethPair, dev: &str) -> u32 {
    pair.run(|| net_afxdp::ifindex(dev))
        .unwrap()
        .expect("veth index")
}

/// Registers `region` and binds one socket per queue of `queues` on
/// `pair.a`, inside the pair's namespace (where the sockets must be made
/// to find the veth).
fn bind_queues(
    pair: &VethPair,
    region: &Region,
    (chunk_size, headroom, tx_metadata): (u32, u32, TxMetadata),
    queues: &[u32],
    multi_buffer: bool,
) -> (SharedUmem, Vec<SharedUmemQueue>) {
    let index = ifindex(pair, &pair.a);
    pair.run(|| {
        let mut umem = region.umem(chunk_size, headroom, tx_metadata);
        let bound = queues
            .iter()
            .map(|&queue| SharedUmemQueue::bind(&mut umem, index, queue, 64, multi_buffer))
            .collect::<Result<Vec<_>, _>>()
            .expect("binding sockets on the shared UMEM");
        (umem, bound)
    })
    .expect("entering the test namespace")
}

/// One test's world: a veth pair, a packet socket on its far end, the
/// region and the sockets bound on it for `pair.a`. Fields drop in
/// order: the sockets, the UMEM, the region they point into, the pair.
struct Bench {
    queues: Vec<SharedUmemQueue>,
    umem: SharedUmem,
    region: Region,
    peer: net_afxdp::testbed::PacketSocket,
    a_mac: [u8; 6],
    b_mac: [u8; 6],
    pair: VethPair,
}

/// A [`Bench`] of `veth_queues` queues, sockets bound on `bound`.
fn bench(veth_queues: u32, chunk_size: u32, headroom: u32, bound: &[u32]) -> Bench {
    bench_with(
        veth_queues,
        (chunk_size, headroom, TxMetadata::Off),
        bound,
        false,
    )
}

/// A [`Bench`] whose UMEM has `umem` (chunk size, headroom, TX metadata)
/// and whose sockets bind multi-buffer if asked.
fn bench_with(
    veth_queues: u32,
    umem: (u32, u32, TxMetadata),
    bound: &[u32],
    multi_buffer: bool,
) -> Bench {
    require_root!();
    init_log();
    let pair = VethPair::new(veth_queues).unwrap();
    let (a_mac, b_mac) = (pair.mac(&pair.a).unwrap(), pair.mac(&pair.b).unwrap());
    let peer = packet_socket(&pair, &pair.b);
    let region = Region::new();
    let (umem, queues) = bind_queues(&pair, &region, umem, bound, multi_buffer);
    Bench {
        queues,
        umem,
        region,
        peer,
        a_mac,
        b_mac,
        pair,
    }
}

/// Collects `count` completions (kicking meanwhile) within two seconds.
fn completions(q: &mut SharedUmemQueue, count: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = Vec::new();
    let mut buf = [0u64; 64];
    while got.len() < count && Instant::now() < deadline {
        q.kick_tx();
        let n = q.completions(&mut buf);
        got.extend_from_slice(&buf[..n]);
        if n == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    got
}

/// Receives up to `count` descriptors within `timeout`.
fn received(q: &mut SharedUmemQueue, count: usize, timeout: Duration) -> Vec<RxDesc> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [RxDesc::default(); 16];
    while got.len() < count && Instant::now() < deadline {
        let n = q.receive(&mut buf);
        got.extend_from_slice(&buf[..n]);
        if n == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    got
}

/// Our XDP program on `pair.a` (native), redirecting queue 0 to `q`.
fn redirect_to(pair: &VethPair, q: &SharedUmemQueue) -> (XdpProgram, std::os::fd::OwnedFd) {
    let index = ifindex(pair, &pair.a);
    let program = XdpProgram::load(1, false).expect("loading the XDP program");
    // SAFETY: q's socket is open for the duration of this call.
    let socket = unsafe { BorrowedFd::borrow_raw(q.fd()) };
    program.insert_socket(0, socket).expect("XSKMAP insert");
    let link = pair
        .run(|| program.attach(&pair.a, index, XdpMode::Native))
        .unwrap()
        .expect("attaching the XDP program");
    (program, link)
}

#[test]
fn transmit_from_anywhere_in_the_region_reaches_the_peer_and_completes_in_order() {
    let mut b = bench(1, 4096, 0, &[0]);
    let (a_mac, b_mac) = (b.a_mac, b.b_mac);
    let (peer, region) = (&b.peer, &b.region);
    let queues = &mut b.queues;
    let q = &mut queues[0];
    // Odd offsets, one frame across a page boundary, one ending at the
    // region's last byte.
    let placed = [
        (0x3u64, 60usize),
        (0xff0, 1514),
        (0x2001, 1000),
        ((REGION - 1514) as u64, 1514),
    ];
    let frames: Vec<Vec<u8>> = placed
        .iter()
        .enumerate()
        .map(|(i, &(_, len))| test_frame(b_mac, a_mac, i as u64, len))
        .collect();
    let descs: Vec<TxDesc> = placed
        .iter()
        .zip(&frames)
        .map(|(&(addr, _), frame)| {
            region.write(addr, frame);
            TxDesc::new(addr, frame.len() as u32)
        })
        .collect();
    assert_eq!(q.transmit(&descs), descs.len());
    let done = completions(q, descs.len());
    // In submission order; an odd address may come back with bit 0 clear
    // (Linux 6.18's copy mode keeps a flag there: 0x3 completes as 0x2):
    // whoever matches completions to buffers goes by order, not address.
    let want: Vec<u64> = placed.iter().map(|&(addr, _)| addr).collect();
    assert_eq!(done.len(), want.len(), "{done:?}");
    for (got, want) in done.iter().zip(&want) {
        assert_eq!(got | 1, want | 1, "completions {done:x?} for {want:x?}");
    }
    let got = packet_frames(peer, frames.len(), Duration::from_secs(2));
    assert_eq!(got, frames, "the peer got other bytes");
    let stats = q.statistics().unwrap();
    assert_eq!(stats.tx_invalid_descs, 0, "{stats:?}");
}

#[test]
fn transmit_descriptors_leaving_the_region_or_longer_than_a_chunk_are_refused() {
    let mut b = bench(1, 2048, 0, &[0]);
    let (a_mac, b_mac) = (b.a_mac, b.b_mac);
    let (peer, region, umem) = (&b.peer, &b.region, &b.umem);
    let queues = &mut b.queues;
    let q = &mut queues[0];
    let frame = test_frame(b_mac, a_mac, 7, 1514);
    region.write(0, &frame);
    let bad = [
        // Ten bytes past the end.
        TxDesc::new((REGION - 50) as u64, 60),
        // Longer than one chunk: unaligned mode caps a descriptor there.
        TxDesc::new(0, 2049),
    ];
    for desc in &bad {
        assert!(!umem.tx_desc_ok(desc), "{desc:?}");
    }
    assert!(umem.tx_desc_ok(&TxDesc::new(0, 1514)));
    // Metadata on a UMEM registered without room for it.
    let with_metadata = TxDesc {
        metadata: true,
        ..TxDesc::new(4096, 1514)
    };
    assert!(!umem.tx_desc_ok(&with_metadata));
    assert_eq!(q.transmit(&bad), 2);
    // A good one after them still goes out.
    assert_eq!(q.transmit(&[TxDesc::new(0, 1514)]), 1);
    let stats = q.statistics().unwrap();
    assert_eq!(stats.tx_invalid_descs, 2, "{stats:?}");
    // Refused descriptors come back on the completion ring in Linux 6.18
    // (not in older kernels), ahead of the good one: a sender must check
    // descriptors itself rather than rely on either.
    let done = completions(q, 3);
    assert!(
        done == [0] || done == [(REGION - 50) as u64, 0, 0],
        "completions {done:?}"
    );
    let got = packet_frames(peer, 1, Duration::from_secs(2));
    assert_eq!(got, vec![frame]);
}

#[test]
fn received_bytes_land_after_fill_address_headroom_and_256_and_nowhere_else() {
    let headroom = 600;
    let mut b = bench(1, 2048, headroom, &[0]);
    let (a_mac, b_mac) = (b.a_mac, b.b_mac);
    let (pair, peer, region, umem) = (&b.pair, &b.peer, &b.region, &b.umem);
    let queues = &mut b.queues;
    let q = &mut queues[0];
    assert_eq!(umem.rx_frame_room(), 2048 - 600 - 256);
    let _program = redirect_to(pair, q);
    // Odd, across a page, plain.
    let fills = [0x101u64, 0x1f00, 0x5000];
    assert_eq!(q.post_fill(&fills), 3);
    // The third frame is longer than a chunk leaves (1192 bytes): dropped,
    // and its fill address stays for the next frame.
    let frames = [
        test_frame(a_mac, b_mac, 1, 60),
        test_frame(a_mac, b_mac, 2, 1000),
        test_frame(a_mac, b_mac, 3, 1514),
        test_frame(a_mac, b_mac, 4, 1192),
    ];
    for frame in &frames {
        peer.send(frame).unwrap();
    }
    let got = received(q, 3, Duration::from_secs(2));
    assert_eq!(got.len(), 3, "{got:?}");
    let mut written = Vec::new();
    for ((desc, fill), frame) in got
        .iter()
        .zip(fills)
        .zip([&frames[0], &frames[1], &frames[3]])
    {
        assert_eq!(
            desc.data(),
            fill + u64::from(headroom + XDP_PACKET_HEADROOM),
            "{desc:?}"
        );
        assert!(!desc.more);
        assert_eq!(desc.len as usize, frame.len());
        assert_eq!(&region.read(desc.data(), frame.len()), frame);
        written.push((desc.data(), frame.len()));
    }
    assert_eq!(
        region.touched_outside(&written),
        Vec::<u64>::new(),
        "the kernel wrote outside the frames (headroom, or past a frame)"
    );
    let stats = q.statistics().unwrap();
    assert_eq!(stats.rx_dropped, 1, "the long frame: {stats:?}");
}

#[test]
fn a_fill_address_whose_chunk_would_leave_the_region_is_never_used() {
    let mut b = bench(1, 2048, 0, &[0]);
    let (a_mac, b_mac) = (b.a_mac, b.b_mac);
    let (pair, peer, region) = (&b.pair, &b.peer, &b.region);
    let queues = &mut b.queues;
    let q = &mut queues[0];
    let _program = redirect_to(pair, q);
    // 2047 bytes before the end: a 2048-byte chunk would pass it.
    assert_eq!(q.post_fill(&[(REGION - 2047) as u64]), 1);
    peer.send(&test_frame(a_mac, b_mac, 1, 60)).unwrap();
    let got = received(q, 1, Duration::from_millis(500));
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(region.touched_outside(&[]), Vec::<u64>::new());
    let stats = q.statistics().unwrap();
    assert_eq!(stats.rx_dropped, 1, "{stats:?}");
    // The socket still works with an address that fits.
    let fill = (REGION - 2048) as u64;
    assert_eq!(q.post_fill(&[fill]), 1);
    let frame = test_frame(a_mac, b_mac, 2, 60);
    peer.send(&frame).unwrap();
    let got = received(q, 1, Duration::from_secs(2));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data(), fill + u64::from(XDP_PACKET_HEADROOM));
    assert_eq!(region.read(got[0].data(), frame.len()), frame);
}

#[test]
fn sockets_of_two_queues_share_the_region_with_their_own_completions() {
    let mut b = bench(2, 4096, 0, &[0, 1]);
    let (a_mac, b_mac) = (b.a_mac, b.b_mac);
    let (peer, region) = (&b.peer, &b.region);
    let queues = &mut b.queues;
    let [q0, q1] = &mut queues[..] else {
        unreachable!()
    };
    assert_ne!(q0.fd(), q1.fd());
    let f0 = test_frame(b_mac, a_mac, 10, 200);
    let f1 = test_frame(b_mac, a_mac, 11, 300);
    region.write(0x1000, &f0);
    region.write(0x9000, &f1);
    assert_eq!(q0.transmit(&[TxDesc::new(0x1000, 200)]), 1);
    assert_eq!(completions(q0, 1), vec![0x1000]);
    assert_eq!(q1.transmit(&[TxDesc::new(0x9000, 300)]), 1);
    assert_eq!(completions(q1, 1), vec![0x9000]);
    assert!(completions(q0, 1).is_empty(), "q1's completion on q0");
    let mut got = packet_frames(peer, 2, Duration::from_secs(2));
    got.sort();
    let mut want = vec![f0, f1];
    want.sort();
    assert_eq!(got, want);
}

/// The transmit layout `umem=guest` needs: a frame's headers in one place
/// (the VMM's, with the checksum request in front) and its payload in
/// another (the guest's buffer, at any offset): sent as one frame of two
/// descriptors, it reaches the peer whole, its checksum computed over both.
/// The sum is made where a NIC without checksum offload would have it made,
/// by the kernel on the way to the driver (transmit checksumming off on
/// the veth; with it on, the peer would get the request itself).
/// `XDP_UMEM_TX_SW_CSUM` is no way to test it: with multi-buffer it sums
/// the first descriptor only (seen on 6.18).
#[test]
fn a_frame_in_two_places_with_a_checksum_request_arrives_whole_and_summed() {
    let mut b = bench_with(1, (4096, 0, TxMetadata::Checksum), &[0], true);
    b.pair.transmit_checksumming_off(&b.pair.a).unwrap();
    let (a_mac, b_mac) = (b.a_mac, b.b_mac);
    let (peer, region, umem) = (&b.peer, &b.region, &b.umem);
    let q = &mut b.queues[0];
    let payload: Vec<u8> = (0..958u32).map(|i| (i * 7 + 3) as u8).collect();
    let header = udp_header(b_mac, a_mac, payload.len());
    assert_eq!(header.len(), 42);
    // Metadata, then the header right after it; the payload at an odd
    // offset across a page boundary.
    let meta_at = 0x10000u64;
    let header_at = meta_at + u64::from(TX_METADATA_LEN);
    let payload_at = 0x30f01u64;
    region.write(meta_at, &tx_checksum_request(34, 6));
    region.write(header_at, &header);
    region.write(payload_at, &payload);
    let descs = [
        TxDesc {
            addr: header_at,
            len: header.len() as u32,
            more: true,
            metadata: true,
        },
        TxDesc::new(payload_at, payload.len() as u32),
    ];
    for desc in &descs {
        assert!(umem.tx_desc_ok(desc), "{desc:?}");
    }
    let early_metadata = TxDesc {
        addr: u64::from(TX_METADATA_LEN) - 1,
        ..descs[0]
    };
    assert!(
        !umem.tx_desc_ok(&early_metadata),
        "metadata before the region"
    );
    assert_eq!(q.transmit(&descs), 2);
    let done = completions(q, 2);
    assert_eq!(done.len(), 2, "one completion per descriptor: {done:x?}");
    assert_eq!(done[0] | 1, header_at | 1);
    assert_eq!(done[1] | 1, payload_at | 1);
    // Not a test frame (packet_frames would skip it): the first IPv4 frame
    // from a_mac.
    let frame = first_ipv4_frame_from(peer, a_mac);
    let frame = &frame;
    assert_eq!(frame.len(), header.len() + payload.len());
    assert_eq!(frame[..40], header[..40], "headers differ");
    assert_eq!(frame[42..], payload[..], "payload differs");
    assert_ne!(frame[40..42], header[40..42], "checksum not filled");
    assert!(udp_checksum_ok(frame), "bad UDP checksum in {frame:02x?}");
    let stats = q.statistics().unwrap();
    assert_eq!(stats.tx_invalid_descs, 0, "{stats:?}");
}

#[test]
fn a_region_that_is_not_whole_pages_is_refused() {
    let region = Region::new();
    for (offset, len, chunk, headroom) in [
        (1usize, 4096usize, 2048u32, 0u32),
        (0, 4095, 2048, 0),
        (0, 4096, 1024, 0),
        (0, 4096, 2048, 1792),
    ] {
        // SAFETY: inside the mapping; refused before the kernel sees it.
        let result = unsafe {
            SharedUmem::register(
                region.ptr.add(offset),
                len,
                chunk,
                headroom,
                TxMetadata::Off,
            )
        };
        assert!(
            result.is_err(),
            "accepted {offset}+{len} chunk {chunk} headroom {headroom}"
        );
    }
}
