//! vCPU threads: the run loop, exit dispatch, and pause/resume.
//!
//! Pausing follows Cloud Hypervisor and Firecracker: the controller sets the requested
//! state, then kicks each vCPU thread with a real-time signal whose handler sets the
//! thread's `kvm_run.immediate_exit`. That closes the race where the signal arrives just
//! before `KVM_RUN`: the run then returns `EINTR` at once. Before reporting itself paused a
//! vCPU whose last exit was MMIO/PIO enters `KVM_RUN` once more with `immediate_exit` set,
//! so the exit's result (which KVM consumes only on the next run) completes and the captured
//! registers are consistent; a vCPU stopped by the kick (`EINTR`) has nothing pending.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_run, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::Bus;
use crate::VmEvent;

/// Errors creating, configuring or controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {id} failed")]
    Create {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU ioctl {op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("registering the vCPU kick signal handler failed")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("spawning the vCPU {id} thread failed")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {id}: {entries} CPUID entries is more than KVM takes ({KVM_MAX_CPUID_ENTRIES})")]
    CpuidCount { id: u8, entries: usize },
    #[error("vCPU {id}: no CPUID entries")]
    NoCpuid { id: u8 },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { op, source }
}

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread to its vCPU's `kvm_run` mapping, which
        // stays mapped while the thread's `VcpuFd` lives (the thread clears the pointer
        // before dropping it). A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler (idempotent; call before starting vCPUs).
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// Longest a pause busy-waits for the vCPUs to park before it sleeps (a kicked vCPU on
/// another core parks in ~50 µs here).
const PAUSE_SPIN: std::time::Duration = std::time::Duration::from_micros(300);
/// Pauses that sleep at once after [`SPIN_STRIKES`] spins in a row ran out: the vCPU then
/// shares the core with the pausing thread, which (`SCHED_FIFO` in the primary) would keep
/// it from parking. A single slow stop (~3% of them) is not that.
const SPIN_BACKOFF: u32 = 32;
const SPIN_STRIKES: u32 = 3;

const REQ_RUN: u8 = 0;
const REQ_PAUSE: u8 = 1;
const REQ_STOP: u8 = 2;

/// Shared pause/resume/stop control of all vCPUs of one VM.
#[derive(Default)]
pub struct VcpuControl {
    requested: AtomicU8,
    /// vCPU threads parked in the paused state plus those that left their run loop for
    /// good. Changed only under `state` (so a waiter on `changed` misses no change), read
    /// without it by a pause that spins briefly before sleeping.
    settled: AtomicUsize,
    /// Pauses left that must not spin (see [`SPIN_BACKOFF`]).
    spin_backoff: AtomicU32,
    /// Spins in a row that ran out.
    spin_strikes: AtomicU32,
    state: Mutex<()>,
    changed: Condvar,
}

/// A vCPU: its fd (shared so the controller can read state while the thread is parked)
/// and, once started, its thread.
pub struct Vcpu {
    pub id: u8,
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
    /// The MSRs a save reads (probed once per VM, see `state::saveable_msrs`).
    saved_msrs: Vec<u32>,
    /// The CPUID the vCPU runs with, as given to KVM: part of its saved state, so a
    /// restore on another host gives the guest the CPU it booted on.
    cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency as KVM last reported it (0: not read yet). It changes only
    /// by `KVM_SET_TSC_KHZ`, which only a restore issues (and which resets this), so a
    /// save reads the copy: one ioctl less in every checkpoint.
    tsc_khz: AtomicU32,
    /// KVM copies regs, sregs and events into `kvm_run` at every exit
    /// (`KVM_CAP_SYNC_REGS`): a save reads them there instead of issuing three ioctls.
    sync_regs: bool,
    /// True once the vCPU thread's `KVM_RUN` has returned at least once since the
    /// registers were last set by someone else (a restore): only then does `kvm_run` hold
    /// the vCPU's registers. A vCPU that never ran (a paused restore) is saved by ioctls.
    synced: Arc<AtomicBool>,
}

impl Vcpu {
    pub fn new(vm: &kvm_ioctls::VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(|source| VcpuError::Create { id, source })?;
        let all = (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS) as i32;
        let sync_regs = vm.check_extension_int(kvm_ioctls::Cap::SyncRegs) & all == all;
        Ok(Vcpu {
            id,
            sync_regs,
            synced: Arc::new(AtomicBool::new(false)),
            fd: Arc::new(Mutex::new(fd)),
            thread: None,
            saved_msrs: Vec::new(),
            cpuid: Vec::new(),
            tsc_khz: AtomicU32::new(0),
        })
    }

    /// The MSR indices a save of this vCPU reads.
    pub fn saved_msrs(&self) -> &[u32] {
        &self.saved_msrs
    }

    /// Regs, sregs and events as KVM stored them in `kvm_run` at the vCPU's last exit, if
    /// it has one since its registers were last set (see the field). Only while paused.
    pub(crate) fn synced_regs(&self, fd: &VcpuFd) -> Option<kvm_bindings::kvm_sync_regs> {
        (self.sync_regs && self.synced.load(Ordering::Acquire)).then(|| fd.sync_regs())
    }

    /// The registers were set from outside the run loop (a restore): `kvm_run` no longer
    /// holds them until the vCPU runs again.
    pub(crate) fn regs_set(&self) {
        self.synced.store(false, Ordering::Release);
    }

    /// The cached guest TSC frequency (see the field); 0 until a save has read it.
    pub(crate) fn tsc_khz_cache(&self) -> &AtomicU32 {
        &self.tsc_khz
    }

    /// Sets the MSR indices a save reads: those KVM can save and this vCPU can read.
    pub fn set_saved_msrs(&mut self, indices: Vec<u32>) {
        self.saved_msrs = indices;
    }

    /// Locks the vCPU fd. Only call while the vCPU is paused or not yet started: the
    /// vCPU thread holds this lock while it runs.
    pub fn fd(&self) -> std::sync::MutexGuard<'_, VcpuFd> {
        self.fd.lock().expect("vCPU fd lock poisoned")
    }

    /// Gives a new vCPU the host's supported CPUID less what the guest must not see (a
    /// restored one gets the CPUID of its saved state instead, see [`Vcpu::set_cpuid`]).
    pub fn configure_cpuid(&mut self, kvm: &kvm_ioctls::Kvm, vcpus: u8) -> Result<(), VcpuError> {
        let mut cpuid: CpuId = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    // x2APIC, TSC-deadline, PCID and CX16 cannot be offered under PVM
                    // (design brief §1); the LAPIC runs in xAPIC mode.
                    e.ecx &= !((1 << 21) | (1 << 24) | (1 << 17) | (1 << 13));
                    e.ebx = (e.ebx & 0x00ff_ffff) | ((self.id as u32) << 24);
                    e.ebx = (e.ebx & 0xff00_ffff) | ((vcpus as u32) << 16);
                }
                0xb | 0x1f => e.edx = self.id as u32,
                _ => {}
            }
        }
        self.set_cpuid(cpuid.as_slice())
    }

    /// Sets the vCPU's CPUID (before it first runs) and keeps a copy for its saves: the
    /// CPUID never changes after that, so a save reads the copy, not KVM (one ioctl less
    /// in every checkpoint).
    pub fn set_cpuid(&mut self, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuError> {
        if entries.is_empty() {
            return Err(VcpuError::NoCpuid { id: self.id });
        }
        let cpuid = CpuId::from_entries(entries).map_err(|_| VcpuError::CpuidCount {
            id: self.id,
            entries: entries.len(),
        })?;
        self.fd()
            .set_cpuid2(&cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        self.cpuid = entries.to_vec();
        Ok(())
    }

    /// The CPUID entries this vCPU runs with.
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// Starts the vCPU thread running the guest until `control` says otherwise.
    pub fn start(
        &mut self,
        control: Arc<VcpuControl>,
        pio: Arc<RwLock<Bus>>,
        mmio: Arc<RwLock<Bus>>,
        events: Sender<VmEvent>,
    ) -> Result<(), VcpuError> {
        let fd = self.fd.clone();
        let id = self.id;
        let synced = self.sync_regs.then(|| self.synced.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_loop(id, fd, synced, control, pio, mmio, events))
            .map_err(|source| VcpuError::Spawn { id, source })?;
        self.thread = Some(thread);
        Ok(())
    }

    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            // A vCPU thread that already exited cannot be kicked; that is fine.
            let _ = t.kill(kick_signal());
        }
    }

    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Lets the thread go without waiting for it (see [`VcpuControl::abandon`]).
    pub fn detach(&mut self) {
        self.thread.take();
    }
}

