//! Keeping the store's page cache within a budget: write dirty pages back, then drop
//! from the cache the pages not written recently. Runs on a thread of its own, so the
//! apply path (which acknowledges epochs) never waits for the disk.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use twin_vmm::memory::PAGE_SIZE;

use crate::Index;

/// The writer's side: counts what was written, asks for a trim when a share of the
/// budget has been written since the last one.
pub(crate) struct Trimmer {
    budget: u64,
    since: AtomicU64,
    /// Bytes written per committed epoch, newest last (to find the recent window).
    recent: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
    pending: AtomicU64,
    tx: Option<SyncSender<u32>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Trimmer {
    pub(crate) fn start(mem: Arc<File>, index: Arc<Index>, budget: u64) -> Self {
        let (tx, rx) = sync_channel::<u32>(1);
        let thread = std::thread::Builder::new()
            .name("store-trim".into())
            .spawn(move || run(&mem, &index, rx))
            .map_err(|e| tracing::warn!("cannot start the store's trimmer: {e}"))
            .ok();
        Trimmer {
            budget,
            since: AtomicU64::new(0),
            recent: Default::default(),
            pending: AtomicU64::new(0),
            tx: thread.as_ref().map(|_| tx),
            thread,
        }
    }

    pub(crate) fn written(&self, bytes: u64) {
        self.since.fetch_add(bytes, Ordering::Relaxed);
        self.pending.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn committed(&self, epoch: u64) {
        let bytes = self.pending.swap(0, Ordering::Relaxed);
        let mut recent = self.recent.lock().expect("trim lock");
        recent.push_back((epoch, bytes));
        // The pages the last epochs wrote, up to half the budget, stay cached: they are
        // the working set a failover wants first.
        let mut kept = 0u64;
        let mut oldest_kept = epoch;
        for &(e, b) in recent.iter().rev() {
            if kept + b > self.budget / 2 {
                break;
            }
            kept += b;
            oldest_kept = e;
        }
        while recent.front().is_some_and(|&(e, _)| e < oldest_kept) {
            recent.pop_front();
        }
        drop(recent);
        if self.since.load(Ordering::Relaxed) < self.budget / 4 {
            return;
        }
        self.since.store(0, Ordering::Relaxed);
        if let Some(tx) = &self.tx {
            match tx.try_send((oldest_kept & 0x7fff_ffff) as u32) {
                // A trim still running: the next commit asks again.
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mem: &File, index: &Index, rx: Receiver<u32>) {
    while let Ok(keep_from) = rx.recv() {
        if let Err(e) = trim(mem, index, keep_from) {
            tracing::warn!("trimming the replica store's cache failed: {e}");
        }
    }
}

/// Writes every dirty page back, then drops the pages written before epoch `keep_from`
/// (and every zero page) from the cache.
fn trim(mem: &File, index: &Index, keep_from: u32) -> std::io::Result<()> {
    // SAFETY: plain syscall on our own file; whole file (0, 0).
    let rc = unsafe {
        libc::sync_file_range(
            mem.as_raw_fd(),
            0,
            0,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let pages = index.pages();
    let cold = |p: usize| {
        let e = index.entry(p);
        !e.has_data() || e.epoch() < keep_from
    };
    let mut p = 0;
    while p < pages {
        if !cold(p) {
            p += 1;
            continue;
        }
        let first = p;
        while p < pages && cold(p) {
            p += 1;
        }
        drop_range(
            mem,
            (first * PAGE_SIZE) as u64,
            ((p - first) * PAGE_SIZE) as u64,
        )?;
    }
    Ok(())
}

/// Drops `len` bytes at `offset` of the file from the page cache (clean pages only).
pub(crate) fn drop_range(mem: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on our own file.
    let rc = unsafe {
        libc::posix_fadvise(
            mem.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Bytes of the file's first `size` bytes in the page cache (`mincore` of a mapping).
pub(crate) fn resident_bytes(mem: &File, size: u64) -> std::io::Result<u64> {
    let len = size as usize;
    // SAFETY: maps the file read-only and shared; unmapped below; nothing is read
    // through it (mincore only asks the kernel about the pages).
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE)];
    // SAFETY: `ptr..ptr + len` is the mapping just made; `vec` has a byte per page.
    let rc = unsafe { libc::mincore(ptr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(ptr, len) };
    if rc != 0 {
        return Err(err);
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE as u64)
}
