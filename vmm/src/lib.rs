//! KVM virtual machine monitor: guest memory, vCPUs, platform and virtio devices, state
//! capture.
//!
//! [`Vmm`] owns one VM. It is built from a [`VmConfig`] or restored from a
//! [`MachineState`] (`builder`), started, and then either runs until the guest powers off
//! or is controlled by the caller: paused and resumed (here), checkpointed
//! ([`checkpoint`]), snapshotted ([`snapshot`]).

pub mod boot;
mod builder;
pub mod checkpoint;
pub mod container;
pub mod dirty;
pub mod hot;
pub mod layout;
pub mod lazy;
pub mod memory;
pub mod power;
pub mod snapshot;
pub mod state;
pub mod uffd;
pub mod vcpu;
pub mod vm;

/// The devices, a crate of their own (`twin-devices`); the VMM builds, runs and saves them.
pub use twin_devices as devices;

use std::net::Ipv4Addr;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};

use crate::boot::BootError;
use crate::devices::bus::{Bus, BusError};
use crate::devices::pci::{PciError, PciRoot};
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::devices::tap::{Tap, TapError};
use crate::devices::virtio::blk::disk::{DiskError, DiskImage, WriteLog};
use crate::devices::virtio::blk::{BlkError, BlkWorker, VirtioBlk};
use crate::devices::virtio::net::{NetError, NetSink, NetWorker, VirtioNet};
use crate::devices::Pausable;
use crate::dirty::DirtyTracker;
use crate::memory::{Memory, MemoryError};
use crate::vcpu::{Vcpu, VcpuControl, VcpuError};
use crate::vm::{Vm, VmError};

pub use crate::checkpoint::{Checkpoint, CheckpointTimings, DeviceError, Frozen, PreCopy};
pub use crate::dirty::TrackingSpan;
pub use crate::snapshot::{SnapshotError, SnapshotOptions, SnapshotReport};
pub use twin_devices::Persist;

/// Something that happened to a running VM, reported to whoever drives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote its exit status to the power-off port.
    PowerOff(u8),
    /// Triple fault or reset request.
    GuestReset { vcpu: u8 },
    /// `hlt` exited to user space (cannot happen with the in-kernel irqchip).
    GuestHalted { vcpu: u8 },
    /// `KVM_RUN` failed or returned an exit the VMM cannot handle.
    VcpuFailed { vcpu: u8, reason: String },
    /// A device worker failed.
    DeviceFailed(String),
    /// A lazy restore could not load a page of guest memory: the VM cannot go on (a
    /// vCPU may be waiting for that page).
    MemoryLoadFailed(String),
    /// The process got a termination signal.
    Signal(i32),
}

/// Network configuration of the VM's NIC.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

/// A disk of the VM: a raw image file (`--disk PATH[,readonly]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: std::path::PathBuf,
    pub read_only: bool,
}

/// What the guest sees of a disk: part of the machine's configuration, so a restored VM
/// must be given an image of the same size and mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    /// Bytes (a multiple of 512).
    pub capacity: u64,
    pub read_only: bool,
}

/// What to build.
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u8,
    pub net: Option<NetConfig>,
    /// Disks in order: disk 0 is the first virtio-blk device on the PCI bus.
    pub disks: Vec<DiskConfig>,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub guest_args: String,
    pub console: ConsoleOut,
    /// The built-in guest's ELF image.
    pub guest_elf: std::borrow::Cow<'static, [u8]>,
}

/// Guest-visible configuration a restored VM must be rebuilt with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineConfig {
    pub mem_size: u64,
    pub vcpus: u8,
    pub mac: Option<[u8; 6]>,
    /// The guest's address when the host knows it (built-in guest), for the gratuitous
    /// ARP a restored VM announces itself with.
    pub ip: Option<Ipv4Addr>,
    /// The disks, in order.
    pub disks: Vec<DiskSpec>,
}

/// State of every device, one field per device, each from that device's
/// [`Persist::save`]: a device that cannot save makes the whole capture fail (it is never
/// left out).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DeviceStates {
    pub serial: devices::serial::SerialDeviceState,
    pub pci: devices::pci::PciRootState,
    pub net: Option<devices::virtio::net::VirtioNetState>,
    /// One per disk, in order.
    pub disks: Vec<devices::virtio::blk::VirtioBlkState>,
}