impl VcpuControl {
    /// Asks every vCPU to stop at its next exit, kicks them and waits until all `count`
    /// are parked (or have exited).
    pub fn pause(&self, vcpus: &[Vcpu]) {
        let mut st = self.state.lock().expect("vcpu control poisoned");
        if self.requested.load(Ordering::Acquire) == REQ_STOP {
            return;
        }
        self.requested.store(REQ_PAUSE, Ordering::Release);
        for v in vcpus {
            v.kick();
        }
        // A kicked vCPU parks within ~50 µs; sleeping on the condvar would add a futex
        // wake and a context switch to every checkpoint's stop. The vCPU threads need the
        // lock to park, so spin without it, then sleep.
        drop(st);
        let backoff = self.spin_backoff.load(Ordering::Relaxed);
        if backoff > 0 {
            self.spin_backoff.store(backoff - 1, Ordering::Relaxed);
        } else {
            let spin_until = std::time::Instant::now() + PAUSE_SPIN;
            let mut strikes = 0;
            while self.settled.load(Ordering::Acquire) < vcpus.len() {
                if std::time::Instant::now() >= spin_until {
                    strikes = self.spin_strikes.load(Ordering::Relaxed) + 1;
                    if strikes >= SPIN_STRIKES {
                        self.spin_backoff.store(SPIN_BACKOFF, Ordering::Relaxed);
                        strikes = 0;
                    }
                    break;
                }
                std::hint::spin_loop();
            }
            self.spin_strikes.store(strikes, Ordering::Relaxed);
        }
        st = self.state.lock().expect("vcpu control poisoned");
        while self.settled.load(Ordering::Acquire) < vcpus.len() {
            st = self.changed.wait(st).expect("vcpu control poisoned");
        }
    }

