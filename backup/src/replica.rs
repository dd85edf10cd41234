//! The replica a backup keeps, the VM it is pinned to, and whether this host has room for it.

use std::path::{Path, PathBuf};

use twin_vmm::memory::Memory;
use twin_vmm::MachineState;
use twin_wire::VmId;

/// The replica: guest memory, the disks, plus the last committed state.
pub struct Replica {
    pub memory: ReplicaMemory,
    /// The disk replicas, in order: exactly the disks as of the last committed epoch
    /// (writes of an epoch are applied, and flushed, only when it commits).
    pub disks: Vec<ReplicaDisk>,
    pub vm_id: VmId,
    pub generation: u64,
    /// The last committed epoch and its machine state: a failover image only while set.
    pub committed: Option<(u64, MachineState)>,
    pub mac: [u8; 6],
    /// What the primary's guest received after the last committed epoch.
    pub inbound: crate::inbound::InboundLog,
}

impl Replica {
    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed.as_ref().map(|(e, _)| *e)
    }
}

/// Where the replica's memory is kept.
pub enum ReplicaMemory {
    /// A memfd, the kind a VM runs on: a failover maps it as the VM's RAM, nothing loaded
    /// (fastest; costs the backup the VM's RAM).
    Ram(Memory),
    /// On disk, under `--replica-dir` (see `twin-store`): a failover restores it lazily,
    /// working set first.
    Store(twin_store::Store),
}

/// A write to the replica's memory failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryWriteError {
    #[error("page {0} is outside the replica's memory")]
    Range(u64),
    #[error("cannot zero replica pages")]
    Zero(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] twin_store::StoreError),
}

impl ReplicaMemory {
    pub fn size(&self) -> u64 {
        match self {
            Self::Ram(m) => m.size(),
            Self::Store(s) => s.mem_size(),
        }
    }

    /// Writes page `index` (range checked by the caller's phase or assembler; checked
    /// again here) as written by `epoch` (0: the initial sync).
    pub fn write_page(&self, index: u64, data: &[u8], epoch: u64) -> Result<(), MemoryWriteError> {
        match self {
            Self::Ram(m) => m
                .write_page(index, data)
                .then_some(())
                .ok_or(MemoryWriteError::Range(index)),
            Self::Store(s) => Ok(s.write_page(index, data, epoch)?),
        }
    }

    pub fn zero_pages(&self, indices: &[u64]) -> Result<(), MemoryWriteError> {
        match self {
            Self::Ram(m) => match m.zero_pages(indices) {
                Ok(true) => Ok(()),
                Ok(false) => Err(MemoryWriteError::Range(
                    indices.iter().copied().max().unwrap_or(0),
                )),
                Err(e) => Err(MemoryWriteError::Zero(e)),
            },
            Self::Store(s) => Ok(s.zero_pages(indices)?),
        }
    }

    /// Reads page `index` as of the last committed epoch (a delta's base; verified
    /// against its checksum in a store).
    pub fn read_committed_page(&self, index: u64, buf: &mut [u8]) -> Result<(), MemoryWriteError> {
        match self {
            Self::Ram(m) => m
                .read_page(
                    usize::try_from(index).map_err(|_| MemoryWriteError::Range(index))?,
                    buf,
                )
                .map_err(|_| MemoryWriteError::Range(index)),
            Self::Store(s) => Ok(s.read_page(index, buf)?),
        }
    }
}

/// The one way an epoch's delta pages read the replica: the page as of the last committed
/// epoch (see [`twin_wire::BasePages`] for why that is what the primary deltas against).
/// The replica's memory is written only when an epoch is applied, never while one is
/// assembled, so its contents are the committed ones here.
impl twin_wire::BasePages for Replica {
    fn read_committed_page(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.memory
            .read_committed_page(index, buf)
            .map_err(std::io::Error::other)
    }
}

/// One disk's replica: a sparse file under `--replica-dir`.
pub struct ReplicaDisk {
    pub path: PathBuf,
    pub file: std::fs::File,
    pub capacity: u64,
}

/// Why a disk replica cannot be kept.
#[derive(Debug, thiserror::Error)]
pub enum DiskReplicaError {
    #[error("the VM has {0} disks and this backup has no --replica-dir to hold their replicas")]
    NoDir(usize),
    #[error("{op} the disk replica {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ReplicaDisk {
    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> DiskReplicaError + '_ {
        move |source| DiskReplicaError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Writes sync data at `offset` (range checked by the session's phase).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DiskReplicaError> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, offset)
            .map_err(self.io("writing"))
    }

    /// Applies one committed write (range checked by the assembler).
    pub fn apply(&self, e: &twin_wire::DiskExtent) -> Result<(), DiskReplicaError> {
        if e.data.is_empty() {
            twin_vmm::devices::virtio::blk::disk::zero_range(&self.file, e.offset, e.zero_len)
                .map_err(self.io("zeroing a range of"))
        } else {
            self.write(e.offset, &e.data)
        }
    }

    /// Makes what was written durable.
    pub fn flush(&self) -> Result<(), DiskReplicaError> {
        self.file.sync_data().map_err(self.io("flushing"))
    }
}

