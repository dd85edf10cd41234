//! Capture and restore of KVM state: per vCPU and per VM, as [`Persist`] of [`Vcpu`] and
//! [`Vm`].
//!
//! What is captured is everything KVM holds for a guest: registers, special registers,
//! XSAVE (x87/SSE/AVX, which also covers the legacy FPU image), XCRs, the MSRs KVM reports
//! as saveable and that this host can read, LAPIC, MP state, pending events, debug
//! registers; per VM the PIC pair, IOAPIC, PIT and the KVM clock. Device state is captured
//! separately and before this (see `Vmm::capture_state`), so an interrupt a device raises
//! while it is quiesced is already in the LAPIC/IOAPIC state saved here.
//!
//! The host resource a KVM state is restored into is the KVM object itself: a [`Vm`] or a
//! [`Vcpu`] freshly created on this host is the `ConstructorArgs`, and `restore` returns it
//! with the state loaded. Creating them is the builder's (the VM before the devices that
//! signal it, the vCPUs right after it), loading state comes after the devices, in the
//! order KVM needs.

use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_sync_regs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::Vm;
use twin_devices::Persist;

/// Errors capturing or restoring KVM state; `op` names the ioctl.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM restored only {done} of {total} MSRs (first refused: {first_refused:#x})")]
    PartialMsrs {
        done: usize,
        total: usize,
        first_refused: u32,
    },
    #[error("too many MSRs for one KVM call")]
    MsrList,
    #[error("the saved state of vCPU {saved} was given to vCPU {vcpu}")]
    VcpuId { saved: u8, vcpu: u8 },
    #[error("setting the saved CPUID")]
    Cpuid(#[source] VcpuError),
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl { op, source }
}

/// Everything KVM holds for one vCPU, and the CPUID it runs with.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    /// The CPUID entries the vCPU was given when it was first built (on the host where the
    /// guest booted). A restore sets these, not this host's: the guest keeps the CPU it
    /// sized its state (XSAVE layout, feature choices) for, whichever host it moves to.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub tsc_khz: u32,
}

/// Everything KVM holds for the VM itself.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// MSR indices KVM says are saveable and that this vCPU can actually read. Probed once per
/// VM: `KVM_GET_MSRS` stops at the first MSR it refuses, so one bad index would silently
/// truncate every later capture.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| StateError::MsrList)?;
        if vcpu.get_msrs(&mut one) == Ok(1) {
            ok.push(index);
        }
    }
    Ok(ok)
}

/// Captures vCPU `id`, which runs with `cpuid`. The vCPU must be paused.
fn capture_vcpu(
    id: u8,
    cpuid: &[kvm_cpuid_entry2],
    vcpu: &VcpuFd,
    msr_indices: &[u32],
    tsc_cache: &AtomicU32,
    synced: Option<kvm_sync_regs>,
) -> Result<VcpuState, StateError> {
    // Events first: reading them does not change them, but later reads (MSRs) could make
    // KVM process pending work on some hosts. With `synced` (what KVM stored in `kvm_run`
    // at the exit the vCPU is parked after) regs, sregs and events cost no ioctl.
    let (events, regs, sregs) = match synced {
        Some(s) => (s.events, s.regs, s.sregs),
        None => (
            vcpu.get_vcpu_events()
                .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
        ),
    };
    let mp_state = vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let xsave = vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::MsrList)?;
    let n = vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(StateError::PartialMsrs {
            done: n,
            total: entries.len(),
            first_refused: entries[n].index,
        });
    }
    let tsc_khz = match tsc_cache.load(Ordering::Relaxed) {
        0 => {
            let khz = vcpu.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?;
            tsc_cache.store(khz, Ordering::Relaxed);
            khz
        }
        khz => khz,
    };
    Ok(VcpuState {
        id,
        cpuid: cpuid.to_vec(),
        regs,
        sregs,
        xsave,
        xcrs,
        msrs: msrs.as_slice().to_vec(),
        lapic,
        mp_state,
        events,
        debugregs,
        tsc_khz,
    })
}