/// The whole VM except guest memory: what a checkpoint or snapshot carries beside pages.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub config: MachineConfig,
    /// Saved before KVM state (see `Vmm::capture_state`).
    pub devices: DeviceStates,
    pub vm: state::VmState,
    pub vcpus: Vec<state::VcpuState>,
}

impl MachineState {
    pub fn encode(&self) -> Result<Vec<u8>, container::ContainerError> {
        container::encode(container::Kind::MachineState, self)
    }

    pub fn decode(data: &[u8]) -> Result<Self, container::ContainerError> {
        container::decode(
            data,
            container::Kind::MachineState,
            container::DEFAULT_MAX_PAYLOAD,
        )
    }
}

/// Host resources a restored VM gets from its caller, not from the saved state.
pub struct HostResources {
    /// The TAP for the NIC, already open (a backup holds its TAP from start-up so the
    /// bridge port is forwarding long before a takeover).
    pub tap: Option<Tap>,
    pub console: ConsoleOut,
    /// The images the disks run on, in order (as many as the saved state has disks).
    pub disks: Vec<Arc<DiskImage>>,
}

/// `e` and its causes on one line, `outer: cause: root cause`.
pub fn describe_error(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Indices of the set bits of a page bitmap, ascending.
pub fn bitmap_pages(bitmap: &[u64]) -> impl Iterator<Item = usize> + '_ {
    // Zero words skipped before the per-word iterator is built: a big guest's bitmap is
    // mostly zeros (65536 words at 16 GiB, a few dozen set per epoch).
    bitmap
        .iter()
        .enumerate()
        .filter(|(_, &bits)| bits != 0)
        .flat_map(|(w, &bits)| {
            let mut b = bits;
            std::iter::from_fn(move || {
                (b != 0).then(|| {
                    let i = b.trailing_zeros() as usize;
                    b &= b - 1;
                    w * 64 + i
                })
            })
        })
}

