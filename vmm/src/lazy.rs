//! Lazy, working-set-first restore: the VM runs before its memory is loaded.
//!
//! Guest RAM is a fresh memfd whose mapping is registered with userfaultfd (missing mode).
//! A *fault thread* serves every page the guest (or KVM, or a device) touches that is not
//! loaded yet, at once, from a [`PageSource`] (a replica store, a snapshot chain); a
//! *prefetch thread* loads the pages in priority order — the working set first, then the
//! rest — so that faults become rare quickly. Both load with `UFFDIO_COPY`, which is atomic
//! per page: a page loaded by one thread makes the other's copy fail with `EEXIST`, which is
//! benign (no page is ever written twice, and one the guest already wrote is never
//! overwritten). Which pages are resident is one bit per page. Zero pages are never read:
//! the source says which pages hold data in O(1); a fault on any other page is served with
//! `UFFDIO_ZEROPAGE`, and the prefetcher skips them.
//!
//! When every page with data is resident the range is unregistered (pages never touched
//! stay holes and fault in as zero pages, as they should) and the threads end. Until then
//! the memfd's holes are not all zero pages, so [`crate::memory::Memory::data_ranges`]
//! (what a full snapshot and a live initial sync read) first waits for the load to
//! complete, finishing a demand-only load on the spot.
//!
//! A loader that fails (a source that cannot be read, a damaged page, a thread that
//! panics) must not leave a vCPU waiting forever on a fault nobody serves: the failure is
//! sent to the VM's event channel as [`crate::VmEvent::MemoryLoadFailed`], which stops the
//! VM with that reason.
//!
//! Why userfaultfd and not `MAP_PRIVATE` of the store file with the page cache doing the
//! work: a file mapping cannot be prioritised (the kernel's readahead guesses from the
//! faulting address, not from what the guest will touch next), a page read through it is
//! not verified against the store's checksums, and the VM's RAM must be a memfd for the
//! checkpoint engine to read it when the restored VM is protected again.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::uffd::{Fill, Uffd};

use crate::memory::{Memory, PAGE_SIZE};
use crate::VmEvent;

/// Pages the prefetcher reads and copies at once (a run of consecutive pages to load).
const PREFETCH_RUN: usize = 64;

/// Where the pages of a VM being restored come from.
pub trait PageSource: Send + Sync {
    /// Pages of guest RAM the source describes.
    fn page_count(&self) -> usize;
    /// Whether page `index` holds data; every other page is a zero page and is never
    /// read. Must be O(1): the fault thread asks it for every fault.
    fn has_data(&self, index: usize) -> bool;
    /// Reads pages `first..first + buf.len() / PAGE_SIZE` (all with data) into `buf`,
    /// verifying them if the source can.
    fn read(&self, first: usize, buf: &mut [u8]) -> Result<(), SourceError>;
    /// What the source is, for messages ("replica store /var/lib/twin/vm1").
    fn describe(&self) -> String;
    /// The working set, most wanted first, for [`RestoreMode::Ws`] (pages without data or
    /// out of range are skipped). Called on the prefetch thread, so that working it out
    /// does not delay the VM's start.
    fn working_set(&self) -> Vec<u32> {
        Vec::new()
    }
}

/// A page source could not give a page.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read pages {first}..{} from {what}", first + count)]
    Io {
        first: usize,
        count: usize,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("page {index} of {what} is damaged: {why}")]
    Damaged {
        index: usize,
        what: String,
        why: String,
    },
}

/// How a VM's memory is brought back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Load every page, then run (what a restore did before).
    Eager,
    /// Run at once; pages are loaded only when touched (demand paging). The rest is loaded
    /// only if something needs all of memory (a snapshot, a protection's initial sync).
    Lazy,
    /// Run at once; faults are served first, and the working set is loaded in priority
    /// order, then everything else in the background.
    #[default]
    Ws,
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eager" => Ok(Self::Eager),
            "lazy" => Ok(Self::Lazy),
            "ws" => Ok(Self::Ws),
            _ => Err(format!("{s:?} is not a restore mode (eager, lazy, ws)")),
        }
    }
}