/// Restores a vCPU whose CPUID is already the state's. Order follows what KVM needs:
/// special registers before MSRs (EFER), LAPIC before events, events last.
fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    if vcpu.get_tsc_khz().ok() != Some(s.tsc_khz) {
        // Keeps guest time at the right rate on a host with another TSC frequency; a
        // host that cannot scale refuses, and the guest then sees this host's rate.
        if let Err(e) = vcpu.set_tsc_khz(s.tsc_khz) {
            tracing::warn!(khz = s.tsc_khz, "cannot set the guest TSC frequency: {e}");
        }
    }
    vcpu.set_sregs(&s.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    let mut msrs = Msrs::from_entries(&s.msrs).map_err(|_| StateError::MsrList)?;
    let n = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        return Err(StateError::PartialMsrs {
            done: n,
            total: s.msrs.len(),
            first_refused: msrs.as_mut_slice()[n].index,
        });
    }
    vcpu.set_regs(&s.regs).map_err(ioctl("KVM_SET_REGS"))?;
    // SAFETY: the guest's CPUID offers no dynamically enabled XSTATE features (AMX), so
    // the state fits the legacy 4096-byte `kvm_xsave` that KVM reads.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Captures the VM-wide KVM state. vCPUs must be paused.
fn capture_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
    })
}

/// Restores VM-wide state into a VM created with an irqchip and PIT.
fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    vm.set_pit2(&s.pit).map_err(ioctl("KVM_SET_PIT2"))?;
    // Only the clock value is restored; the flags/realtime fields describe the source
    // host and KVM rejects most of them.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// A vCPU saves what KVM holds for it and its CPUID; it is restored into a vCPU created on
/// this host (with [`Vcpu::new`], not yet configured or run): the saved CPUID first, as KVM
/// needs it before MSRs and XSAVE, then the registers. Save only while the vCPU is paused.
impl Persist<'_> for Vcpu {
    type State = VcpuState;
    type ConstructorArgs = Vcpu;
    type Error = StateError;

    fn save(&self) -> Result<VcpuState, StateError> {
        let fd = self.fd();
        capture_vcpu(
            self.id,
            self.cpuid(),
            &fd,
            self.saved_msrs(),
            self.tsc_khz_cache(),
            self.synced_regs(&fd),
        )
    }

    fn restore(mut vcpu: Vcpu, state: &VcpuState) -> Result<Vcpu, StateError> {
        if state.id != vcpu.id {
            return Err(StateError::VcpuId {
                saved: state.id,
                vcpu: vcpu.id,
            });
        }
        vcpu.set_cpuid(&state.cpuid).map_err(StateError::Cpuid)?;
        // The restore may set another TSC frequency: the next save reads it anew.
        vcpu.tsc_khz_cache().store(0, Ordering::Relaxed);
        vcpu.regs_set();
        restore_vcpu(&vcpu.fd(), state)?;
        Ok(vcpu)
    }
}

