//! The KVM VM: created with an in-kernel irqchip and PIT, guest RAM registered as slots.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::GuestMemory;

/// Creating or configuring the VM failed; each variant names the failing step.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Opening /dev/kvm.
    #[error("opening /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM.
    #[error("creating the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR.
    #[error("setting the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// KVM_SET_IDENTITY_MAP_ADDR.
    #[error("setting the identity map address")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP.
    #[error("creating the in-kernel irqchip")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2.
    #[error("creating the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION.
    #[error("registering guest memory slot {0}")]
    SetMemoryRegion(u32, #[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID.
    #[error("reading the supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_IRQFD.
    #[error("registering irqfd for GSI {0}")]
    RegisterIrqfd(u32, #[source] kvm_ioctls::Error),
    /// Too many vCPUs for this host.
    #[error("this host's KVM supports at most {0} vCPUs")]
    TooManyVcpus(usize),
}

/// The VM file descriptor and its KVM handle.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Creates a VM with the TSS/identity map set, an in-kernel irqchip and PIT.
    pub fn new(vcpus: u8) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        if usize::from(vcpus) > kvm.get_max_vcpus() {
            return Err(VmError::TooManyVcpus(kvm.get_max_vcpus()));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetIdentityMap)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Self { kvm, fd })
    }

    /// The KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region.as_ptr() as u64;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
            // the VMM keeps alive (inside `Vmm`) for as long as the VM exists; slots do not
            // overlap because vm-memory rejects overlapping regions.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(|e| VmError::SetMemoryRegion(slot, e))?;
        }
        Ok(())
    }

    /// CPUID entries KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)
    }
}
