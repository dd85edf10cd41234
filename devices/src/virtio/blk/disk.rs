//! The host side of a disk: the raw image file behind a virtio-blk device, and the log of
//! what the guest wrote to it (for replication and incremental snapshots).
//!
//! The image is a plain file, `capacity` bytes of which the guest sees (the file's size
//! rounded down to a sector). Sparse stays sparse: a discard or a write of zeroes punches a
//! hole (`fallocate(PUNCH_HOLE)`), and a copy of the image ([`copy_sparse`]) copies only
//! its data extents (`SEEK_DATA`/`SEEK_HOLE`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bytes per sector: request offsets are in these units, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Granularity of the written-block bitmap an incremental snapshot is taken from.
pub const TRACK_BLOCK: u64 = 4096;
/// Most bytes of guest writes the journal holds before the worker waits for it to be taken
/// (the replication thread takes it every epoch).
pub const JOURNAL_CAP: u64 = 256 << 20;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("disk image {} holds less than one 512-byte sector", .0.display())]
    TooSmall(PathBuf),
}

/// A raw disk image, opened for the device.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
}

impl DiskImage {
    /// Opens `path` (read-write unless `read_only`); the guest sees its size rounded down to
    /// a sector.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let open = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open)?;
        let meta = file.metadata().map_err(open)?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        }
        let capacity = meta.len() / SECTOR_SIZE * SECTOR_SIZE;
        if capacity == 0 {
            return Err(DiskError::TooSmall(path.to_path_buf()));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            capacity,
            read_only,
        })
    }

    /// Bytes the guest sees.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads `buf.len()` bytes at `offset`; a file shorter than that (truncated behind the
    /// device's back) is an error, not zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes `[offset, offset + len)` read as zeroes, as a hole where the file system can.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(&self.file, offset, len)
    }

    /// Drops `[offset, offset + len)` (a discard): a hole, so it reads as zeroes after.
    /// A file system without holes keeps the data, which a discard allows.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match punch_hole(&self.file, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a file descriptor this `File` owns; it reads no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `[offset, offset + len)` of `file` reads as zeroes after this: a hole where possible,
/// written zeroes otherwise.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match punch_hole(file, offset, len) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let zeroes = vec![0u8; 1 << 20];
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let n = (end - at).min(zeroes.len() as u64) as usize;
                file.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        r => r,
    }
}

/// The data extents of `file` within `[0, len)`: `(offset, length)` pairs, ascending (a
/// file system that cannot say reports the whole range).
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a descriptor this `File` owns; no memory is passed.
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < len {
        let start = match seek(at, libc::SEEK_DATA) {
            Ok(s) => s,
            // No data after `at`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(0, len)]),
            Err(e) => return Err(e),
        };
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.min(len);
        out.push((start, end - start));
        at = end;
    }
    Ok(out)
}

/// Copies the first `len` bytes of `src` into `dst` (which must be empty), keeping holes
/// holes: only the data extents are read and written; `dst` is then sized to `len`.
/// Returns the bytes of data copied.
pub fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for (start, n) in data_extents(src, len)? {
        let mut at = start;
        while at < start + n {
            let chunk = (start + n - at).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..chunk], at)?;
            // Zero runs inside a data extent (preallocated, or written as zeroes) are left
            // as holes too.
            if buf[..chunk].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..chunk], at)?;
            }
            at += chunk as u64;
            copied += chunk as u64;
        }
    }
    dst.set_len(len)?;
    Ok(copied)
}

/// One guest write, as it reached the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskWrite {
    /// `data` written at byte `offset`.
    Data { offset: u64, data: Vec<u8> },
    /// `[offset, offset + len)` made zero (a discard or a write of zeroes).
    Zero { offset: u64, len: u64 },
}

impl DiskWrite {
    /// Bytes of data it carries.
    pub fn data_len(&self) -> u64 {
        match self {
            DiskWrite::Data { data, .. } => data.len() as u64,
            DiskWrite::Zero { .. } => 0,
        }
    }