/// Creates (or empties) the replicas of disks of these sizes: `DIR/disk-<i>.img`, sparse,
/// all zeroes until the sync writes them.
pub fn create_disks(
    dir: Option<&Path>,
    sizes: &[u64],
) -> Result<Vec<ReplicaDisk>, DiskReplicaError> {
    if sizes.is_empty() {
        return Ok(Vec::new());
    }
    let dir = dir.ok_or(DiskReplicaError::NoDir(sizes.len()))?;
    std::fs::create_dir_all(dir).map_err(|source| DiskReplicaError::Io {
        op: "creating the directory of",
        path: dir.to_path_buf(),
        source,
    })?;
    sizes
        .iter()
        .enumerate()
        .map(|(i, &capacity)| {
            let path = dir.join(format!("disk-{i}.img"));
            let io = |op| {
                let path = path.clone();
                move |source| DiskReplicaError::Io { op, path, source }
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io("creating"))?;
            file.set_len(capacity).map_err(io("sizing"))?;
            file.sync_all().map_err(io("syncing"))?;
            Ok(ReplicaDisk {
                path,
                file,
                capacity,
            })
        })
        .collect()
}

/// The VM a backup is pinned to once a session of it committed: no other VM may replace
/// the replica, and only a newer generation of this one may start a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    pub vm_id: VmId,
    /// The lowest generation a new session may have (one above the last accepted).
    pub min_generation: u64,
}

/// Memory the backup process needs beside the replica: the receive buffer and one epoch
/// being assembled at a typical rate, the heap, the thread stacks.
pub const OVERHEAD: u64 = 48 << 20;

/// This host cannot hold a replica.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    #[error(
        "a replica of {need_mib} MiB (+{} MiB overhead) does not fit: {what} allows {room_mib} MiB more",
        OVERHEAD >> 20
    )]
    TooSmall {
        need_mib: u64,
        room_mib: u64,
        what: String,
    },
}

/// Memory this process may still use: the least of the host's available memory and its
/// memory cgroup's room; `None` if neither can be read.
pub fn room() -> Option<u64> {
    let cg = cgroup_room().map(|(r, _)| r);
    match (mem_available(), cg) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// Checks that `size` bytes of replica (plus [`OVERHEAD`]) fit in what this process may
/// still use: the host's available memory and the memory cgroup's limit (v1 or v2). A
/// replica's memfd grows as pages arrive, so without this check a backup whose limit is too
/// low is OOM-killed in the middle of the initial sync instead of refusing at the start.
pub fn check_room(size: u64) -> Result<(), RoomError> {
    let need = size.saturating_add(OVERHEAD);
    let mut limits = Vec::new();
    if let Some(avail) = mem_available() {
        limits.push((avail, "the host's available memory".to_string()));
    }
    if let Some((room, cg)) = cgroup_room() {
        limits.push((room, format!("the memory cgroup {}", cg.display())));
    }
    match limits.into_iter().min_by_key(|(room, _)| *room) {
        Some((room, what)) if room < need => Err(RoomError::TooSmall {
            need_mib: size >> 20,
            room_mib: room >> 20,
            what,
        }),
        _ => Ok(()),
    }
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Room left under this process's memory cgroup limit, and the cgroup's directory.
fn cgroup_room() -> Option<(u64, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    parse_cgroups(&text)
        .into_iter()
        .find_map(|(dir, limit_file, usage_file)| {
            let limit = read_limit(&dir.join(limit_file))?;
            let usage = read_u64(&dir.join(usage_file)).unwrap_or(0);
            Some((limit.saturating_sub(usage), dir))
        })
}

/// Where cgroup file systems are mounted: this mount namespace's `/sys/fs/cgroup`, then the
/// host's as PID 1 sees it. `ip netns exec` (a way to run the backup in a network namespace)
/// mounts a fresh sysfs for the namespace, without the cgroup mounts under it, yet the
/// process is still subject to its cgroup's limit.
const CGROUP_ROOTS: [&str; 2] = ["/sys/fs/cgroup", "/proc/1/root/sys/fs/cgroup"];

/// The (directory, limit file, usage file) of each memory cgroup in `/proc/self/cgroup`:
/// v1 `N:memory:/path` under `<root>/memory`, v2 `0::/path` under `<root>/unified` or
/// `<root>` itself, for each root of [`CGROUP_ROOTS`].
fn parse_cgroups(text: &str) -> Vec<(PathBuf, &'static str, &'static str)> {
    let mut out = Vec::new();
    for root in CGROUP_ROOTS {
        out.extend(parse_cgroups_under(text, Path::new(root)));
    }
    out
}

fn parse_cgroups_under(text: &str, root: &Path) -> Vec<(PathBuf, &'static str, &'static str)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            out.push((
                root.join("memory").join(rel),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ));
        } else if controllers.is_empty() {
            for v2 in [root.join("unified"), root.to_path_buf()] {
                out.push((v2.join(rel), "memory.max", "memory.current"));
            }
        }
    }
    out
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// A limit file's value; `max` (v2) or the v1 "unlimited" sentinel are no limit.
fn read_limit(p: &Path) -> Option<u64> {
    let t = std::fs::read_to_string(p).ok()?;
    let v: u64 = t.trim().parse().ok()?;
    // cgroup v1 reports "no limit" as the largest page-aligned i64.
    (v < (1u64 << 62)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_lines_of_both_versions() {
        let text = "12:memory:/twin/backup\n11:cpu,cpuacct:/\n0::/user.slice\n";
        let got = parse_cgroups(text);
        assert_eq!(
            got[0],
            (
                PathBuf::from("/sys/fs/cgroup/memory/twin/backup"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes"
            )
        );
        assert!(got.iter().any(
            |(d, l, _)| d == Path::new("/sys/fs/cgroup/unified/user.slice") && *l == "memory.max"
        ));
        assert!(got
            .iter()
            .any(|(d, _, _)| d == Path::new("/proc/1/root/sys/fs/cgroup/memory/twin/backup")));
        assert_eq!(got.len(), 6);
    }

    #[test]
    fn a_replica_larger_than_the_host_is_refused_and_a_small_one_fits() {
        let e = check_room(1 << 50).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        check_room(2 << 20).unwrap();
    }
}
