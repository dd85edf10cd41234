//! virtio-blk as a Linux driver drives it: a real image file, the worker thread, the
//! completions in guest memory.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk as vb;
use vm_memory::{Bytes, GuestAddress};

use super::disk::{DiskImage, DiskWrite, WriteLog};
use super::request::{S_IOERR, S_OK, S_UNSUPP};
use super::*;
use crate::pci::msix::RecordingMsi;
use crate::persist::Persist;
use crate::virtio::net::test_util::{dirty, GuestQueue};
use crate::virtio::pci::tests::{enable_msix, mem, negotiate, r, w, BAR};
use crate::GuestMem;
use crate::Pausable;

pub(crate) struct Image(pub PathBuf);
impl Image {
    pub fn new(name: &str, size: u64) -> Self {
        let p = std::env::temp_dir().join(format!("twin-blk-{}-{name}.img", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        Image(p)
    }
}
impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Setup {
    dev: Arc<Mutex<VirtioBlk>>,
    worker: Option<BlkWorker>,
    msi: Arc<RecordingMsi>,
    mem: GuestMem,
    q: GuestQueue,
    log: Arc<WriteLog>,
    _img: Image,
}

fn host(img: &Image, ro: bool) -> BlkHost {
    let disk = Arc::new(DiskImage::open(&img.0, ro).unwrap());
    BlkHost {
        log: Arc::new(WriteLog::new(disk.capacity())),
        disk,
    }
}

/// A live device as Linux leaves it: features acked, MSI-X on (config 0, queue 1),
/// queue 0 at 0x10000, DRIVER_OK; the worker running.
fn setup_with(name: &str, ro: bool, start: bool) -> Setup {
    let img = Image::new(name, 1 << 20);
    let mem = mem();
    let msi = Arc::new(RecordingMsi::default());
    let h = host(&img, ro);
    let log = h.log.clone();
    let mut dev = VirtioBlk::new_blk(
        BAR,
        "disk0",
        BlkResources {
            mem: mem.clone(),
            msi: msi.clone(),
            model: h,
        },
    )
    .unwrap();
    negotiate(
        &mut dev,
        (VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES) as u32,
    );
    enable_msix(&mut dev, 2);
    w(&mut dev, 0x10, 2, 0);
    let q = GuestQueue::new(&mem, 0x10000, 256);
    q.program(&mut dev, 0, 1);
    w(&mut dev, 0x14, 1, 0xf);
    assert_eq!(r(&mut dev, 0x14, 1), 0xf);
    let dev = Arc::new(Mutex::new(dev));
    let worker = start.then(|| BlkWorker::start(dev.clone(), mem.clone()).unwrap());
    Setup {
        dev,
        worker,
        msi,
        mem,
        q,
        log,
        _img: img,
    }
}

fn setup(name: &str) -> Setup {
    setup_with(name, false, true)
}

fn header(m: &GuestMem, at: u64, kind: u32, sector: u64) {
    m.write_obj(kind, GuestAddress(at)).unwrap();
    m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    m.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

impl Setup {
    fn notify(&self) {
        w(&mut *self.dev.lock().unwrap(), 0x3000, 2, 0);
    }

    /// Waits until `n` requests are used; the used entries.
    fn wait_used(&self, n: u16) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.q.used_idx() < n {
            assert!(Instant::now() < deadline, "requests not completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        (0..n).map(|i| self.q.used(i)).collect()
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A write of `data` at `sector`, header at `hdr`, status at `st`.
    fn write(&mut self, hdr: u64, sector: u64, buf: u64, data: &[u8], st: u64) {
        header(&self.mem, hdr, vb::VIRTIO_BLK_T_OUT, sector);
        self.mem.write_slice(data, GuestAddress(buf)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        self.q.add(&[
            (hdr, 16, false),
            (buf, data.len() as u32, false),
            (st, 1, true),
        ]);
    }

    fn read(&mut self, hdr: u64, sector: u64, buf: u64, len: u32, st: u64) {
        header(&self.mem, hdr, vb::VIRTIO_BLK_T_IN, sector);
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        self.q
            .add(&[(hdr, 16, false), (buf, len, true), (st, 1, true)]);
    }
}

#[test]
fn config_space_and_features() {
    let s = setup_with("config", true, false);
    let mut dev = s.dev.lock().unwrap();
    use crate::pci::PciDevice;
    assert_eq!(dev.read_config_register(0), 0x1042_1af4, "virtio-blk");
    w(&mut *dev, 0x00, 4, 0);
    let f = r(&mut *dev, 0x04, 4);
    for b in [1, 2, 5, 6, 9, 13, 14] {
        assert_ne!(f & 1 << b, 0, "feature bit {b}");
    }
    assert_eq!(
        r(&mut *dev, 0x2000, 8),
        (1 << 20) / 512,
        "capacity in sectors"
    );
    assert_eq!(r(&mut *dev, 0x2008, 4), u64::from(request::SIZE_MAX));
    assert_eq!(r(&mut *dev, 0x200c, 4), u64::from(request::SEG_MAX));
    assert_eq!(r(&mut *dev, 0x2014, 4), 512, "blk_size");
    assert_eq!(r(&mut *dev, 0x2028, 4), u64::from(request::MAX_RANGES));
    assert_eq!(r(&mut *dev, 0x2038, 1), 1, "write_zeroes_may_unmap");
}

#[test]
fn write_flush_read_round_trip_off_the_vcpu_thread() {
    let mut s = setup("rw");
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    s.write(0x40000, 8, 0x41000, &data, 0x42000);
    header(&s.mem, 0x43000, vb::VIRTIO_BLK_T_FLUSH, 0);
    s.q.add(&[(0x43000, 16, false), (0x43100, 1, true)]);
    s.read(0x44000, 8, 0x45000, 4096, 0x46000);
    s.msi.take();
    s.notify();
    let used = s.wait_used(3);
    assert_eq!(used[0], (0, 1));
    assert_eq!(used[2], (5, 4097), "read data + status");
    assert_eq!(s.status(0x42000), S_OK);
    assert_eq!(s.status(0x43100), S_OK);
    assert_eq!(s.status(0x46000), S_OK);
    let mut got = vec![0u8; 4096];
    s.mem.read_slice(&mut got, GuestAddress(0x45000)).unwrap();
    assert_eq!(got, data);
    let mut on_disk = vec![0u8; 4096];
    let blk = s.dev.lock().unwrap();
    blk.device().disk().read_at(&mut on_disk, 8 * 512).unwrap();
    assert_eq!(on_disk, data, "on the image");
    assert!(dirty(&s.mem, 0x45000), "read data in the dirty bitmap");
    assert!(dirty(&s.mem, 0x46000), "status in the dirty bitmap");
    assert!(dirty(&s.mem, 0x12002), "used ring in the dirty bitmap");
    assert!(!s.msi.take().is_empty(), "interrupted");
    let st = blk.device().stats();
    assert_eq!((st.reads, st.writes, st.flushes), (1, 1, 1));
}

#[test]
fn bad_requests_get_ioerr_or_unsupp_at_once() {
    let mut s = setup_with("bad", false, false);
    // Past the end of the disk.
    s.read(0x40000, (1 << 20) / 512, 0x41000, 512, 0x42000);
    // Unknown type.
    header(&s.mem, 0x43000, 77, 0);
    s.q.add(&[(0x43000, 16, false), (0x43100, 1, true)]);
    // Data outside guest memory.
    header(&s.mem, 0x44000, vb::VIRTIO_BLK_T_IN, 0);
    s.q.add(&[
        (0x44000, 16, false),
        (0xffff_0000, 512, true),
        (0x44100, 1, true),
    ]);
    s.notify();
    // Without a worker: these were answered in the vCPU thread.
    assert_eq!(s.q.used_idx(), 3);
    assert_eq!(s.status(0x42000), S_IOERR);
    assert_eq!(s.status(0x43100), S_UNSUPP);
    assert_eq!(s.status(0x44100), S_IOERR);
    assert_eq!(
        s.dev.lock().unwrap().device_status() & 0x40,
        0,
        "no reset needed"
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut s = setup_with("ro", true, true);
    s.write(0x40000, 0, 0x41000, &[1; 512], 0x42000);
    s.read(0x43000, 0, 0x44000, 512, 0x45000);
    s.notify();
    s.wait_used(2);
    assert_eq!(s.status(0x42000), S_IOERR);
    assert_eq!(s.status(0x45000), S_OK);
}

#[test]
fn zeroes_and_discard_make_holes_and_are_journaled() {
    let mut s = setup("zero");
    s.log.start_journal();
    s.write(0x40000, 0, 0x50000, &[0xab; 8192], 0x42000);
    header(&s.mem, 0x43000, vb::VIRTIO_BLK_T_WRITE_ZEROES, 0);
    s.mem.write_obj(0u64, GuestAddress(0x43010)).unwrap();
    s.mem.write_obj(8u32, GuestAddress(0x43018)).unwrap();
    s.mem.write_obj(1u32, GuestAddress(0x4301c)).unwrap();
    s.q.add(&[(0x43000, 32, false), (0x43100, 1, true)]);
    s.notify();
    s.wait_used(2);
    assert_eq!(s.status(0x43100), S_OK);
    let blk = s.dev.lock().unwrap();
    let mut b = vec![1u8; 8192];
    blk.device().disk().read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0));
    assert!(b[4096..].iter().all(|&x| x == 0xab));
    let j = s.log.take_journal();
    assert_eq!(j.len(), 2);
    assert_eq!(
        j[1],
        DiskWrite::Zero {
            offset: 0,
            len: 4096
        }
    );
}

#[test]
fn io_errors_on_the_host_become_ioerr() {
    let s = setup("ioerr");
    // The image shrinks behind the device's back: a read of what is gone fails.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&s._img.0)
        .unwrap();
    f.set_len(512).unwrap();
    let mut s = s;
    s.read(0x40000, 100, 0x41000, 512, 0x42000);
    s.notify();
    s.wait_used(1);
    assert_eq!(s.status(0x42000), S_IOERR);
    assert_eq!(s.dev.lock().unwrap().device().stats().errors, 1);
}

#[test]
fn paused_completions_wait_and_saved_in_flight_requests_run_again() {
    let mut s = setup("pause");
    s.dev.lock().unwrap().pause().unwrap();
    s.write(0x40000, 2, 0x41000, &[0x5a; 512], 0x42000);
    s.notify();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(s.q.used_idx(), 0, "nothing completed while paused");
    assert_eq!(
        s.status(0x42000),
        0xff,
        "guest memory untouched while paused"
    );
    let saved = s.dev.lock().unwrap().save().unwrap();
    assert_eq!(saved.device.in_flight.len(), 1, "the write is in flight");
    // Through a real encoding, as a checkpoint carries it.
    let bytes = bincode::serialize(&saved).unwrap();
    let decoded: VirtioBlkState = bincode::deserialize(&bytes).unwrap();

    // A restored device (another host) executes it again.
    let img2 = Image::new("pause-restored", 1 << 20);
    let h = host(&img2, false);
    let restored = VirtioBlk::restore(
        BlkResources {
            mem: s.mem.clone(),
            msi: s.msi.clone(),
            model: h,
        },
        &decoded,
    )
    .unwrap();
    assert_eq!(
        restored.save().unwrap(),
        saved,
        "restore then save is the same"
    );
    let restored = Arc::new(Mutex::new(restored));
    let w2 = BlkWorker::start(restored.clone(), s.mem.clone()).unwrap();
    s.wait_used(1);
    assert_eq!(s.status(0x42000), S_OK);
    let mut b = [0u8; 512];
    restored
        .lock()
        .unwrap()
        .device()
        .disk()
        .read_at(&mut b, 1024)
        .unwrap();
    assert_eq!(b, [0x5a; 512], "written on the restored disk");
    w2.stop().unwrap();

    // The original, resumed, completes it too (once).
    s.dev.lock().unwrap().resume().unwrap();
    s.worker.take().unwrap().stop().unwrap();

    // A state for another size of disk is refused.
    let small = Image::new("small", 4096);
    let e = VirtioBlk::restore(
        BlkResources {
            mem: s.mem.clone(),
            msi: s.msi.clone(),
            model: host(&small, false),
        },
        &decoded,
    )
    .err()
    .unwrap();
    assert!(crate::virtio::pci::VirtioPersistError::<BlkError>::to_string(&e).contains("model"));
}

#[test]
fn a_reset_drops_completions_for_the_old_driver() {
    let mut s = setup_with("reset", false, false);
    s.write(0x40000, 2, 0x41000, &[1; 512], 0x42000);
    s.notify();
    w(&mut *s.dev.lock().unwrap(), 0x14, 1, 0);
    let worker = BlkWorker::start(s.dev.clone(), s.mem.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(s.status(0x42000), 0xff, "no status written after the reset");
    worker.stop().unwrap();
}
