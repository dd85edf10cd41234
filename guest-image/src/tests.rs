//! Host-side tests: the embedded image honours the boot contract, and the guest's pure
//! modules (argument parsing, request parsing, page format) behave.

use super::guest_args::{self, ArgError, GuestArgs, Pattern};
use super::guest_pagefmt::{self as pagefmt, PageError, WORDS};
use super::guest_proto::{self as proto, Command};
use super::guest_ram::{self as ram, PlaceError, Span, Spans};
use super::guest_resp as resp;
use super::GUEST_ELF;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// (p_offset, p_paddr, p_filesz, p_memsz) of every PT_LOAD.
fn loads(elf: &[u8]) -> Vec<(usize, u64, usize, u64)> {
    let phoff = u64_at(elf, 32) as usize;
    let phentsize = usize::from(u16_at(elf, 54));
    (0..usize::from(u16_at(elf, 56)))
        .map(|i| phoff + i * phentsize)
        .filter(|&p| u32_at(elf, p) == 1)
        .map(|p| {
            (
                u64_at(elf, p + 8) as usize,
                u64_at(elf, p + 24),
                u64_at(elf, p + 32) as usize,
                u64_at(elf, p + 40),
            )
        })
        .collect()
}

#[test]
fn image_is_a_static_x86_64_executable_with_the_guest_header_first() {
    let elf = GUEST_ELF;
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELF64");
    assert_eq!(u16_at(elf, 16), 2, "ET_EXEC");
    assert_eq!(u16_at(elf, 18), 62, "x86-64");
    let entry = u64_at(elf, 24);
    let loads = loads(elf);
    let (off, paddr, filesz, _) = *loads.iter().min_by_key(|l| l.1).unwrap();
    assert_eq!(paddr, super::LOAD_ADDR);
    let h = &elf[off..off + filesz];
    assert_eq!(&h[..8], b"TWINGST\0");
    assert_eq!(u32_at(h, 8), 1, "header version");
    assert_eq!(u32_at(h, 12), 2080, "header size");
    assert_eq!(u64_at(h, 16), entry, "header entry = e_entry");
    let stack_top = u64_at(h, 24);
    assert_eq!(stack_top % 16, 0);
    let end = loads.iter().map(|l| l.1 + l.3).max().unwrap();
    assert!(
        stack_top > super::LOAD_ADDR && stack_top <= end,
        "stack inside the image"
    );
    let vector = |v: usize| u64_at(h, 32 + 8 * v);
    for v in 0..256 {
        let addr = vector(v);
        let in_text = loads.iter().any(|l| addr >= l.1 && addr < l.1 + l.2 as u64);
        assert!(
            in_text,
            "vector {v:#x} -> {addr:#x} is not in a loaded segment"
        );
    }
    for v in [6, 0x20, 0x21, 0x22, 0x23, 0xFF] {
        assert!(
            vector(v) != vector(0),
            "vector {v:#x} has a handler of its own"
        );
    }
    assert!(loads
        .iter()
        .all(|l| l.1 >= super::LOAD_ADDR && l.1 + l.3 < 0xC000_0000));
}

#[test]
fn args_defaults_and_sizes() {
    assert_eq!(guest_args::parse("").unwrap(), GuestArgs::default());
    let a = guest_args::parse("dirty=64M/s,wss=128M hz=250,pattern=random,console=on").unwrap();
    assert_eq!(a.dirty_bytes_per_sec, 64 << 20);
    assert_eq!(a.wss_bytes, 128 << 20);
    assert_eq!(a.hz, 250);
    assert_eq!(a.pattern, Pattern::Random);
    assert!(a.console);
    assert_eq!(guest_args::parse("dirty=0").unwrap().dirty_bytes_per_sec, 0);
    assert_eq!(
        guest_args::parse("dirty=1G").unwrap().dirty_bytes_per_sec,
        1 << 30
    );
    assert_eq!(
        guest_args::parse("wss=5000").unwrap().wss_bytes,
        8192,
        "rounded up to pages"
    );
    assert_eq!(guest_args::parse_size("2GiB"), Some(2 << 30));
    assert_eq!(guest_args::parse_size("16k"), Some(16 << 10));
    assert_eq!(guest_args::parse_size("12x"), None);
    assert_eq!(guest_args::parse_size("M"), None);
    assert_eq!(guest_args::parse_size("99999999999999999999"), None);
    assert_eq!(guest_args::parse_size("17179869184G"), None, "overflow");
    assert_eq!(GuestArgs::default().wss_base, None);
    assert_eq!(
        guest_args::parse("wssbase=2816M").unwrap().wss_base,
        Some(2816 << 20)
    );
}