impl std::fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Eager => "eager",
            Self::Lazy => "lazy",
            Self::Ws => "ws",
        })
    }
}

/// Why a lazy restore could not start or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("the page source has {source_pages} pages, guest memory {ram_pages}")]
    SizeMismatch {
        source_pages: usize,
        ram_pages: usize,
    },
    #[error("cannot create a userfaultfd (root, or vm.unprivileged_userfaultfd = 1, is needed)")]
    Create(#[source] std::io::Error),
    #[error("cannot register guest memory with userfaultfd")]
    Register(#[source] std::io::Error),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    #[error("an eventfd for the loader failed")]
    EventFd(#[source] std::io::Error),
    #[error("loading guest memory failed: {0}")]
    Failed(String),
}

/// How far a restore's load is, as `twin status` shows it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoadProgress {
    pub mode: RestoreMode,
    /// Pages of the source that hold data (the rest are zero pages, never read).
    pub data_pages: u64,
    /// Pages with data that are resident.
    pub resident: u64,
    /// Faults served from the source (the guest waited for each).
    pub faults: u64,
    /// Faults on zero pages (served without a read).
    pub zero_faults: u64,
    /// Pages loaded ahead of any fault.
    pub prefetched: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Every page with data is resident; the fault handling is over.
    pub complete: bool,
    /// From the start of the load until it completed (or until now).
    pub elapsed_ms: f64,
    /// Set when the load failed: the VM is stopped.
    pub error: Option<String>,
}

struct Shared {
    uffd: Uffd,
    /// Where guest RAM is mapped: (first page, host address, pages), in page order.
    spans: Vec<(usize, usize, usize)>,
    pages: usize,
    source: Arc<dyn PageSource>,
    mode: RestoreMode,
    resident: Vec<AtomicU64>,
    data_pages: u64,
    loaded: AtomicU64,
    faults: AtomicU64,
    zero_faults: AtomicU64,
    prefetched: AtomicU64,
    bytes_read: AtomicU64,
    /// Pages with data in the order the guest first touched them (faults), REAP's record.
    touched: Mutex<Vec<u32>>,
    started: Instant,
    state: Mutex<LoadState>,
    changed: Condvar,
    /// Wakes the fault thread's poll when the load is over.
    stop: OwnedFd,
    events: Mutex<Option<Sender<VmEvent>>>,
    finishing: AtomicBool,
    /// Called once with the first touches when the load completes.
    on_complete: Mutex<Option<CompleteHook>>,
    /// Resident bytes past which the prefetcher stops (faults are still served), until
    /// something needs all of memory ([`Loader::wait`]).
    budget: Option<u64>,
    /// [`Loader::wait`] asked for everything: the budget no longer holds the prefetcher.
    forced: AtomicBool,
    /// The load failed (a page that could not be loaded), as opposed to being stopped.
    failed: AtomicBool,
}

/// What [`Loader::on_complete`] calls with the first touches.
pub type CompleteHook = Box<dyn FnOnce(Vec<u32>) + Send>;

#[derive(Default)]
struct LoadState {
    complete_after: Option<Duration>,
    error: Option<String>,
}

/// A running lazy restore of one VM's memory.
pub struct Loader {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Loader {
    /// Registers `memory` (fresh, all holes) with userfaultfd and starts serving it from
    /// `source`. For [`RestoreMode::Eager`] the caller waits with [`Loader::wait`] before
    /// it runs the VM.
    pub fn start(
        memory: &Memory,
        source: Arc<dyn PageSource>,
        mode: RestoreMode,
    ) -> Result<Self, LazyError> {
        Self::start_within(memory, source, mode, None)
    }

    /// [`Loader::start`], with the prefetcher stopping once `budget` bytes of guest memory
    /// are resident: a VM restored where memory is short (a backup in a memory cgroup)
    /// gets its working set ahead of its touches and the rest only when touched.
    pub fn start_within(
        memory: &Memory,
        source: Arc<dyn PageSource>,
        mode: RestoreMode,
        budget: Option<u64>,
    ) -> Result<Self, LazyError> {
        let pages = memory.page_count();
        if source.page_count() != pages {
            return Err(LazyError::SizeMismatch {
                source_pages: source.page_count(),
                ram_pages: pages,
            });
        }
        // Kernel-mode faults must reach us too: KVM touches guest memory from the kernel
        // (get_user_pages), as does a read(2) into it.
        let uffd = Uffd::new().map_err(LazyError::Create)?;
        let spans = memory.host_spans();
        for &(_, host, n) in &spans {
            uffd.register(host, n * PAGE_SIZE)
                .map_err(LazyError::Register)?;
        }
        // SAFETY: plain syscall; the returned fd is checked and owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(LazyError::EventFd(std::io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh fd nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let data_pages = (0..pages).filter(|&p| source.has_data(p)).count() as u64;
        let shared = Arc::new(Shared {
            uffd,
            spans,
            pages,
            source,
            mode,
            resident: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            data_pages,
            loaded: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            touched: Mutex::new(Vec::new()),
            started: Instant::now(),
            state: Mutex::new(LoadState::default()),
            changed: Condvar::new(),
            stop,
            events: Mutex::new(None),
            finishing: AtomicBool::new(mode != RestoreMode::Lazy),
            on_complete: Mutex::new(None),
            budget,
            forced: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("mem-fault".into())
                .spawn(move || s.guard("fault thread", || s.serve_faults()))
                .map_err(|e| LazyError::Thread("fault", e))?,
        );
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("mem-prefetch".into())
            .spawn(move || {
                s.guard("prefetch thread", || {
                    let order = if s.mode == RestoreMode::Ws {
                        s.source.working_set()
                    } else {
                        Vec::new()
                    };
                    s.prefetch(&order)
                })
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                shared.fail("cannot start the prefetch thread".into());
                return Err(LazyError::Thread("prefetch", e));
            }
        }
        if data_pages == 0 {
            shared.complete();
        }
        // Whoever needs all of memory waits for the load; the memory's drop stops it.
        memory.set_pending_load(LoadGate(shared.clone()));
        Ok(Loader { shared, threads })
    }

    /// Calls `hook` with the first touches (see [`Loader::first_touches`]) when the load
    /// completes (at once if it has), or when the loader is dropped before (not after a
    /// failure).
    pub fn on_complete(&self, hook: CompleteHook) {
        if self.is_complete() {
            hook(self.first_touches());
        } else {
            *self.shared.on_complete.lock().expect("load lock") = Some(hook);
            // It may have completed in between, without seeing the hook.
            if self.is_complete() {
                if let Some(h) = self.shared.on_complete.lock().expect("load lock").take() {
                    h(self.first_touches());
                }
            }
        }
    }

    /// After a failure: makes every page not loaded a memory error (see
    /// [`Uffd::poison`]) and wakes whoever waits on one, so that nothing waits forever on a
    /// page nobody will load (a vCPU, KVM's async page-fault worker that a VM's teardown
    /// waits for) and nothing ever reads a zero page in its place.
    pub fn abort(&self) {
        self.shared.fail_quietly();
        self.shared.poison_missing();
    }

    /// Sends a failure of the load (now or later) to the VM's event channel.
    pub fn report_failures_to(&self, events: Sender<VmEvent>) {
        let failed = self.shared.state.lock().expect("load lock").error.clone();
        if let Some(e) = failed {
            let _ = events.send(VmEvent::MemoryLoadFailed(e));
        }
        *self.shared.events.lock().expect("load lock") = Some(events);
    }

    /// Waits until every page with data is resident (loading the rest at once if this
    /// was a demand-only load), or the load failed.
    pub fn wait(&self) -> Result<(), LazyError> {
        self.shared.wait()
    }

    pub fn mode(&self) -> RestoreMode {
        self.shared.mode
    }

    pub fn progress(&self) -> LoadProgress {
        self.shared.progress()
    }

    /// The pages the guest faulted on with data, in first-touch order: the working set to
    /// load first next time.
    pub fn first_touches(&self) -> Vec<u32> {
        self.shared.touched.lock().expect("touch lock").clone()
    }

    pub fn is_complete(&self) -> bool {
        self.shared
            .state
            .lock()
            .expect("load lock")
            .complete_after
            .is_some()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // A load that failed (not one stopped because its memory went away first).
        let failed = self.shared.failed.load(Ordering::Acquire);
        if !failed {
            // A VM stopped before its load completed (a demand-only restore, typically)
            // still leaves its record of first touches for the next restore.
            let hook = self.shared.on_complete.lock().expect("load lock").take();
            if let Some(h) = hook {
                h(self.first_touches());
            }
        }
        // A loader dropped before it completed (the VM is gone): stop both threads.
        self.shared.fail_quietly();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if failed {
            // Closing the userfaultfd would wake whoever waits for a page that could not be
            // loaded with a zero page there: the guest must never run on memory that is not
            // its own. The pages not loaded are poisoned first.
            self.shared.poison_missing();
        }
    }
}

/// Makes whoever needs all of guest memory wait for a lazy restore to complete.
#[derive(Clone)]
pub struct LoadGate(Arc<Shared>);

impl LoadGate {
    pub fn wait(&self) -> Result<(), LazyError> {
        self.0.wait()
    }

    /// Ends the load where it is (its memory is going away).
    pub fn stop(&self) {
        self.0.fail_quietly();
    }
}

impl Shared {
    fn wait(&self) -> Result<(), LazyError> {
        self.forced.store(true, Ordering::Release);
        self.finishing.store(true, Ordering::Release);
        self.changed.notify_all();
        let mut st = self.state.lock().expect("load lock");
        loop {
            if let Some(e) = &st.error {
                return Err(LazyError::Failed(e.clone()));
            }
            if st.complete_after.is_some() {
                return Ok(());
            }
            st = self.changed.wait(st).expect("load lock");
        }
    }

    fn page_addr(&self, p: usize) -> usize {
        let &(first, host, _) = self
            .spans
            .iter()
            .rev()
            .find(|(first, _, _)| *first <= p)
            .expect("page 0 is in the first span");
        host + (p - first) * PAGE_SIZE
    }

    /// The page a faulting host address is in.
    fn page_of(&self, addr: usize) -> Option<usize> {
        self.spans.iter().find_map(|&(first, host, n)| {
            let off = addr.checked_sub(host)?;
            (off < n * PAGE_SIZE).then_some(first + off / PAGE_SIZE)
        })
    }

    /// Runs of pages `first..first + count` split where the host mapping is not contiguous.
    fn contiguous(&self, first: usize, count: usize) -> usize {
        let &(f, _, n) = self
            .spans
            .iter()
            .rev()
            .find(|(f, _, _)| *f <= first)
            .expect("page 0 is in the first span");
        count.min(f + n - first)
    }

    fn is_resident(&self, p: usize) -> bool {
        self.resident[p / 64].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    /// Marks page `p` resident; counts it if it held data and was not before.
    fn set_resident(&self, p: usize) {
        let prev = self.resident[p / 64].fetch_or(1 << (p % 64), Ordering::AcqRel);
        if prev & (1 << (p % 64)) == 0 && self.source.has_data(p) {
            let n = self.loaded.fetch_add(1, Ordering::AcqRel) + 1;
            if n == self.data_pages {
                self.complete();
            }
        }
    }

    fn is_over(&self) -> bool {
        let st = self.state.lock().expect("load lock");
        st.complete_after.is_some() || st.error.is_some()
    }

    /// Every page with data is resident: unregister (untouched pages are zero pages and
    /// fault in normally from now on) and end both threads.
    fn complete(&self) {
        {
            let mut st = self.state.lock().expect("load lock");
            if st.complete_after.is_some() || st.error.is_some() {
                return;
            }
            st.complete_after = Some(self.started.elapsed());
        }
        for &(_, host, n) in &self.spans {
            if let Err(e) = self.uffd.unregister(host, n * PAGE_SIZE) {
                tracing::warn!("unregistering guest memory from userfaultfd failed: {e}");
            }
        }
        self.wake_threads();
        let hook = self.on_complete.lock().expect("load lock").take();
        if let Some(h) = hook {
            h(self.touched.lock().expect("touch lock").clone());
        }
        tracing::debug!(
            mode = %self.mode,
            pages = self.data_pages,
            faults = self.faults.load(Ordering::Relaxed),
            prefetched = self.prefetched.load(Ordering::Relaxed),
            ms = self.started.elapsed().as_millis() as u64,
            "guest memory loaded"
        );
    }

    fn poison_missing(&self) {
        let mut p = 0;
        let mut poisoned = 0u64;
        while p < self.pages {
            if self.is_resident(p) {
                p += 1;
                continue;
            }
            let n = self.contiguous(p, self.pages - p);
            let mut run = 1;
            while run < n && !self.is_resident(p + run) {
                run += 1;
            }
            let mut at = 0;
            let mut tries = 0;
            while at < run {
                match self
                    .uffd
                    .poison(self.page_addr(p + at), (run - at) * PAGE_SIZE)
                {
                    Ok(Fill::Done(b)) if b >= PAGE_SIZE => {
                        at += b / PAGE_SIZE;
                        poisoned += (b / PAGE_SIZE) as u64;
                    }
                    Ok(Fill::Done(_)) if tries < 100 => tries += 1,
                    // Present meanwhile (loaded, or faulted in as a zero page).
                    Ok(_) => at += 1,
                    // The mapping is gone (the memory was dropped): nobody can wait on it.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return,
                    Err(e) => {
                        tracing::error!(
                            "cannot poison the guest pages not loaded ({e}); a vCPU may wait on one"
                        );
                        return;
                    }
                }
            }
            p += run;
        }
        tracing::debug!(poisoned, "guest pages not loaded are poisoned");
    }

    fn wake_threads(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        self.changed.notify_all();
    }

    /// The load failed: record why, tell the VM (which stops), end both threads.
    fn fail(&self, why: String) {
        {
            let mut st = self.state.lock().expect("load lock");
            if st.error.is_some() || st.complete_after.is_some() {
                return;
            }
            st.error = Some(why.clone());
        }
        self.failed.store(true, Ordering::Release);
        tracing::error!("loading guest memory failed: {why}");
        if let Some(tx) = self.events.lock().expect("load lock").as_ref() {
            let _ = tx.send(VmEvent::MemoryLoadFailed(why));
        }
        self.wake_threads();
    }

    fn fail_quietly(&self) {
        {
            let mut st = self.state.lock().expect("load lock");
            if st.error.is_none() && st.complete_after.is_none() {
                st.error = Some("the VM was stopped before its memory was loaded".into());
            }
        }
        self.wake_threads();
    }

    /// Runs a thread's body; a panic or an error is the load's failure, never a silent
    /// end that would leave a fault unserved.
    fn guard(&self, name: &str, body: impl FnOnce() -> Result<(), String>) {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.fail(e),
            Err(_) => self.fail(format!("the {name} of the memory loader died")),
        }
    }

    /// Loads the pages `first..first + count` (all with data, none known resident).
    /// Returns how many it copied (pages found resident meanwhile are skipped).
    fn load_run(&self, first: usize, count: usize, buf: &mut Vec<u8>) -> Result<u64, String> {
        buf.resize(count * PAGE_SIZE, 0);
        self.source
            .read(first, &mut buf[..count * PAGE_SIZE])
            .map_err(|e| crate::describe_error(&e))?;
        self.bytes_read
            .fetch_add((count * PAGE_SIZE) as u64, Ordering::Relaxed);
        let mut copied = 0;
        let mut at = 0;
        let mut retries = 0;
        while at < count {
            // SAFETY: the source is `count - at` pages inside `buf`; the destination is
            // checked by the kernel against the registered range (runs never cross a
            // span, see `contiguous`): a range unmapped since (the memory dropped, which
            // stops the load first) fails the copy, it never writes elsewhere.
            let r = unsafe {
                self.uffd.copy(
                    buf[at * PAGE_SIZE..].as_ptr(),
                    self.page_addr(first + at),
                    (count - at) * PAGE_SIZE,
                )
            };
            match r {
                Ok(Fill::Done(n)) if n >= PAGE_SIZE => {
                    let done = n / PAGE_SIZE;
                    for p in first + at..first + at + done {
                        self.set_resident(p);
                    }
                    copied += done as u64;
                    at += done;
                    retries = 0;
                }
                Ok(Fill::Done(_)) => {
                    // The address space was changing: try again, a bounded number of times.
                    retries += 1;
                    if retries > 1000 {
                        return Err(format!(
                            "copying page {} keeps failing with EAGAIN",
                            first + at
                        ));
                    }
                    std::thread::yield_now();
                }
                Ok(Fill::Exists) => {
                    // Loaded by the other thread (or faulted in) meanwhile: never overwrite.
                    self.set_resident(first + at);
                    at += 1;
                }
                Err(e) => {
                    if self.is_over() {
                        return Ok(copied);
                    }
                    return Err(format!(
                        "cannot copy page {} into guest memory: {e}",
                        first + at
                    ));
                }
            }
        }
        Ok(copied)
    }

    fn serve_faults(&self) -> Result<(), String> {
        let mut buf = Vec::with_capacity(PAGE_SIZE);
        let mut pfd = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if self.is_over() {
                return Ok(());
            }
            // SAFETY: two valid pollfds in a live array.
            let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 2, 1000) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll on the userfaultfd failed: {e}"));
            }
            if pfd[1].revents != 0 {
                return Ok(());
            }
            if pfd[0].revents == 0 {
                continue;
            }
            loop {
                let addr = match self.uffd.next_fault() {
                    Ok(Some(a)) => a as usize,
                    Ok(None) => break,
                    Err(e) => {
                        if self.is_over() {
                            return Ok(());
                        }
                        return Err(format!("reading the userfaultfd failed: {e}"));
                    }
                };
                let Some(p) = self.page_of(addr) else {
                    return Err(format!("a fault at {addr:#x} is outside guest memory"));
                };
                twin_failpoints::hit("lazy.fault");
                self.serve(p, &mut buf)?;
            }
        }
    }

    fn serve(&self, p: usize, buf: &mut Vec<u8>) -> Result<(), String> {
        let addr = self.page_addr(p);
        if self.is_resident(p) {
            // Loaded after the fault was raised: the copy woke it already, or will.
            let _ = self.uffd.wake(addr, PAGE_SIZE);
            return Ok(());
        }
        if !self.source.has_data(p) {
            match self.uffd.zeropage(addr, PAGE_SIZE) {
                Ok(Fill::Done(_)) => {}
                Ok(Fill::Exists) => {
                    let _ = self.uffd.wake(addr, PAGE_SIZE);
                }
                Err(e) if self.is_over() => {
                    tracing::debug!("zero page after the load ended: {e}");
                }
                Err(e) => return Err(format!("cannot map zero page {p}: {e}")),
            }
            self.set_resident(p);
            self.zero_faults.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.touched.lock().expect("touch lock").push(p as u32);
        if self.load_run(p, 1, buf)? == 0 {
            let _ = self.uffd.wake(addr, PAGE_SIZE);
        }
        Ok(())
    }

    /// Past the budget: waits until everything is asked for (or the load is over).
    fn hold_at_budget(&self) {
        let Some(budget) = self.budget else {
            return;
        };
        if self.loaded.load(Ordering::Acquire) * (PAGE_SIZE as u64) < budget {
            return;
        }
        tracing::info!(
            resident_mib = budget >> 20,
            "guest memory: prefetch stops at its budget; the rest loads when touched"
        );
        let mut st = self.state.lock().expect("load lock");
        while !self.forced.load(Ordering::Acquire)
            && st.complete_after.is_none()
            && st.error.is_none()
        {
            st = self.changed.wait(st).expect("load lock");
        }
    }

    /// Loads the pages of `order` (the working set), then every other page with data, in
    /// runs; waits first for a finish request in a demand-only load.
    fn prefetch(&self, order: &[u32]) -> Result<(), String> {
        {
            let mut st = self.state.lock().expect("load lock");
            while !self.finishing.load(Ordering::Acquire)
                && st.complete_after.is_none()
                && st.error.is_none()
            {
                st = self.changed.wait(st).expect("load lock");
            }
        }
        let pages = self.pages;
        let mut buf = Vec::with_capacity(PREFETCH_RUN * PAGE_SIZE);
        let wanted = |p: usize| p < pages && self.source.has_data(p) && !self.is_resident(p);
        // The working set, coalescing neighbours that are both in it.
        let mut i = 0;
        while i < order.len() {
            if self.is_over() {
                return Ok(());
            }
            let first = order[i] as usize;
            i += 1;
            if !wanted(first) {
                continue;
            }
            let mut count = 1;
            let most = self.contiguous(first, PREFETCH_RUN);
            while count < most
                && i < order.len()
                && order[i] as usize == first + count
                && wanted(first + count)
            {
                count += 1;
                i += 1;
            }
            twin_failpoints::hit("lazy.prefetch");
            let n = self.load_run(first, count, &mut buf)?;
            self.prefetched.fetch_add(n, Ordering::Relaxed);
            self.hold_at_budget();
        }
        // Everything else, in address order.
        let mut p = 0;
        while p < pages {
            if self.is_over() {
                return Ok(());
            }
            if !wanted(p) {
                p += 1;
                continue;
            }
            let mut count = 1;
            let most = self.contiguous(p, PREFETCH_RUN);
            while count < most && wanted(p + count) {
                count += 1;
            }
            twin_failpoints::hit("lazy.prefetch");
            let n = self.load_run(p, count, &mut buf)?;
            self.prefetched.fetch_add(n, Ordering::Relaxed);
            p += count;
            self.hold_at_budget();
        }
        Ok(())
    }

    fn progress(&self) -> LoadProgress {
        let st = self.state.lock().expect("load lock");
        LoadProgress {
            mode: self.mode,
            data_pages: self.data_pages,
            resident: self.loaded.load(Ordering::Acquire),
            faults: self.faults.load(Ordering::Relaxed),
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            complete: st.complete_after.is_some(),
            elapsed_ms: st
                .complete_after
                .unwrap_or_else(|| self.started.elapsed())
                .as_secs_f64()
                * 1e3,
            error: st.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Pages whose content names their index; every third page a zero page.
    struct Numbered {
        pages: usize,
        fail_at: Option<usize>,
    }

    impl PageSource for Numbered {
        fn page_count(&self) -> usize {
            self.pages
        }
        fn has_data(&self, i: usize) -> bool {
            i % 3 != 0
        }
        fn read(&self, first: usize, buf: &mut [u8]) -> Result<(), SourceError> {
            for (k, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
                let i = first + k;
                assert!(self.has_data(i), "a zero page {i} was read");
                if Some(i) == self.fail_at {
                    return Err(SourceError::Damaged {
                        index: i,
                        what: "the test source".into(),
                        why: "checksum".into(),
                    });
                }
                page.fill(0);
                page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "the test source".into()
        }
        fn working_set(&self) -> Vec<u32> {
            vec![700, 701, 5, 2, 1 << 30]
        }
    }

    fn word(mem: &Memory, page: usize) -> u64 {
        mem.guest_memory()
            .read_obj::<u64>(GuestAddress((page * PAGE_SIZE) as u64))
            .unwrap()
    }

    #[test]
    fn every_mode_restores_every_page_and_zero_pages_are_never_read() {
        for mode in [RestoreMode::Eager, RestoreMode::Lazy, RestoreMode::Ws] {
            let mem = Memory::new(4 << 20).unwrap();
            let src = Arc::new(Numbered {
                pages: mem.page_count(),
                fail_at: None,
            });
            let l = Loader::start(&mem, src, mode).unwrap();
            // Touches before the load ends are served by the fault thread.
            assert_eq!(word(&mem, 99), 0, "page 99 is not a data page");
            assert_eq!(word(&mem, 101), 102);
            l.wait().unwrap();
            for p in 0..mem.page_count() {
                let want = if p % 3 == 0 { 0 } else { p as u64 + 1 };
                assert_eq!(word(&mem, p), want, "{mode}: page {p}");
            }
            let pr = l.progress();
            assert!(pr.complete);
            assert_eq!(pr.resident, pr.data_pages);
            assert_eq!(
                pr.bytes_read,
                pr.data_pages * PAGE_SIZE as u64,
                "{mode}: {pr:?}"
            );
        }
    }

    #[test]
    fn a_write_after_a_fault_is_never_overwritten_by_the_prefetcher() {
        let mem = Memory::new(8 << 20).unwrap();
        let src = Arc::new(Numbered {
            pages: mem.page_count(),
            fail_at: None,
        });
        let l = Loader::start(&mem, src, RestoreMode::Lazy).unwrap();
        let gm = mem.guest_memory();
        let last = mem.page_count() - 1;
        gm.write_obj(0xdead_u64, GuestAddress((last * PAGE_SIZE) as u64))
            .unwrap();
        l.wait().unwrap();
        assert_eq!(word(&mem, last), 0xdead);
        assert_eq!(l.first_touches(), vec![last as u32]);
    }

    #[test]
    fn a_loader_dropped_before_it_completed_still_hands_over_its_first_touches() {
        let mem = Memory::new(4 << 20).unwrap();
        let src = Arc::new(Numbered {
            pages: mem.page_count(),
            fail_at: None,
        });
        let l = Loader::start(&mem, src, RestoreMode::Lazy).unwrap();
        assert_eq!(word(&mem, 7), 8);
        let (tx, rx) = std::sync::mpsc::channel();
        l.on_complete(Box::new(move |t| tx.send(t).unwrap()));
        drop(l);
        assert_eq!(rx.try_recv().unwrap(), vec![7]);
    }

    #[test]
    fn the_prefetcher_stops_at_its_budget_until_everything_is_asked_for() {
        let mem = Memory::new(8 << 20).unwrap();
        let src = Arc::new(Numbered {
            pages: mem.page_count(),
            fail_at: None,
        });
        let l = Loader::start_within(&mem, src, RestoreMode::Ws, Some(1 << 20)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let p = l.progress();
        assert!(!p.complete, "{p:?}");
        // One run past the budget at most.
        let most = (1 << 20) / PAGE_SIZE as u64 + PREFETCH_RUN as u64;
        assert!(p.resident >= 256 && p.resident <= most, "{p:?}");
        l.wait().unwrap();
        assert!(l.progress().complete);
    }

    #[test]
    fn a_damaged_page_fails_the_load_with_its_reason() {
        let mem = Memory::new(2 << 20).unwrap();
        let src = Arc::new(Numbered {
            pages: mem.page_count(),
            fail_at: Some(200),
        });
        let l = Loader::start(&mem, src, RestoreMode::Ws).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        l.report_failures_to(tx);
        let e = l.wait().unwrap_err().to_string();
        assert!(e.contains("page 200 of the test source is damaged"), "{e}");
        match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
            VmEvent::MemoryLoadFailed(why) => assert!(why.contains("page 200"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