    fn range(&self) -> (u64, u64) {
        match self {
            DiskWrite::Data { offset, data } => (*offset, data.len() as u64),
            DiskWrite::Zero { offset, len } => (*offset, *len),
        }
    }

    /// Applies it to `file` (a replica, or a restored disk).
    pub fn apply(&self, file: &File) -> io::Result<()> {
        match self {
            DiskWrite::Data { offset, data } => file.write_all_at(data, *offset),
            DiskWrite::Zero { offset, len } => zero_range(file, *offset, *len),
        }
    }
}

#[derive(Debug, Default)]
struct LogInner {
    /// The writes since the last [`WriteLog::take_journal`], in the order they reached the
    /// image; `None` while nobody records (unprotected).
    journal: Option<Vec<DiskWrite>>,
    journal_bytes: u64,
    /// Blocks ([`TRACK_BLOCK`]) written since the last [`WriteLog::take_dirty`]; `None`
    /// while untracked.
    dirty: Option<Vec<u64>>,
}

/// What the guest wrote to one disk, for whoever needs to know: the replication thread
/// (the writes themselves, in order, per epoch) and the snapshots (which blocks).
///
/// The device's worker records a write *after* it reached the image and *before* its
/// completion is written to the guest under the device lock; a checkpoint takes the
/// journal while holding that lock. So every write whose completion a checkpoint's state
/// shows is in that checkpoint's journal or an earlier one.
#[derive(Debug)]
pub struct WriteLog {
    capacity: u64,
    inner: Mutex<LogInner>,
    taken: Condvar,
}

impl WriteLog {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            inner: Mutex::new(LogInner::default()),
            taken: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts keeping a journal of the writes (empty).
    pub fn start_journal(&self) {
        let mut g = self.lock();
        g.journal = Some(Vec::new());
        g.journal_bytes = 0;
    }

    /// Stops the journal and drops what it held.
    pub fn stop_journal(&self) {
        let mut g = self.lock();
        g.journal = None;
        g.journal_bytes = 0;
        self.taken.notify_all();
    }

    pub fn journaling(&self) -> bool {
        self.lock().journal.is_some()
    }

    /// The writes since the previous take (none if no journal is kept).
    pub fn take_journal(&self) -> Vec<DiskWrite> {
        let mut g = self.lock();
        g.journal_bytes = 0;
        let out = g.journal.as_mut().map(std::mem::take).unwrap_or_default();
        self.taken.notify_all();
        out
    }

    /// Starts tracking written blocks (none so far).
    pub fn start_tracking(&self) {
        let words = self.capacity.div_ceil(TRACK_BLOCK).div_ceil(64) as usize;
        self.lock().dirty = Some(vec![0; words]);
    }

    pub fn stop_tracking(&self) {
        self.lock().dirty = None;
    }

    pub fn tracking(&self) -> bool {
        self.lock().dirty.is_some()
    }

    /// The blocks written since the previous take, as a bitmap (`None` if untracked).
    pub fn take_dirty(&self) -> Option<Vec<u64>> {
        let mut g = self.lock();
        let words = g.dirty.as_ref()?.len();
        g.dirty
            .as_mut()
            .map(|d| std::mem::replace(d, vec![0; words]))
    }

    /// Gives back blocks a failed snapshot took.
    pub fn merge_dirty(&self, bitmap: &[u64]) {
        if let Some(d) = self.lock().dirty.as_mut() {
            for (a, b) in d.iter_mut().zip(bitmap) {
                *a |= b;
            }
        }
    }

