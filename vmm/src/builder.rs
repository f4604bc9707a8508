//! The two ways a VM comes to be, sharing one [`start`]: [`VmmBuilder::build`] turns a
//! [`VmConfig`] into a running [`Vmm`] (memory, KVM VM, kernel, boot structures, devices,
//! vCPU threads, the lifecycle actor); [`crate::restore`] builds one from a snapshot. The
//! control socket is not the builder's business: the caller starts it on the finished
//! [`Vmm`] (so a restored VM answers nothing before its state is applied).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{KVM_MP_STATE_UNINITIALIZED, kvm_mp_state};
use kvm_ioctls::Cap;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::gdt::BOOT_GDT;
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::mptable::{MptableError, setup_mptable};
use crate::config::{ConfigError, MachineConfig, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::devices::legacy::serial::{EventFdTrigger, SERIAL_LOG_CAP};
use crate::devices::legacy::{SerialConsole, SerialOutput};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::host::{self, HostError};
use crate::memory::{GuestMemory, GuestRam, MemoryError};
use crate::vmm::{VmCore, Vmm};
use crate::vstate::persist::{KvmCaps, KvmStateError};
use crate::vstate::vcpu::{self, RunControl, Target, VcpuBoot, VcpuError, VmExit};
use crate::vstate::vm::{Vm, VmError};

/// XEN_HVM_START_MAGIC_VALUE from the PVH ABI.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Building a VM failed; each variant names the failing step.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The host cannot run it.
    #[error("host check")]
    Host(#[from] HostError),
    /// Guest memory.
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    /// KVM VM setup.
    #[error("KVM VM setup")]
    Vm(#[from] VmError),
    /// Opening the kernel image.
    #[error("opening kernel {0}")]
    KernelOpen(std::path::PathBuf, #[source] std::io::Error),
    /// Loading the kernel ELF.
    #[error("loading kernel {0} (must be an uncompressed ELF vmlinux)")]
    KernelLoad(std::path::PathBuf, #[source] linux_loader::loader::Error),
    /// The kernel has no PVH entry note.
    #[error("kernel {0} has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvhEntry(std::path::PathBuf),
    /// The command line is too long.
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    /// Writing boot structures to guest memory.
    #[error("writing {0} to guest memory")]
    BootWrite(&'static str, #[source] vm_memory::GuestMemoryError),
    /// PVH boot parameters.
    #[error("writing PVH boot parameters")]
    Pvh(#[source] linux_loader::configurator::Error),
    /// MP table.
    #[error("MP table")]
    Mptable(#[from] MptableError),
    /// Opening the serial log.
    #[error("opening serial log {0}")]
    SerialLog(std::path::PathBuf, #[source] std::io::Error),
    /// An eventfd.
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A block device.
    #[error("block device")]
    Block(#[from] BlockError),
    /// The vsock device.
    #[error("vsock device")]
    Vsock(#[from] VsockError),
    /// Creating the network device (attaching its tap).
    #[error("network device")]
    Net(#[from] NetError),
    /// Adding a device to the bus.
    #[error("adding a device")]
    Device(#[from] DeviceError),
    /// vCPU setup.
    #[error("vCPU setup")]
    Vcpu(#[from] VcpuError),
    /// Probing what KVM can save.
    #[error("probing KVM state support")]
    KvmCaps(#[source] KvmStateError),
    /// Spawning the lifecycle actor thread.
    #[error("starting the lifecycle thread")]
    Actor(#[source] std::io::Error),
}

/// Builds a [`Vmm`] from a configuration (a cold boot).
#[derive(Debug)]
pub struct VmmBuilder {
    config: VmConfig,
    serial_output: Option<SerialOutput>,
}

impl VmmBuilder {
    /// A builder for `config`.
    pub fn new(config: VmConfig) -> Self {
        Self {
            config,
            serial_output: None,
        }
    }

    /// Sends the guest console to `out` instead of what the config says.
    pub fn serial_output(mut self, out: SerialOutput) -> Self {
        self.serial_output = Some(out);
        self
    }

    /// Validates, creates and starts the VM.
    pub fn build(self) -> Result<Vmm, BuildError> {
        let config = self.config;
        config.validate()?;
        host::check_memory(config.mem_mib)?;
        let started = Instant::now();
        let mut steps = StepTimer::new();
        let mem_size = config.mem_mib << 20;
        let ram = GuestRam::fresh(mem_size)?;
        steps.done("guest RAM");
        let vm = Vm::new(config.vcpus)?;
        let caps = KvmCaps::probe(vm.kvm()).map_err(BuildError::KvmCaps)?;
        steps.done("KVM VM");
        vm.register_memory(ram.memory())?;
        steps.done("memory slots");
        let entry = load_kernel(&config, ram.memory())?;
        steps.done("kernel load");

        let serial_out = match self.serial_output {
            Some(out) => out,
            None => serial_output(config.serial_log.as_deref(), config.serial_stderr)?,
        };
        let machine = MachineConfig {
            mem_size,
            vcpus: config.vcpus,
            rootfs: config.rootfs.clone(),
            guest_cid: config.vsock_uds.as_ref().map(|_| config.guest_cid),
            rng: config.rng,
            net_mac: config.net_tap.as_ref().map(|_| config.net_mac.0),
            cmdline: String::new(),
        };
        let devices = DeviceSpec {
            rootfs: &config.rootfs,
            scratch: config.scratch.as_deref(),
            vsock: config
                .vsock_uds
                .as_deref()
                .map(|uds| (config.guest_cid, uds)),
            rng: config.rng,
            net: config.net_tap.as_deref().map(|tap| (tap, config.net_mac.0)),
        };
        let bus = build_devices(&vm, ram.memory(), serial_out, &devices)?;
        steps.done("devices");
        let cmdline = format!("{} {}", config.base_cmdline(), bus.virtio_cmdline());
        write_boot_structures(ram.memory(), &cmdline, config.vcpus, mem_size)?;
        tracing::info!(%cmdline, entry, "kernel loaded");
        let machine = MachineConfig { cmdline, ..machine };

        let hide_xsave = host::is_lab_tcg();
        if hide_xsave {
            tracing::info!(
                "lab quirk: host is QEMU TCG, hiding XSAVE/AVX/FMA/F16C/AVX2 from the guest CPUID"
            );
        }
        let supported = vm.supported_cpuid()?;
        let tsc_deadline_timer = vm.kvm().check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(id))
                .map_err(|e| VcpuError::Create(id, e))?;
            let boot = VcpuBoot {
                id,
                vcpus: config.vcpus,
                entry,
                hide_xsave,
                tsc_deadline_timer,
            };
            vcpu::configure_vcpu(&fd, &supported, &boot)?;
            if id > 0 {
                let mp = kvm_mp_state {
                    mp_state: KVM_MP_STATE_UNINITIALIZED,
                };
                fd.set_mp_state(mp).map_err(VcpuError::Lapic)?;
            }
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        steps.done("vCPUs");
        let core = VmCore::new(
            Arc::new(RunControl::new(vcpus.len(), Target::Running)),
            machine,
            vm,
            caps,
            vcpus,
            bus,
            ram,
            config.snapshotd.clone(),
            config.scratch.is_some(),
        );
        let vmm = start(core, started)?;
        steps.done("vCPU threads");
        tracing::info!(steps = %steps, "VM built");
        Ok(vmm)
    }
}

/// Starts the vCPU threads (paused when `core` holds a pause, i.e. a restore) and the
/// lifecycle actor that owns `core` from now on.
pub(crate) fn start(core: VmCore, started: Instant) -> Result<Vmm, BuildError> {
    vcpu::register_kick_handler()?;
    let control = core.control.clone();
    let mut threads = Vec::new();
    for (id, fd) in core.vcpus.iter().enumerate() {
        match vcpu::spawn_vcpu(id as u8, fd.clone(), control.clone(), core.bus.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                control.request_exit(VmExit::Failed(e.to_string()));
                for t in threads {
                    let _ = t.join();
                }
                return Err(e.into());
            }
        }
    }
    control.wait_registered(threads.len());
    if core.held() {
        // A VM that starts paused (a restore) keeps its devices still too until resumed.
        core.quiesce_devices(true);
    }
    Vmm::start(core, threads, started).map_err(|e| {
        control.request_exit(VmExit::Failed(format!(
            "starting the lifecycle thread: {e}"
        )));
        BuildError::Actor(e)
    })
}

/// Which devices a VM has (host resources included), in slot order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceSpec<'a> {
    pub(crate) rootfs: &'a Path,
    pub(crate) scratch: Option<&'a Path>,
    pub(crate) vsock: Option<(u32, &'a Path)>,
    pub(crate) rng: bool,
    pub(crate) net: Option<(&'a str, [u8; 6])>,
}

/// The serial console and the virtio devices (root, scratch, vsock, rng, net, in that order),
/// their interrupt lines registered with KVM.
pub(crate) fn build_devices(
    vm: &Vm,
    mem: &GuestMemory,
    serial_out: SerialOutput,
    spec: &DeviceSpec<'_>,
) -> Result<DeviceManager, BuildError> {
    let serial_evt =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(BuildError::EventFd)?;
    vm.fd()
        .register_irqfd(&serial_evt, SERIAL_IRQ)
        .map_err(|e| VmError::RegisterIrqfd(SERIAL_IRQ, e))?;
    let mut bus = DeviceManager::new(SerialConsole::new(
        EventFdTrigger::new(serial_evt),
        serial_out,
    ));
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    devices.push(Box::new(Block::new(spec.rootfs, true, "fissile-root")?));
    if let Some(scratch) = spec.scratch {
        devices.push(Box::new(Block::new(scratch, false, "fissile-scratch")?));
    }
    if let Some((cid, uds)) = spec.vsock {
        devices.push(Box::new(Vsock::new(u64::from(cid), uds)?));
    }
    if spec.rng {
        devices.push(Box::new(Rng::new()));
    }
    if let Some((tap, mac)) = spec.net {
        devices.push(Box::new(Net::new(tap, mac)?));
    }
    for device in devices {
        let slot = bus.add_virtio(device, mem.clone())?;
        let transport = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
        vm.fd()
            .register_irqfd(transport.irq().eventfd(), slot.gsi)
            .map_err(|e| VmError::RegisterIrqfd(slot.gsi, e))?;
    }
    Ok(bus)
}

/// Times the steps of a build, for the log.
#[derive(Debug)]
struct StepTimer {
    last: Instant,
    steps: Vec<(&'static str, std::time::Duration)>,
}

impl StepTimer {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for StepTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, d)) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} {:.1} ms", d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// Where the guest console goes: a log file, stderr, or nowhere.
pub(crate) fn serial_output(
    log: Option<&Path>,
    to_stderr: bool,
) -> Result<SerialOutput, BuildError> {
    if let Some(path) = log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| BuildError::SerialLog(path.to_path_buf(), e))?;
        return Ok(SerialOutput::capped(Box::new(file), SERIAL_LOG_CAP));
    }
    if to_stderr {
        return Ok(SerialOutput::new(Box::new(std::io::stderr())));
    }
    Ok(SerialOutput::sink())
}

fn load_kernel(config: &VmConfig, mem: &GuestMemory) -> Result<u64, BuildError> {
    let mut file =
        File::open(&config.kernel).map_err(|e| BuildError::KernelOpen(config.kernel.clone(), e))?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BuildError::KernelLoad(config.kernel.clone(), e))?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(entry.0),
        _ => Err(BuildError::NoPvhEntry(config.kernel.clone())),
    }
}

/// Writes the command line, GDT, IDT, MP table and PVH start info + memory map.
pub fn write_boot_structures(
    mem: &GuestMemory,
    cmdline: &str,
    vcpus: u8,
    mem_size: u64,
) -> Result<(), BuildError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BuildError::CmdlineTooLong(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| BuildError::BootWrite("command line", e))?;
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| BuildError::BootWrite("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| BuildError::BootWrite("IDT", e))?;
    setup_mptable(mem, vcpus)?;

    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BuildError::Pvh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::test_memory;

    #[test]
    fn boot_structures_land_where_the_layout_says() {
        let mem = test_memory();

        write_boot_structures(&mem, "console=ttyS0", 2, 16 << 20).unwrap();

        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_entries, 3);
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(MEMMAP_START)).unwrap();
        assert_eq!(
            (first.addr, first.size, first.type_),
            (0, EBDA_START, E820_RAM)
        );
        let mut mp = [0u8; 4];
        mem.read_slice(&mut mp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&mp, b"_MP_");
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = test_memory();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_boot_structures(&mem, &long, 1, 16 << 20),
            Err(BuildError::CmdlineTooLong(_))
        ));
    }
}