#[test]
fn args_errors_are_clear() {
    let e = guest_args::parse("dirty=64M/s,speed=3").unwrap_err();
    assert_eq!(e, ArgError::UnknownKey("speed"));
    assert!(e.to_string().contains("unknown guest argument \"speed\""));
    assert!(matches!(
        guest_args::parse("dirty"),
        Err(ArgError::NotKeyValue("dirty"))
    ));
    assert!(matches!(
        guest_args::parse("hz=0"),
        Err(ArgError::BadValue { key: "hz", .. })
    ));
    assert!(matches!(
        guest_args::parse("wss=lots"),
        Err(ArgError::BadValue { key: "wss", .. })
    ));
    assert!(matches!(
        guest_args::parse("dirty=1M,wss=0"),
        Err(ArgError::BadValue { key: "wss", .. })
    ));
    assert!(matches!(
        guest_args::parse("wssbase=4097"),
        Err(ArgError::BadValue {
            key: "wssbase",
            why: "must be a multiple of 4K",
            ..
        })
    ));
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// RAM as the VMM lays out `mem` bytes: up to 3 GiB at 0, the rest from 4 GiB.
fn ram_of(mem: u64) -> Spans {
    if mem <= 3 * GIB {
        Spans::new(&[(0, mem)]).unwrap()
    } else {
        Spans::new(&[(0, 3 * GIB), (4 * GIB, mem - 3 * GIB)]).unwrap()
    }
}

fn spans(s: &Spans) -> Vec<(u64, u64)> {
    s.as_slice().iter().map(|s| (s.base, s.end())).collect()
}

#[test]
fn ram_ranges_from_boot_info_are_checked() {
    assert!(Spans::new(&[]).is_err());
    assert!(Spans::new(&[(0, 0)]).is_err(), "empty");
    assert!(Spans::new(&[(0, 4097)]).is_err(), "not whole pages");
    assert!(Spans::new(&[(4 * GIB, GIB), (0, GIB)]).is_err(), "order");
    assert!(Spans::new(&[(0, 2 * GIB), (GIB, GIB)]).is_err(), "overlap");
    assert!(Spans::new(&[(u64::MAX - 4095, 4096)]).is_err(), "wraps");
    assert!(Spans::new(&[(0, 4096); 5]).is_err(), "too many");
    let r = ram_of(16 * GIB);
    assert_eq!(r.total(), 16 * GIB);
    assert_eq!(r.addr(0), Some(0));
    assert_eq!(r.addr(3 * GIB - 1), Some(3 * GIB - 1));
    assert_eq!(r.addr(3 * GIB), Some(4 * GIB), "past the hole");
    assert_eq!(r.addr(16 * GIB - 1), Some(17 * GIB - 1));
    assert_eq!(r.addr(16 * GIB), None);
}

#[test]
fn a_small_guest_places_as_before() {
    // 256 MiB: the working set is the top of RAM, the heap everything below it.
    let image_end = 0x20_0000;
    let l = ram::place(&ram_of(256 * MIB), image_end, 8 * MIB, 64 * MIB, None).unwrap();
    assert_eq!(spans(&l.wss), vec![(192 * MIB, 256 * MIB)]);
    assert_eq!(
        l.heap,
        Span {
            base: image_end,
            len: 192 * MIB - image_end
        }
    );
    assert_eq!(
        ram::place(&ram_of(256 * MIB), image_end, 8 * MIB, 250 * MIB, None),
        Err(PlaceError::HeapTooSmall {
            heap: 6 * MIB - image_end
        })
    );
    assert_eq!(
        ram::place(&ram_of(256 * MIB), image_end, 8 * MIB, 300 * MIB, None),
        Err(PlaceError::TooLarge)
    );
    // The suggestion fits, one more page does not.
    let max = ram::max_wss(&ram_of(256 * MIB), image_end, 8 * MIB, 8);
    let heap_for = |w: u64| 8 * MIB + w / 4096 * 8;
    assert!(ram::place(&ram_of(256 * MIB), image_end, heap_for(max), max, None).is_ok());
    let over = max + 4096;
    assert!(ram::place(&ram_of(256 * MIB), image_end, heap_for(over), over, None).is_err());
}

#[test]
fn a_big_guest_places_its_working_set_above_4_gib_or_across_the_hole() {
    let image_end = 0x20_0000;
    let ram16 = ram_of(16 * GIB);
    // From the top: all above 4 GiB, the heap keeps the whole range below the hole.
    let l = ram::place(&ram16, image_end, 8 * MIB, 512 * MIB, None).unwrap();
    assert_eq!(spans(&l.wss), vec![(17 * GIB - 512 * MIB, 17 * GIB)]);
    assert_eq!(l.heap.end(), 3 * GIB);
    // Larger than what is above 4 GiB (13 GiB): it continues below the hole.
    let l = ram::place(&ram16, image_end, 40 * MIB, 14 * GIB, None).unwrap();
    assert_eq!(spans(&l.wss), vec![(2 * GIB, 3 * GIB), (4 * GIB, 17 * GIB)]);
    assert_eq!(l.wss.total(), 14 * GIB);
    assert_eq!(l.heap.end(), 2 * GIB);
    // From `wssbase`, across the hole.
    let l = ram::place(&ram16, image_end, 8 * MIB, 512 * MIB, Some(2816 * MIB)).unwrap();
    assert_eq!(
        spans(&l.wss),
        vec![(2816 * MIB, 3 * GIB), (4 * GIB, 4 * GIB + 256 * MIB)]
    );
    assert_eq!(l.heap.end(), 2816 * MIB);
    assert_eq!(
        l.wss.addr(256 * MIB),
        Some(4 * GIB),
        "page 65536 is the first above"
    );
    // Entirely above, from `wssbase`: the heap is the whole low range.
    let l = ram::place(&ram16, image_end, 8 * MIB, 4 * GIB, Some(5 * GIB)).unwrap();
    assert_eq!(spans(&l.wss), vec![(5 * GIB, 9 * GIB)]);
    assert_eq!(l.heap.end(), 3 * GIB);
    // Refusals: in the hole, below the image, unaligned, past the end of RAM.
    for base in [3 * GIB, 0x1000, 2 * GIB + 1, 17 * GIB] {
        assert_eq!(
            ram::place(&ram16, image_end, 8 * MIB, 4096, Some(base)),
            Err(PlaceError::BaseNotRam),
            "{base:#x}"
        );
    }
    assert_eq!(
        ram::place(&ram16, image_end, 8 * MIB, 2 * GIB, Some(16 * GIB)),
        Err(PlaceError::TooLarge)
    );
    // The most that fits: a little under 16 GiB (heap and the 8-byte-per-page table).
    let max = ram::max_wss(&ram16, image_end, 8 * MIB, 8);
    assert!(max > 15 * GIB && max < 16 * GIB, "{max}");
    let heap_for = |w: u64| 8 * MIB + w / 4096 * 8;
    assert!(ram::place(&ram16, image_end, heap_for(max), max, None).is_ok());
    let over = max + 4096;
    assert!(ram::place(&ram16, image_end, heap_for(over), over, None).is_err());
}

#[test]
fn requests_parse() {
    assert_eq!(proto::parse(b"INCR k"), Ok(Command::Incr(b"k")));
    assert_eq!(proto::parse(b"incr  k\r"), Ok(Command::Incr(b"k")));
    assert_eq!(proto::parse(b"GET a:b"), Ok(Command::Get(b"a:b")));
    assert_eq!(proto::parse(b"SET k 42"), Ok(Command::Set(b"k", 42)));
    assert_eq!(proto::parse(b"PING"), Ok(Command::Ping));
    assert_eq!(proto::parse(b"TIME"), Ok(Command::Time));
    assert_eq!(proto::parse(b"STATS"), Ok(Command::Stats));
    assert_eq!(proto::parse(b"VERIFY"), Ok(Command::Verify));
    assert!(proto::parse(b"").is_err());
    assert!(proto::parse(b"INCR").is_err());
    assert!(proto::parse(b"INCR a b").is_err());
    assert!(proto::parse(b"SET k").is_err());
    assert!(proto::parse(b"SET k -1").is_err());
    assert!(proto::parse(b"SET k 18446744073709551616").is_err());
    assert_eq!(
        proto::parse(b"SET k 18446744073709551615"),
        Ok(Command::Set(b"k", u64::MAX))
    );
    assert!(proto::parse(b"PING x").is_err());
    assert!(proto::parse(b"FLY")
        .unwrap_err()
        .starts_with("unknown command"));
    assert!(proto::parse(&[b'x'; 200].map(|b| b)[..]).is_err());
    let long_key = [b"GET ".as_slice(), &[b'k'; proto::MAX_KEY + 1]].concat();
    assert!(proto::parse(&long_key).is_err());
}

#[test]
fn page_format_detects_stale_and_torn_pages() {
    let mut page = [0u64; WORDS];
    pagefmt::fill(&mut page, 7, 3);
    assert_eq!(pagefmt::check(&page, 7, 3), Ok(()));
    assert_eq!(
        pagefmt::check(&page, 8, 3),
        Err(PageError::Index { found: 7 })
    );
    assert_eq!(
        pagefmt::check(&page, 7, 4),
        Err(PageError::Seq { found: 3 })
    );
    let mut torn = page;
    torn[100] ^= 1;
    assert!(matches!(
        pagefmt::check(&torn, 7, 3),
        Err(PageError::Checksum { .. })
    ));
    // A stale body under a new header (a lost write of the body) is caught too.
    let mut newer = [0u64; WORDS];
    pagefmt::fill(&mut newer, 7, 4);
    let mut mixed = page;
    mixed[..3].copy_from_slice(&newer[..3]);
    assert!(matches!(
        pagefmt::check(&mixed, 7, 4),
        Err(PageError::Checksum { .. })
    ));
    // A never-written page must still be zero.
    let zero = [0u64; WORDS];
    assert_eq!(pagefmt::check(&zero, 9, 0), Ok(()));
    assert_eq!(pagefmt::check(&page, 7, 0), Err(PageError::NotZero));
    // Bodies differ between versions and between pages.
    let mut other = [0u64; WORDS];
    pagefmt::fill(&mut other, 8, 3);
    assert_ne!(page[3..], newer[3..]);
    assert_ne!(page[3..], other[3..]);
}

#[test]
fn partial_writes_change_a_run_of_the_body_and_still_verify() {
    for data in [pagefmt::Data::Random, pagefmt::Data::Text] {
        let mut page = [0u64; WORDS];
        pagefmt::rewrite(&mut page, 5, 1, 0, pagefmt::BODY_WORDS, data);
        assert_eq!(pagefmt::check(&page, 5, 1), Ok(()));
        let before = page;
        let count = pagefmt::BODY_WORDS / 4;
        let from = pagefmt::rewrite_at(5, 2, count);
        assert!(from + count <= pagefmt::BODY_WORDS);
        pagefmt::rewrite(&mut page, 5, 2, from, count, data);
        assert_eq!(pagefmt::check(&page, 5, 2), Ok(()));
        let changed: Vec<usize> = (3..WORDS).filter(|&w| page[w] != before[w]).collect();
        assert!(
            changed
                .iter()
                .all(|&w| (3 + from..3 + from + count).contains(&w)),
            "only the run changed"
        );
        assert!(
            changed.len() > count / 2,
            "{data:?}: {} of {count} words",
            changed.len()
        );
        // A lost partial write under the new header is caught by the checksum.
        let mut mixed = before;
        mixed[..3].copy_from_slice(&page[..3]);
        assert!(matches!(
            pagefmt::check(&mixed, 5, 2),
            Err(PageError::Checksum { .. })
        ));
        // Runs move between writes.
        assert_ne!(
            pagefmt::rewrite_at(5, 2, count),
            pagefmt::rewrite_at(5, 3, count)
        );
    }
    // Text is text: printable bytes and spaces.
    let mut page = [0u64; WORDS];
    pagefmt::rewrite(&mut page, 1, 1, 0, pagefmt::BODY_WORDS, pagefmt::Data::Text);
    let bytes: Vec<u8> = page[3..].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert!(bytes.iter().all(|b| b.is_ascii_lowercase() || *b == b' '));
}

#[test]
fn write_fraction_and_data_arguments() {
    let a = guest_args::parse("wfrac=25,wdata=text").unwrap();
    assert_eq!((a.wfrac, a.wdata), (25, guest_args::WriteData::Text));
    assert_eq!(guest_args::parse("wfrac=5%").unwrap().wfrac, 5);
    let d = GuestArgs::default();
    assert_eq!((d.wfrac, d.wdata), (100, guest_args::WriteData::Random));
    for bad in ["wfrac=0", "wfrac=101", "wfrac=x", "wdata=zip"] {
        assert!(guest_args::parse(bad).is_err(), "{bad}");
    }
}

/// A parsed request's arguments, owned, and the bytes it used.
type Request = (Vec<Vec<u8>>, usize);

/// The arguments of the request at the front of `buf`, and the bytes it used.
fn resp_args(buf: &[u8]) -> Result<Option<Request>, resp::Error> {
    Ok(resp::parse(buf)?.map(|(a, n)| {
        let mut v = Vec::new();
        let mut i = 0;
        while let Some(x) = a.get(i) {
            v.push(x.to_vec());
            i += 1;
        }
        (v, n)
    }))
}

#[test]
fn resp_requests_frame_as_clients_send_them() {
    let req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
    let (args, n) = resp_args(req).unwrap().unwrap();
    assert_eq!(n, req.len());
    assert_eq!(args, [b"SET".to_vec(), b"k".to_vec(), b"hello".to_vec()]);
    // Every prefix is incomplete, never an error.
    for cut in 0..req.len() {
        assert_eq!(
            resp_args(&req[..cut]).unwrap(),
            None,
            "prefix of {cut} bytes"
        );
    }
    // Pipelined: one at a time from the front.
    let two = [&req[..], b"*1\r\n$4\r\nPING\r\n"].concat();
    let (_, n) = resp_args(&two).unwrap().unwrap();
    let (args, m) = resp_args(&two[n..]).unwrap().unwrap();
    assert_eq!((args, n + m), (vec![b"PING".to_vec()], two.len()));
    // Binary-safe values, empty values.
    let (args, _) = resp_args(b"*2\r\n$0\r\n\r\n$3\r\na\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(args, [b"".to_vec(), b"a\r\n".to_vec()]);
    // Inline commands, as typed into a raw connection.
    let (args, n) = resp_args(b"GET  key\r\nrest").unwrap().unwrap();
    assert_eq!((args, n), (vec![b"GET".to_vec(), b"key".to_vec()], 10));
}

#[test]
fn resp_rejects_what_cannot_be_framed() {
    for (bad, want) in [
        (&b"*x\r\n"[..], resp::Error::Header),
        (b"*1\r\n+OK\r\n", resp::Error::Header),
        (b"*1\r\n$-1\r\n", resp::Error::Header),
        (b"*1\r\n$3\r\nGETXX", resp::Error::Framing),
        (b"*65\r\n", resp::Error::TooManyArgs),
        (b"*1\r\n$99999999\r\n", resp::Error::TooLong),
        (b"*1\r\n$1000000000000\r\n", resp::Error::Header),
    ] {
        assert_eq!(
            resp_args(bad).err(),
            Some(want),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // A header that never ends is not waited for forever.
    assert_eq!(resp_args(&[b'*'; 64]).err(), Some(resp::Error::Header));
    assert_eq!(
        resp_args(&vec![b'a'; resp::MAX_REQUEST + 1]).err(),
        Some(resp::Error::TooLong)
    );
}

#[test]
fn resp_replies_encode() {
    let mut buf = [0u8; 128];
    let mut w = resp::Writer::new(&mut buf);
    w.simple(b"OK");
    w.error(b"ERR x");
    w.integer(-42);
    w.integer(0);
    w.bulk(b"hi");
    w.null();
    w.array(2);
    assert!(!w.overflowed());
    assert_eq!(
        w.bytes(),
        b"+OK\r\n-ERR x\r\n:-42\r\n:0\r\n$2\r\nhi\r\n$-1\r\n*2\r\n"
    );
    let mut small = [0u8; 4];
    let mut w = resp::Writer::new(&mut small);
    w.bulk(b"too long for it");
    assert!(w.overflowed());
}

#[test]
fn rx_kick_when_the_device_used_our_new_buffers_too() {
    use crate::guest_ring::rx_needs_kick;
    // 256 buffers; we reposted 10 (avail 1000 → 1010) and the device has already used up
    // to 1005: every older buffer is gone, so it may be about to wait for us.
    assert!(rx_needs_kick(1010, 1005, 10, 256));
    // It used all of them: nothing held at all.
    assert!(rx_needs_kick(1010, 1010, 10, 256));
    // Across the u16 wrap, the same.
    assert!(rx_needs_kick(3, 65533, 10, 256));
    // It still holds 200 older buffers: busy, no exit needed.
    assert!(!rx_needs_kick(1210, 1000, 10, 256));
    // Fewer than a quarter of the ring left: kick.
    assert!(rx_needs_kick(1060, 1000, 10, 256));
}

mod kvlog_format {
    use crate::kvlog::{self, Head, Label, Op, Torn, SECTOR};

    fn rec(seq: u64, op: &Op<'_>) -> Vec<u8> {
        let mut b = vec![0xAA; 64 << 10];
        let n = kvlog::encode(seq, op, &mut b).unwrap();
        b.truncate(n);
        b
    }

    #[test]
    fn records_round_trip_in_whole_sectors() {
        let big = vec![7u8; 16 << 10];
        for op in [
            Op::Set(b"k", b"42"),
            Op::Set(b"", b""),
            Op::Set(&[b'x'; 128], &big),
            Op::Del(b"gone"),
            Op::Clear,
        ] {
            let r = rec(9, &op);
            assert_eq!(r.len() % SECTOR, 0);
            let Head::Record { sectors } = kvlog::head(&r[..SECTOR], 100) else {
                panic!("no record head for {op:?}");
            };
            assert_eq!(sectors * SECTOR, r.len());
            assert_eq!(kvlog::decode(&r, 9), Ok(op));
        }
        // A 16 KiB value takes 33 sectors; padding is zero, not what the buffer held.
        let r = rec(1, &Op::Set(b"k", b"1"));
        assert_eq!(r.len(), SECTOR);
        assert!(r[24 + 1 + 2 + 1 + 4 + 1..].iter().all(|&b| b == 0));
    }

    #[test]
    fn every_tear_is_detected() {
        let r = rec(5, &Op::Set(b"key", b"123456"));
        assert_eq!(kvlog::head(&[0u8; SECTOR], 10), Head::End);
        assert_eq!(
            kvlog::decode(&r, 6),
            Err(Torn::Sequence {
                expected: 6,
                found: 5
            })
        );
        // Any single flipped bit of the record's used bytes fails it.
        for byte in 0..24 + 1 + 2 + 3 + 4 + 6 {
            let mut t = r.clone();
            t[byte] ^= 0x10;
            let head = kvlog::head(&t[..SECTOR], 10);
            let bad = match head {
                Head::Record { .. } => kvlog::decode(&t, 5).is_err(),
                Head::Torn(_) => true,
                Head::End => false,
            };
            assert!(bad, "flipping byte {byte} went unnoticed");
        }
        let mut t = r.clone();
        t[SECTOR / 2..].fill(0);
        t[30] = b'9';
        assert_eq!(kvlog::decode(&t, 5), Err(Torn::Checksum));
        let mut t = r.clone();
        t[4..8].copy_from_slice(&(1u32 << 20).to_le_bytes());
        assert_eq!(kvlog::head(&t, 10), Head::Torn(Torn::Length));
        let big = rec(1, &Op::Set(b"k", &[1u8; 4000]));
        assert_eq!(kvlog::head(&big, 3), Head::Torn(Torn::PastEnd));
        assert_eq!(kvlog::head(&[1u8; SECTOR], 3), Head::Torn(Torn::Magic));
        assert!(kvlog::record_len(&Op::Set(b"k", &[0u8; 40 << 10])).is_none());
    }

    #[test]
    fn labels() {
        let mut s = [0u8; SECTOR];
        assert_eq!(kvlog::label(&s), Label::Blank);
        kvlog::write_label(&mut s);
        assert_eq!(kvlog::label(&s), Label::Log);
        s[300] = 1;
        assert_eq!(kvlog::label(&s), Label::Foreign);
    }

    #[test]
    fn crc32_is_ieee() {
        assert_eq!(kvlog::crc32(0, b"123456789"), 0xCBF4_3926);
        assert_eq!(
            kvlog::crc32(kvlog::crc32(0, b"1234"), b"56789"),
            0xCBF4_3926
        );
    }
}

#[test]
fn disk_workload_arguments() {
    let a = guest_args::parse("disk=8M/s,dwss=256M,dblock=64K,dflush=16").unwrap();
    assert_eq!(
        (a.disk_bytes_per_sec, a.dwss_bytes, a.dblock_bytes, a.dflush),
        (8 << 20, 256 << 20, 64 << 10, 16)
    );
    let d = guest_args::parse("").unwrap();
    assert_eq!(
        (d.disk_bytes_per_sec, d.dblock_bytes, d.dflush),
        (0, 4096, 1)
    );
    // The working set is whole blocks.
    assert_eq!(
        guest_args::parse("dblock=8K,dwss=20K").unwrap().dwss_bytes,
        16 << 10
    );
    for bad in [
        "dblock=1000",
        "dblock=128K",
        "dblock=0",
        "dflush=0",
        "disk=1M/s,dwss=1K",
    ] {
        assert!(guest_args::parse(bad).is_err(), "{bad} accepted");
    }
}