    /// Records a write that reached the image. With a journal over [`JOURNAL_CAP`] this
    /// waits (in slices, so a journal stopped meanwhile frees it) until it is taken: a
    /// replication that falls behind slows the guest's writes instead of growing without
    /// bound.
    pub fn record(&self, w: DiskWrite) {
        let mut g = self.lock();
        let (offset, len) = w.range();
        if let Some(d) = g.dirty.as_mut() {
            let first = offset / TRACK_BLOCK;
            let last = (offset + len.max(1) - 1) / TRACK_BLOCK;
            for b in first..=last {
                if let Some(word) = d.get_mut((b / 64) as usize) {
                    *word |= 1 << (b % 64);
                }
            }
        }
        while g.journal.is_some() && g.journal_bytes > JOURNAL_CAP {
            g = self
                .taken
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if g.journal.is_some() {
            g.journal_bytes += w.data_len();
            g.journal.as_mut().expect("checked").push(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("twin-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn opens_sizes_and_refuses() {
        let p = tmp("open");
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        let d = DiskImage::open(&p, false).unwrap();
        assert_eq!(d.capacity(), 512, "rounded down to a sector");
        std::fs::write(&p, vec![0u8; 100]).unwrap();
        assert!(matches!(
            DiskImage::open(&p, false),
            Err(DiskError::TooSmall(_))
        ));
        assert!(matches!(
            DiskImage::open(&tmp("missing"), false),
            Err(DiskError::Open { .. })
        ));
        assert!(matches!(
            DiskImage::open(&std::env::temp_dir(), true),
            Err(DiskError::NotAFile(_)) | Err(DiskError::Open { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn zeroes_punch_holes_and_sparse_copies_stay_sparse() {
        let p = tmp("sparse");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        let d = DiskImage::open(&p, false).unwrap();
        d.write_at(&[7u8; 8192], 1 << 20).unwrap();
        d.write_at(&[9u8; 4096], 32 << 20).unwrap();
        let ext = data_extents(d.file(), d.capacity()).unwrap();
        let data: u64 = ext.iter().map(|e| e.1).sum();
        assert!(data <= 64 << 10, "only what was written has data: {ext:?}");
        d.zero_range(1 << 20, 8192).unwrap();
        let mut b = [1u8; 8192];
        d.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let ext = data_extents(d.file(), d.capacity()).unwrap();
        assert!(
            ext.iter()
                .all(|&(s, n)| s + n <= 1 << 20 || s >= (1 << 20) + 8192),
            "the zeroed range is a hole: {ext:?}"
        );
        let q = tmp("sparse-copy");
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&q)
            .unwrap();
        let copied = copy_sparse(d.file(), &dst, d.capacity()).unwrap();
        assert!(copied <= 64 << 10);
        assert_eq!(dst.metadata().unwrap().len(), 64 << 20);
        let mut b = [0u8; 4096];
        dst.read_exact_at(&mut b, 32 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 9));
        use std::os::unix::fs::MetadataExt;
        assert!(
            dst.metadata().unwrap().blocks() * 512 <= 1 << 20,
            "copy is sparse"
        );
        std::fs::remove_file(&p).unwrap();
        std::fs::remove_file(&q).unwrap();
    }

    #[test]
    fn the_log_journals_and_tracks_only_when_asked() {
        let log = WriteLog::new(1 << 20);
        log.record(DiskWrite::Data {
            offset: 0,
            data: vec![1; 512],
        });
        assert!(log.take_journal().is_empty(), "no journal kept");
        assert_eq!(log.take_dirty(), None);
        log.start_journal();
        log.start_tracking();
        log.record(DiskWrite::Data {
            offset: 4096 * 3 + 100,
            data: vec![2; 4096],
        });
        log.record(DiskWrite::Zero {
            offset: 4096 * 70,
            len: 4096,
        });
        let j = log.take_journal();
        assert_eq!(j.len(), 2);
        assert_eq!(j[0].data_len(), 4096);
        let d = log.take_dirty().unwrap();
        assert_eq!(d[0], 0b11000);
        assert_eq!(d[1], 1 << 6);
        assert_eq!(log.take_dirty().unwrap(), vec![0; d.len()], "taken");
        log.merge_dirty(&d);
        assert_eq!(log.take_dirty().unwrap(), d, "given back");
        log.stop_journal();
        assert!(!log.journaling());
    }
}