/// The VM saves its in-kernel irqchip, PIT and clock; it is restored into a VM created on
/// this host (with [`Vm::new`]: irqchip, PIT and guest RAM registered). Save only while
/// every vCPU is paused.
impl Persist<'_> for Vm {
    type State = VmState;
    type ConstructorArgs = Vm;
    type Error = StateError;

    fn save(&self) -> Result<VmState, StateError> {
        capture_vm(self.fd())
    }

    fn restore(vm: Vm, state: &VmState) -> Result<Vm, StateError> {
        restore_vm(vm.fd(), state)?;
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Memory;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

    const MSR_IA32_TSC: u32 = 0x10;
    /// LAPIC timer current count: computed from the host clock at each read.
    const LAPIC_TMCCT: usize = 0x390;

    fn vm() -> (Memory, Vm) {
        let m = Memory::new(2 << 20).unwrap();
        let vm = Vm::new(&m).expect("a KVM VM (needs /dev/kvm)");
        (m, vm)
    }

    fn ser<T: Serialize>(v: &T) -> Vec<u8> {
        bincode::serialize(v).unwrap()
    }

    /// A vCPU as the builder makes one: the host's CPUID, the saveable MSRs.
    fn new_vcpu(vm: &Vm) -> Vcpu {
        let mut v = Vcpu::new(vm.fd(), 0).unwrap();
        v.configure_cpuid(vm.kvm(), 1).unwrap();
        let msrs = saveable_msrs(vm.kvm(), &v.fd()).unwrap();
        v.set_saved_msrs(msrs);
        v
    }

    /// Two saves of one vCPU, apart from what runs with host time while it stands still.
    fn assert_same(a: &VcpuState, b: &VcpuState) {
        assert_eq!(a.id, b.id);
        assert_eq!(a.cpuid, b.cpuid);
        assert_eq!(ser(&a.regs), ser(&b.regs));
        assert_eq!(ser(&a.sregs), ser(&b.sregs));
        assert_eq!(ser(&a.xsave), ser(&b.xsave));
        assert_eq!(ser(&a.xcrs), ser(&b.xcrs));
        assert_eq!(ser(&a.mp_state), ser(&b.mp_state));
        assert_eq!(ser(&a.events), ser(&b.events));
        assert_eq!(ser(&a.debugregs), ser(&b.debugregs));
        assert_eq!(a.tsc_khz, b.tsc_khz);
        let msrs = |s: &VcpuState| -> Vec<(u32, u64)> {
            s.msrs
                .iter()
                .filter(|m| m.index != MSR_IA32_TSC)
                .map(|m| (m.index, m.data))
                .collect()
        };
        assert_eq!(msrs(a), msrs(b));
        let lapic = |s: &VcpuState| {
            let mut r = s.lapic.regs;
            r[LAPIC_TMCCT..LAPIC_TMCCT + 4].fill(0);
            r
        };
        assert_eq!(lapic(a), lapic(b));
    }

    #[test]
    fn vcpu_save_restore_save_is_identical_and_keeps_the_saved_cpuid() {
        let (_m, vm1) = vm();
        let v = new_vcpu(&vm1);
        let mut regs = v.fd().get_regs().unwrap();
        regs.rax = 0x7477_696e;
        regs.rip = 0x10_0000;
        v.fd().set_regs(&regs).unwrap();
        let mut saved = v.save().unwrap();
        assert_eq!(
            saved.cpuid,
            v.cpuid(),
            "the state holds the CPUID the vCPU runs with"
        );
        // A CPUID this host would not build (MOVBE cleared): a restore must give it back
        // as saved, not rebuild it from this host, as a failover to another CPU needs.
        let leaf1 = saved.cpuid.iter_mut().find(|e| e.function == 1).unwrap();
        leaf1.ecx &= !(1 << 22);
        let bytes = ser(&saved);
        let saved: VcpuState = bincode::deserialize(&bytes).unwrap();

        let (_m2, vm2) = vm();
        let fresh = Vcpu::new(vm2.fd(), 0).unwrap();
        // (KVM_GET_CPUID2 cannot confirm what KVM holds: under PVM it reports entries of
        // its own, not the ones set. The copy a save reads is what KVM_SET_CPUID2 took.)
        let mut restored = Vcpu::restore(fresh, &saved).unwrap();
        restored.set_saved_msrs(saved.msrs.iter().map(|m| m.index).collect());
        let again = restored.save().unwrap();
        assert_same(&saved, &again);
        assert_eq!(again.regs.rax, 0x7477_696e);
    }

    #[test]
    fn a_vcpu_state_that_cannot_be_loaded_is_refused_by_type() {
        let (_m, vm1) = vm();
        let saved = new_vcpu(&vm1).save().unwrap();
        // A fresh VM per try: KVM never gives a vCPU id out twice in one VM.
        let restore = |s: &VcpuState| {
            let (_m2, vm2) = vm();
            Vcpu::restore(Vcpu::new(vm2.fd(), 0).unwrap(), s).map(drop)
        };
        let mut other = bincode::deserialize::<VcpuState>(&ser(&saved)).unwrap();
        other.id = 1;
        assert!(matches!(
            restore(&other),
            Err(StateError::VcpuId { saved: 1, vcpu: 0 })
        ));
        let mut none = bincode::deserialize::<VcpuState>(&ser(&saved)).unwrap();
        none.cpuid.clear();
        assert!(matches!(
            restore(&none),
            Err(StateError::Cpuid(VcpuError::NoCpuid { id: 0 }))
        ));
        let mut many = bincode::deserialize::<VcpuState>(&ser(&saved)).unwrap();
        many.cpuid = vec![many.cpuid[0]; KVM_MAX_CPUID_ENTRIES + 1];
        assert!(matches!(
            restore(&many),
            Err(StateError::Cpuid(VcpuError::CpuidCount { .. }))
        ));
    }

    #[test]
    fn vm_save_restore_save_is_identical() {
        let (_m, vm1) = vm();
        let _v = new_vcpu(&vm1);
        let saved = vm1.save().unwrap();
        let decoded: VmState = bincode::deserialize(&ser(&saved)).unwrap();
        let (_m2, vm2) = vm();
        let vm2 = Vm::restore(vm2, &decoded).unwrap();
        let again = vm2.save().unwrap();
        assert_eq!(ser(&again.pic_master), ser(&saved.pic_master));
        assert_eq!(ser(&again.pic_slave), ser(&saved.pic_slave));
        assert_eq!(ser(&again.ioapic), ser(&saved.ioapic));
        // The PIT's load time is a host timestamp set at load; the rest must come back.
        let channels = |s: &VmState| {
            s.pit.channels.map(|mut c| {
                c.count_load_time = 0;
                ser(&c)
            })
        };
        assert_eq!(channels(&again), channels(&saved));
        assert_eq!(again.pit.flags, saved.pit.flags);
        // kvmclock runs on from the restored value.
        assert!(again.clock.clock >= saved.clock.clock);
    }
}
