//! The built-in Twin guest.
//!
//! A freestanding program that runs at CPL 3 with a few dozen instructions of CPL-0
//! assembly (see `arch.rs` and ARCHITECTURE.md, "The built-in guest and its boot
//! contract"). It drives a virtio-net device, runs smoltcp with a TCP line service on port
//! 7000, and a memory workload that dirties pages at a configured rate.

#![no_std]
#![no_main]

extern crate alloc;

mod apic;
mod arch;
mod args;
mod blk;
mod boot;
mod diskload;
mod identity;
mod kvlog;
mod mem;
mod net;
mod pagefmt;
mod pci;
mod proto;
mod ram;
mod resp;
mod ring;
mod serial;
mod service;
mod store;
mod time;
mod virtio;
mod workload;

use crate::arch::{irq_count, power_off, rdtsc, EXIT_CONFIG, EXIT_DEVICE, EXIT_PANIC, IRQ_TOTAL};
use crate::boot::BootInfo;
use crate::service::Guest;
use alloc::collections::BTreeMap;
use core::panic::PanicInfo;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Lowest guest-physical address that is not RAM (PCI MMIO window); RAM resumes at 4 GiB.
const MMIO_START: u64 = 0xC000_0000;
/// Heap the guest needs besides the workload's sequence table.
const MIN_HEAP: u64 = 8 << 20;

extern "C" {
    static __image_end: u8;
}