/// Runs of consecutive set bits of a page bitmap, ascending: `(first page, page count)`.
pub fn bitmap_runs(bitmap: &[u64]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut pages = bitmap_pages(bitmap).peekable();
    std::iter::from_fn(move || {
        let first = pages.next()?;
        let mut count = 1;
        while pages.next_if_eq(&(first + count)).is_some() {
            count += 1;
        }
        Some((first, count))
    })
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("KVM VM")]
    Vm(#[from] VmError),
    #[error("vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("loading the built-in guest")]
    Boot(#[from] BootError),
    #[error("placing a device on a bus")]
    Bus(#[from] BusError),
    #[error("--vcpus must be between 1 and 64, not {0}")]
    VcpuCount(u8),
    #[error("creating an eventfd failed")]
    EventFd(#[source] std::io::Error),
    #[error("reading the TSC frequency from KVM failed")]
    TscKhz(#[source] kvm_ioctls::Error),
    #[error("initialising the LAPIC of vCPU {vcpu} failed")]
    Lapic {
        vcpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("opening the NIC's TAP")]
    Tap(#[source] TapError),
    #[error("network device")]
    Net(#[source] NetError),
    #[error("placing a device on the PCI bus")]
    Pci(#[source] PciError),
    #[error("capturing or restoring KVM state")]
    State(#[from] state::StateError),
    #[error("saving the devices")]
    SaveDevices(#[source] DeviceError),
    #[error("restoring the devices")]
    RestoreDevices(#[source] DeviceError),
    #[error("the saved state has a network device but no TAP was given for it")]
    NoTap,
    #[error("a VM's network identity can only be changed before it starts")]
    IdentityAfterStart,
    #[error("the VM has no network device to give a new identity")]
    IdentityWithoutNic,
    #[error("the saved state has {saved} vCPUs, but {expected} were configured")]
    VcpuMismatch { saved: usize, expected: u8 },
    #[error("opening disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: DiskError,
    },
    #[error("disk {index}")]
    Blk {
        index: usize,
        #[source]
        source: BlkError,
    },
    #[error("the VM has {saved} disks, but {given} images were given for them")]
    DiskCount { saved: usize, given: usize },
}

/// One VM and its devices.
pub struct Vmm {
    // Field order is drop order: threads and devices before the VM, the VM before memory.
    vcpus: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    pio: Arc<RwLock<Bus>>,
    mmio: Arc<RwLock<Bus>>,
    serial: Arc<Mutex<SerialDevice>>,
    pci: Arc<Mutex<PciRoot>>,
    net: Option<NetDevice>,
    disks: Vec<DiskDevice>,
    events_tx: Sender<VmEvent>,
    events_rx: Mutex<Receiver<VmEvent>>,
    /// The lazy restore loading this VM's memory, while it runs (see [`lazy`]); dropped
    /// before the memory it holds a view of.
    loader: Option<lazy::Loader>,
    vm: Vm,
    memory: Memory,
    /// Generations of dirty tracking, and the lock that makes a harvest one step.
    dirty: DirtyTracker,
    config: MachineConfig,
    /// The layer the next incremental snapshot is taken on (see [`snapshot`]).
    last_snapshot: Option<snapshot::LastLayer>,
    started: bool,
}

/// The NIC: the device, its TAP and, while running, its RX worker.
struct NetDevice {
    dev: Arc<Mutex<VirtioNet>>,
    tap: Arc<Tap>,
    worker: Option<NetWorker>,
}

/// A disk: the device, its image, the log of its writes and, while running, its worker.
struct DiskDevice {
    dev: Arc<Mutex<VirtioBlk>>,
    image: Arc<DiskImage>,
    log: Arc<WriteLog>,
    worker: Option<BlkWorker>,
}

impl Vmm {
    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if let Some(net) = &mut self.net {
            net.worker =
                Some(NetWorker::start(net.dev.clone(), net.tap.clone()).map_err(VmmError::Net)?);
        }
        for (index, d) in self.disks.iter_mut().enumerate() {
            if d.worker.is_none() {
                let mem = self.memory.guest_memory().clone();
                d.worker = Some(
                    BlkWorker::start(d.dev.clone(), mem)
                        .map_err(|source| VmmError::Blk { index, source })?,
                );
            }
        }
        for v in &mut self.vcpus {
            v.start(
                self.control.clone(),
                self.pio.clone(),
                self.mmio.clone(),
                self.events_tx.clone(),
            )?;
        }
        self.started = true;
        Ok(())
    }

    /// Like [`Vmm::start`], but the vCPUs park before running any guest code and the devices
    /// are paused; the VM runs on [`Vmm::resume_devices`] + [`Vmm::resume`].
    pub fn start_paused(&mut self) -> Result<(), VmmError> {
        self.pause_devices()?;
        self.control.pause_before_start();
        self.start()?;
        self.pause();
        Ok(())
    }

    /// The next event from vCPUs and devices, waiting at most `timeout`; the driver of the
    /// VM calls this from one thread.
    pub fn next_event(
        &self,
        timeout: std::time::Duration,
    ) -> Result<VmEvent, std::sync::mpsc::RecvTimeoutError> {
        self.events_rx
            .lock()
            .expect("event lock poisoned")
            .recv_timeout(timeout)
    }

    /// A sender into the event channel (for signal forwarding).
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// Stops every vCPU at its next exit and waits until all are parked.
    pub fn pause(&self) {
        self.control.pause(&self.vcpus);
    }

    pub fn resume(&self) {
        self.control.resume();
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Pauses every device that works on its own (the NIC's RX): with the vCPUs paused too,
    /// the VM stands fully still (a VM stopped after a snapshot, or restored paused).
    pub fn pause_devices(&self) -> Result<(), VmmError> {
        if let Some(n) = &self.net {
            n.dev
                .lock()
                .expect("net device lock poisoned")
                .pause()
                .map_err(VmmError::Net)?;
        }
        for (index, d) in self.disks.iter().enumerate() {
            d.dev
                .lock()
                .expect("disk device lock poisoned")
                .pause()
                .map_err(|source| VmmError::Blk { index, source })?;
        }
        Ok(())
    }

    /// Undoes [`Vmm::pause_devices`]. A device that fails to resume may stay idle until the
    /// guest next notifies it.
    pub fn resume_devices(&self) -> Result<(), VmmError> {
        for (index, d) in self.disks.iter().enumerate() {
            d.dev
                .lock()
                .expect("disk device lock poisoned")
                .resume()
                .map_err(|source| VmmError::Blk { index, source })?;
        }
        if let Some(n) = &self.net {
            n.dev
                .lock()
                .expect("net device lock poisoned")
                .resume()
                .map_err(VmmError::Net)?;
        }
        Ok(())
    }

    /// The disks' images, in order.
    pub fn disk_images(&self) -> Vec<Arc<DiskImage>> {
        self.disks.iter().map(|d| d.image.clone()).collect()
    }

    /// The logs of the disks' writes, in order.
    pub fn disk_logs(&self) -> Vec<Arc<WriteLog>> {
        self.disks.iter().map(|d| d.log.clone()).collect()
    }

    /// Starts journaling every disk's writes: each checkpoint from now on carries the
    /// writes that reached the images since the previous one ([`Checkpoint::disk_writes`]).
    pub fn start_disk_journal(&self) {
        for d in &self.disks {
            d.log.start_journal();
        }
    }

    /// Stops journaling (the journals' contents are dropped).
    pub fn stop_disk_journal(&self) {
        for d in &self.disks {
            d.log.stop_journal();
        }
    }

    /// Host-side counters of disk `index`.
    pub fn disk_stats(&self, index: usize) -> Option<devices::virtio::blk::BlkStats> {
        let d = self.disks.get(index)?;
        Some(
            d.dev
                .lock()
                .expect("disk device lock poisoned")
                .device()
                .stats(),
        )
    }

    /// Replaces where the guest's transmitted frames go (the output-commit buffer);
    /// returns the previous sink. No-op without a NIC.
    pub fn set_net_sink(&self, sink: Box<dyn NetSink>) -> Option<Box<dyn NetSink>> {
        let net = self.net.as_ref()?;
        Some(
            net.dev
                .lock()
                .expect("net device lock poisoned")
                .device_mut()
                .set_sink(sink),
        )
    }

    /// Raises the NIC's configuration interrupt without changing its configuration: "the
    /// VM may have moved" (after a failover restore). The built-in guest announces itself
    /// and retransmits whatever its peers have not acknowledged at once; a Linux driver
    /// rereads the status, finds nothing changed and does nothing (proper
    /// `VIRTIO_NET_F_GUEST_ANNOUNCE` also needs a control queue, which this device lacks).
    /// No-op without a NIC.
    pub fn notify_network_moved(&self) {
        if let Some(net) = &self.net {
            net.dev
                .lock()
                .expect("net device lock poisoned")
                .config_changed();
        }
    }

    /// Gives the restored guest a new network identity (a clone of a snapshot): the NIC's
    /// configured MAC, the machine's configuration (what the host announces and a later
    /// snapshot records) and the guest's identity record ([`boot::write_identity`]). The
    /// guest takes it at the next configuration interrupt, which
    /// [`Vmm::notify_network_moved`] raises. Only before the VM starts (no vCPU may run
    /// while the record is written); needs a NIC.
    pub fn set_network_identity(&mut self, id: &boot::NetIdentity) -> Result<u32, VmmError> {
        if self.started {
            return Err(VmmError::IdentityAfterStart);
        }
        let net = self.net.as_ref().ok_or(VmmError::IdentityWithoutNic)?;
        let seq = boot::write_identity(self.memory.guest_memory(), id)?;
        net.dev
            .lock()
            .expect("net device lock poisoned")
            .device_mut()
            .set_mac(id.mac);
        self.config.mac = Some(id.mac);
        self.config.ip = Some(id.ip);
        Ok(seq)
    }

    /// Calls `tap` with every frame delivered into the guest from now on (see
    /// [`devices::virtio::net::Net::set_rx_tap`]). No-op without a NIC.
    pub fn set_net_rx_tap(&self, tap: Option<devices::virtio::net::RxTap>) {
        if let Some(net) = &self.net {
            net.dev
                .lock()
                .expect("net device lock poisoned")
                .device_mut()
                .set_rx_tap(tap);
        }
    }

    /// Delivers Ethernet frames into the guest ahead of anything from the TAP (a backup
    /// replaying what its primary's guest received after the last committed checkpoint).
    /// No-op without a NIC.
    pub fn inject_frames(&self, frames: Vec<Vec<u8>>) {
        if let Some(net) = &self.net {
            net.dev
                .lock()
                .expect("net device lock poisoned")
                .device_mut()
                .inject(frames);
        }
    }

    /// The NIC's TAP, for frames the host sends on the guest's behalf (gratuitous ARP).
    pub fn tap(&self) -> Option<Arc<Tap>> {
        self.net.as_ref().map(|n| n.tap.clone())
    }

    /// Why a device failed for good (the NIC's TAP disappeared), if one has: the VM can no
    /// longer do its job, and its driver should stop it (or hand it over to the backup).
    pub fn device_failure(&self) -> Option<String> {
        if self.started {
            for (i, d) in self.disks.iter().enumerate() {
                if d.worker.as_ref().is_some_and(|w| !w.is_running()) {
                    return Some(format!("the worker of disk {i} stopped"));
                }
            }
        }
        self.net.as_ref()?.worker.as_ref()?.failure()
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Hands the VM the lazy restore loading its memory: a failure of the load stops the
    /// VM ([`VmEvent::MemoryLoadFailed`]), and whatever needs all of memory waits for it.
    pub fn attach_loader(&mut self, loader: lazy::Loader) {
        loader.report_failures_to(self.events_tx.clone());
        self.loader = Some(loader);
    }

    /// Gives up loading this VM's memory after a failure ([`VmEvent::MemoryLoadFailed`]):
    /// see [`lazy::Loader::abort`]. The VM cannot run on after this.
    pub fn abort_memory_load(&self) {
        if let Some(l) = &self.loader {
            l.abort();
        }
    }

    /// How far the lazy restore of this VM's memory is, if it was restored lazily.
    pub fn load_progress(&self) -> Option<lazy::LoadProgress> {
        self.loader.as_ref().map(|l| l.progress())
    }

    /// The pages the guest touched first during its lazy restore (see
    /// [`lazy::Loader::first_touches`]).
    pub fn first_touches(&self) -> Option<Vec<u32>> {
        self.loader.as_ref().map(|l| l.first_touches())
    }

    /// Stops vCPUs and device workers; the VM can be dropped after this.
    pub fn shutdown(&mut self) {
        if self
            .loader
            .as_ref()
            .is_some_and(|l| l.progress().error.is_some())
            && self.started
        {
            // A vCPU may wait forever for a page the failed loader will not serve: it
            // cannot be joined. The process ends with them (its exit kills them); the
            // uffd stays open so that no such page is ever filled with zeroes.
            tracing::error!("guest memory failed to load: the vCPUs are left where they wait");
            self.control.abandon(&mut self.vcpus);
            self.started = false;
        }
        if self.started {
            self.control.stop(&mut self.vcpus);
            self.started = false;
        }
        if let Some(w) = self.net.as_mut().and_then(|n| n.worker.take()) {
            if let Err(e) = w.stop() {
                tracing::warn!("network worker ended with an error: {e}");
            }
        }
        for (i, d) in self.disks.iter_mut().enumerate() {
            if let Some(w) = d.worker.take() {
                if let Err(e) = w.stop() {
                    tracing::warn!("the worker of disk {i} ended with an error: {e}");
                }
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_pages_and_runs() {
        let mut bm = vec![0u64; 3];
        for p in [0, 1, 2, 63, 64, 65, 100, 190, 191] {
            bm[p / 64] |= 1 << (p % 64);
        }
        let pages: Vec<usize> = bitmap_pages(&bm).collect();
        assert_eq!(pages, vec![0, 1, 2, 63, 64, 65, 100, 190, 191]);
        let runs: Vec<(usize, usize)> = bitmap_runs(&bm).collect();
        assert_eq!(runs, vec![(0, 3), (63, 3), (100, 1), (190, 2)]);
        assert_eq!(bitmap_runs(&[0, 0]).count(), 0);
        assert_eq!(
            bitmap_runs(&[u64::MAX, u64::MAX]).collect::<Vec<_>>(),
            vec![(0, 128)]
        );
    }
}