    /// Makes vCPUs not yet started park as soon as they start (restore without running).
    pub fn pause_before_start(&self) {
        let _st = self.state.lock().expect("vcpu control poisoned");
        self.requested.store(REQ_PAUSE, Ordering::Release);
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let _st = self.state.lock().expect("vcpu control poisoned");
        if self.requested.load(Ordering::Acquire) == REQ_PAUSE {
            self.requested.store(REQ_RUN, Ordering::Release);
        }
        self.changed.notify_all();
    }

    /// Stops all vCPUs for good and joins their threads.
    pub fn stop(&self, vcpus: &mut [Vcpu]) {
        {
            let _st = self.state.lock().expect("vcpu control poisoned");
            self.requested.store(REQ_STOP, Ordering::Release);
            self.changed.notify_all();
        }
        for v in vcpus.iter() {
            v.kick();
        }
        for v in vcpus.iter_mut() {
            v.join();
        }
    }

    /// Asks every vCPU to stop, as [`VcpuControl::stop`], but does not wait for them: a vCPU
    /// may be blocked on a page of guest memory that will never be loaded.
    pub fn abandon(&self, vcpus: &mut [Vcpu]) {
        {
            let _st = self.state.lock().expect("vcpu control poisoned");
            self.requested.store(REQ_STOP, Ordering::Release);
            self.changed.notify_all();
        }
        for v in vcpus.iter_mut() {
            v.kick();
            v.detach();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.requested.load(Ordering::Acquire) == REQ_PAUSE
    }
}

fn run_loop(
    id: u8,
    fd: Arc<Mutex<VcpuFd>>,
    synced: Option<Arc<AtomicBool>>,
    control: Arc<VcpuControl>,
    pio: Arc<RwLock<Bus>>,
    mmio: Arc<RwLock<Bus>>,
    events: Sender<VmEvent>,
) {
    let run_ptr: *mut kvm_run = {
        let mut guard = fd.lock().expect("vcpu fd poisoned");
        if synced.is_some() {
            // Every exit, including the kick's EINTR and the immediate exit that completes
            // an MMIO/PIO, stores these into `kvm_run` (KVM's `store_regs` on the way out).
            guard.set_sync_valid_reg(SyncReg::Register);
            guard.set_sync_valid_reg(SyncReg::SystemRegister);
            guard.set_sync_valid_reg(SyncReg::VcpuEvents);
        }
        guard.get_kvm_run()
    };
    // Set after the first `KVM_RUN` returns; every later one refreshes `kvm_run` too.
    let mark_synced = || {
        if let Some(s) = &synced {
            s.store(true, Ordering::Release);
        }
    };
    KVM_RUN.with(|r| r.set(run_ptr));
    // Whether the last exit was MMIO/PIO: KVM consumes its result (a port read's value)
    // only on the next KVM_RUN. After an `EINTR` (the kick) nothing is pending.
    let mut io_pending = false;
    let outcome = loop {
        if control.requested.load(Ordering::Acquire) != REQ_RUN {
            // Park without holding the fd lock so the controller can capture state.
            let go_on = {
                let mut guard = fd.lock().expect("vcpu fd poisoned");
                if io_pending {
                    // Complete the MMIO/PIO exit without running guest code, so state
                    // captured while parked is consistent. Skipped after a kick: one
                    // KVM_RUN less in every checkpoint's stop (~8 µs under PVM).
                    guard.set_kvm_immediate_exit(1);
                    let _ = guard.run();
                    guard.set_kvm_immediate_exit(0);
                    mark_synced();
                    io_pending = false;
                }
                drop(guard);
                park_unlocked(id, &control)
            };
            if !go_on {
                break None;
            }
            continue;
        }
        let mut guard = fd.lock().expect("vcpu fd poisoned");
        io_pending = false;
        let ran = guard.run();
        mark_synced();
        let exit = match ran {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                guard.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => {
                break Some(VmEvent::VcpuFailed {
                    vcpu: id,
                    reason: format!("KVM_RUN: {e}"),
                })
            }
        };
        io_pending = matches!(
            exit,
            VcpuExit::IoOut(..)
                | VcpuExit::IoIn(..)
                | VcpuExit::MmioWrite(..)
                | VcpuExit::MmioRead(..)
        );
        match exit {
            VcpuExit::IoOut(port, data) => {
                pio.read()
                    .expect("pio bus poisoned")
                    .write(port as u64, data);
            }
            VcpuExit::IoIn(port, data) => {
                pio.read()
                    .expect("pio bus poisoned")
                    .read(port as u64, data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !mmio.read().expect("mmio bus poisoned").write(addr, data) {
                    tracing::debug!(
                        vcpu = id,
                        addr = format_args!("{addr:#x}"),
                        "write to unbacked MMIO"
                    );
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                if !mmio.read().expect("mmio bus poisoned").read(addr, data) {
                    tracing::debug!(
                        vcpu = id,
                        addr = format_args!("{addr:#x}"),
                        "read of unbacked MMIO"
                    );
                }
            }
            VcpuExit::Hlt => break Some(VmEvent::GuestHalted { vcpu: id }),
            VcpuExit::Shutdown => break Some(VmEvent::GuestReset { vcpu: id }),
            VcpuExit::SystemEvent(kind, _) => {
                break Some(VmEvent::GuestReset { vcpu: id }).filter(|_| kind != 0)
            }
            VcpuExit::InternalError => {
                let rip = guard.get_regs().map(|r| r.rip).unwrap_or(0);
                break Some(VmEvent::VcpuFailed {
                    vcpu: id,
                    reason: format!("KVM internal error (emulation failure?) at rip {rip:#x}"),
                });
            }
            VcpuExit::FailEntry(reason, cpu) => {
                break Some(VmEvent::VcpuFailed {
                    vcpu: id,
                    reason: format!("VM entry failed: hardware reason {reason:#x} on cpu {cpu}"),
                })
            }
            other => {
                break Some(VmEvent::VcpuFailed {
                    vcpu: id,
                    reason: format!("unhandled exit {other:?}"),
                })
            }
        }
    };
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    {
        let _st = control.state.lock().expect("vcpu control poisoned");
        control.settled.fetch_add(1, Ordering::Release);
        control.changed.notify_all();
    }
    if let Some(ev) = outcome {
        let _ = events.send(ev);
    }
}

/// Parks until resumed (true) or stopped (false); the fd lock is not held.
fn park_unlocked(id: u8, control: &VcpuControl) -> bool {
    let mut st = control.state.lock().expect("vcpu control poisoned");
    control.settled.fetch_add(1, Ordering::Release);
    control.changed.notify_all();
    tracing::trace!(vcpu = id, "parked");
    loop {
        match control.requested.load(Ordering::Acquire) {
            REQ_PAUSE => st = control.changed.wait(st).expect("vcpu control poisoned"),
            req => {
                control.settled.fetch_sub(1, Ordering::Release);
                return req == REQ_RUN;
            }
        }
    }
}