fn fail(status: u8, msg: core::fmt::Arguments<'_>) -> ! {
    println!("twin-guest: error: {}", msg);
    power_off(status)
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// CPL-3 entry (called by `_start` in `arch.rs` with RDI = &BootInfo).
#[no_mangle]
extern "C" fn twin_main(boot: *const BootInfo) -> ! {
    let tsc0 = rdtsc();
    apic::quiet_legacy_interrupts();

    // SAFETY: the boot contract: the VMM writes BootInfo at 0x6000 before entry and never
    // again, and the page tables map it readable at CPL 3 (`from_ptr` refuses any other
    // address).
    let boot = match unsafe { BootInfo::from_ptr(boot) } {
        Ok(b) => b,
        Err(why) => fail(EXIT_CONFIG, format_args!("{why}")),
    };
    let ip = boot.ipv4_addr;
    let gw = boot.ipv4_gateway;
    println!(
        "twin-guest {VERSION}: boot mem={}M tsc_khz={} ip={}.{}.{}.{}/{} gw={}.{}.{}.{} args={:?}",
        mib(boot.mem_size),
        boot.tsc_khz,
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        boot.ipv4_prefix_len,
        gw[0],
        gw[1],
        gw[2],
        gw[3],
        boot.args()
    );
    let args = match args::parse(boot.args()) {
        Ok(a) => a,
        Err(e) => fail(EXIT_CONFIG, format_args!("{e}")),
    };

    // Memory: the heap runs from the image's end in the RAM range below the MMIO hole; the
    // working set is the top of RAM (above 4 GiB first on a big guest) or starts at
    // `wssbase`, and may span the hole.
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let Ok(ram) = boot.ram_spans() else {
        fail(
            EXIT_CONFIG,
            format_args!("BootInfo.ram changed after validation"),
        )
    };
    for r in ram.as_slice() {
        println!(
            "twin-guest: RAM [{:#x}, {:#x}) {}M",
            r.base,
            r.end(),
            mib(r.len)
        );
    }
    let seq_table = args.wss_bytes / args::PAGE * 8;
    let layout = match ram::place(
        &ram,
        image_end,
        MIN_HEAP.saturating_add(seq_table),
        args.wss_bytes,
        args.wss_base,
    ) {
        Ok(l) => l,
        Err(e) => {
            let max = ram::max_wss(&ram, image_end, MIN_HEAP, 8);
            let why = match e {
                ram::PlaceError::ImageNotInRam => "the image does not end in RAM",
                ram::PlaceError::BaseNotRam => {
                    "wssbase is not a RAM address above the image (RAM is [0, 3G) and from 4G)"
                }
                ram::PlaceError::TooLarge => "RAM ends before the working set does",
                ram::PlaceError::HeapTooSmall { .. } => {
                    "it leaves too little heap below the MMIO hole"
                }
            };
            fail(
                EXIT_CONFIG,
                format_args!(
                    "wss={}M does not fit in RAM: {why}; {}M of RAM, the image ends at {:#x} and \
                     the guest needs {}M of heap besides; use wss <= {}M (at the top of RAM) or \
                     more memory",
                    mib(args.wss_bytes),
                    mib(boot.mem_size),
                    image_end,
                    mib(MIN_HEAP + seq_table),
                    mib(max),
                ),
            )
        }
    };
    // SAFETY: `place` keeps the heap inside the RAM range holding the image's end, from
    // there, and disjoint from the working set. Nothing else uses it: the image (the CPL-3
    // stack is in its bss) ends at image_end, the VMM's structures and the CPL-0 stack are
    // below 0x100000. This is the only call (twin_main runs once), and nothing has been
    // allocated yet.
    unsafe { mem::init_heap(layout.heap.base as usize, layout.heap.len as usize) };

    if args.cold_bytes > 0 {
        write_cold(args.cold_bytes);
    }

    let mut clock = time::Clock::new(tsc0, boot.tsc_khz);
    let timer_count = apic::start_timer(args.hz);
    println!(
        "twin-guest: timer {} Hz (LAPIC initial count {timer_count}), heap {}M at {image_end:#x}",
        args.hz,
        mib(layout.heap.len)
    );

    // SAFETY: `place` builds the working set from page-aligned pieces of the RAM ranges
    // BootInfo names (validated), disjoint from the heap and above the image; nothing but
    // the workload refers to them.
    let workload = unsafe {
        workload::Workload::new(
            layout.wss,
            args.dirty_bytes_per_sec,
            args.pattern,
            args.wfrac,
            args.wdata,
        )
    };
    for s in layout.wss.as_slice() {
        println!(
            "twin-guest: workload range [{:#x}, {:#x}) {}M",
            s.base,
            s.end(),
            mib(s.len)
        );
    }
    println!(
        "twin-guest: workload wss={}M ({} pages at {:#x}); dirty={} B/s ({} pages/s, {:?}); a write changes {}% of a page ({:?})",
        mib(args.wss_bytes),
        workload.pages(),
        layout.wss.as_slice().first().map_or(0, |s| s.base),
        args.dirty_bytes_per_sec,
        args.dirty_bytes_per_sec / args::PAGE,
        args.pattern,
        workload.write_shape().0,
        workload.write_shape().1,
    );

    let mut net = match pci::find(virtio::VENDOR, virtio::DEVICE_NET) {
        None => {
            println!("twin-guest: warning: no virtio-net device (1af4:1041) on PCI bus 0; running without network");
            None
        }
        Some(f) => match virtio::VirtioNet::init(f, apic::id()) {
            Ok(dev) => {
                let i = dev.info;
                let m = i.mac;
                println!(
                    "twin-guest: virtio-net at 00:{:02x}.{} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}{} features={:#x} queues rx={} tx={} link={}",
                    i.pci.device,
                    i.pci.function,
                    m[0], m[1], m[2], m[3], m[4], m[5],
                    if i.mac_from_device { "" } else { " (generated)" },
                    i.features,
                    i.rx_size,
                    i.tx_size,
                    if i.link_up { "up" } else { "down" },
                );
                Some(net::Net::new(
                    dev,
                    boot.ipv4_addr,
                    boot.ipv4_prefix_len,
                    boot.ipv4_gateway,
                    clock.now_ns(),
                    rdtsc(),
                ))
            }
            Err(why) => fail(EXIT_DEVICE, format_args!("virtio-net: {why}")),
        },
    };

    let mut g = Guest {
        clock,
        workload,
        kv: BTreeMap::new(),
        requests: 0,
        halts: 0,
        halted_tsc: 0,
        loops: 0,
        disk: None,
        diskload: None,
    };
    // Disk 0 (the first virtio-blk function on the bus) holds the store's log.
    if let Some(f) = pci::find(virtio::VENDOR, blk::DEVICE_BLK) {
        let dev = match blk::VirtioBlk::init(f, apic::id()) {
            Ok(d) => d,
            Err(why) => fail(EXIT_DEVICE, format_args!("virtio-blk: {why}")),
        };
        let i = dev.info;
        println!(
            "twin-guest: virtio-blk at 00:{:02x}.{} sectors={} ({}M){} features={:#x} queue={} max_io={}",
            i.pci.device,
            i.pci.function,
            i.sectors,
            i.sectors >> 11,
            if i.read_only { " read-only" } else { "" },
            i.features,
            i.queue_size,
            i.max_io,
        );
        let t0 = g.clock.now_ns();
        let log = match store::DiskLog::open(dev, |op| g.replay(op)) {
            Ok(l) => l,
            Err((what, e)) => fail(EXIT_DEVICE, format_args!("disk 0: {what}: {}", e.message())),
        };
        let r = log.replay;
        println!(
            "twin-guest: disk 0 ({}): log of {} records replayed ({} refused), {} sectors used, in {} ms{}",
            log.mode.name(),
            r.records,
            r.refused,
            log.used_sectors(),
            (g.clock.now_ns() - t0) / 1_000_000,
            if log.mode == store::Mode::Foreign {
                "; sector 0 is not a twin-kv-log label: the disk is left untouched and the store kept in memory only"
            } else {
                ""
            },
        );
        if let Some((at, why)) = r.torn {
            println!(
                "twin-guest: disk 0: torn tail dropped at sector {at} ({}): never acknowledged, zeroed",
                why.name()
            );
        }
        let mut log = log;
        if args.disk_bytes_per_sec > 0 {
            let base = match log.reserve_tail(args.dwss_bytes / blk::SECTOR as u64) {
                Ok(b) => b,
                Err(why) => fail(EXIT_CONFIG, format_args!("disk workload: {why}")),
            };
            println!(
                "twin-guest: disk workload dwss={}M at sector {base} ({} blocks of {}K), disk={} B/s, flush every {}",
                mib(args.dwss_bytes),
                args.dwss_bytes / args.dblock_bytes,
                args.dblock_bytes >> 10,
                args.disk_bytes_per_sec,
                args.dflush,
            );
            g.diskload = Some(diskload::DiskLoad::new(
                base,
                args.dwss_bytes,
                args.dblock_bytes,
                args.disk_bytes_per_sec,
                args.dflush,
            ));
        }
        g.disk = Some(log);
    }
    if args.disk_bytes_per_sec > 0 && g.diskload.is_none() {
        fail(
            EXIT_CONFIG,
            format_args!("disk workload (disk=): no virtio-blk disk 0 to write"),
        );
    }
    println!(
        "twin-guest: ready: tcp {}.{}.{}.{}:{} ({} ms after entry)",
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        net::PORT,
        g.clock.now_ns() / 1_000_000
    );

    g.workload.start(g.clock.now_ns());
    let now = g.clock.now_ns();
    if let Some(l) = g.diskload.as_mut() {
        l.start(now);
    }
    let mut console = args.console.then(serial::Console::new);
    main_loop(&mut g, net.as_mut(), console.as_mut())
}

fn main_loop(
    g: &mut Guest,
    mut net: Option<&mut net::Net>,
    mut console: Option<&mut serial::Console>,
) -> ! {
    loop {
        g.loops += 1;
        let seen = irq_count(IRQ_TOTAL);
        let now = g.clock.now_ns();
        let mut busy = false;
        if let Some(n) = net.as_deref_mut() {
            busy |= n.poll(g, now);
        }
        if let Some(c) = console.as_deref_mut() {
            let stats = net.as_deref().map(net::Net::stats).unwrap_or_default();
            busy |= c.poll(g, &stats);
        }
        busy |= g.workload.step(now);
        busy |= g.disk_step(now);
        if busy {
            if let Some(n) = net.as_deref_mut() {
                n.dev.busy();
            }
            continue;
        }
        if let Some(n) = net.as_deref_mut() {
            if n.dev.prepare_idle() || n.wants_poll(now) {
                continue;
            }
        }
        g.halts += 1;
        let t = rdtsc();
        arch::halt(seen);
        g.halted_tsc += rdtsc().wrapping_sub(t);
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("\ntwin-guest: panic: {info}");
    power_off(EXIT_PANIC)
}

/// Referenced by the prebuilt `liballoc`; never called with `panic = "abort"`.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// `cold=`: writes `bytes` of heap once (every page distinct and non-zero) and never
/// touches them again.
fn write_cold(bytes: u64) {
    let Ok(len) = usize::try_from(bytes) else {
        fail(
            EXIT_CONFIG,
            format_args!("cold={}M is too large", mib(bytes)),
        );
    };
    let mut cold: alloc::vec::Vec<u64> = alloc::vec::Vec::new();
    if cold.try_reserve_exact(len / 8).is_err() {
        fail(
            EXIT_CONFIG,
            format_args!("cold={}M does not fit in the heap", mib(bytes)),
        );
    }
    cold.extend((0..len as u64 / 8).map(|i| 0xc01d_0000_0000_0000 | i));
    println!("twin-guest: {}M written once (cold)", mib(bytes));
    core::mem::forget(cold);
}
