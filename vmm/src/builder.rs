//! Turns a [`VmConfig`] into a running [`Vmm`]: memory, KVM VM, kernel, boot structures,
//! devices, vCPU threads and the control socket.

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use fissile_proto::control::{VmState, VmStatus};
use kvm_bindings::{KVM_MP_STATE_UNINITIALIZED, kvm_mp_state};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiServer;
use crate::arch::x86_64::gdt::BOOT_GDT;
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::mptable::{MptableError, setup_mptable};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::devices::legacy::serial::EventFdTrigger;
use crate::devices::legacy::{SerialConsole, SerialOutput};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::host::{self, HostError};
use crate::memory::{GuestMemory, GuestRam, MemoryError, create_guest_ram};
use crate::vstate::vcpu::{self, ControlError, RunControl, Target, VcpuBoot, VcpuError, VmExit};
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
    /// Adding a device to the bus.
    #[error("adding a device")]
    Device(#[from] DeviceError),
    /// vCPU setup.
    #[error("vCPU setup")]
    Vcpu(#[from] VcpuError),
    /// Control socket.
    #[error("control socket {0}")]
    Api(std::path::PathBuf, #[source] std::io::Error),
}

/// Builds a [`Vmm`] from a configuration.
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
        let ram = create_guest_ram(config.mem_mib << 20)?;
        steps.done("guest RAM");
        let vm = Vm::new(config.vcpus)?;
        steps.done("KVM VM");
        vm.register_memory(&ram.memory)?;
        steps.done("memory slots");
        let entry = load_kernel(&config, &ram.memory)?;
        steps.done("kernel load");

        let serial_out = match self.serial_output {
            Some(out) => out,
            None => serial_output_from_config(&config)?,
        };
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.fd()
            .register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(|e| VmError::RegisterIrqfd(SERIAL_IRQ, e))?;
        let mut devices = DeviceManager::new(SerialConsole::new(
            EventFdTrigger::new(serial_evt),
            serial_out,
        ));
        for device in virtio_devices(&config)? {
            let slot = devices.add_virtio(device, ram.memory.clone())?;
            let transport = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
            vm.fd()
                .register_irqfd(transport.irq().eventfd(), slot.gsi)
                .map_err(|e| VmError::RegisterIrqfd(slot.gsi, e))?;
        }

        steps.done("devices");
        let cmdline = format!("{} {}", config.base_cmdline(), devices.virtio_cmdline());
        write_boot_structures(&ram.memory, &cmdline, config.vcpus, config.mem_mib << 20)?;
        tracing::info!(%cmdline, entry, "kernel loaded");

        let hide_xsave = host::is_lab_tcg();
        if hide_xsave {
            tracing::info!(
                "lab quirk: host is QEMU TCG, hiding XSAVE/AVX/FMA/F16C/AVX2 from the guest CPUID"
            );
        }
        let supported = vm.supported_cpuid()?;
        let mut vcpu_fds = Vec::new();
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
            };
            vcpu::configure_vcpu(&fd, &supported, &boot)?;
            if id > 0 {
                let mp = kvm_mp_state {
                    mp_state: KVM_MP_STATE_UNINITIALIZED,
                };
                fd.set_mp_state(mp).map_err(VcpuError::Lapic)?;
            }
            vcpu_fds.push(fd);
        }

        steps.done("vCPUs");
        vcpu::register_kick_handler()?;
        let control = Arc::new(RunControl::new(vcpu_fds.len(), Target::Running));
        let bus = Arc::new(devices);
        let shared = Arc::new(VmmShared {
            control: control.clone(),
            started,
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
        });
        let api = match &config.api_sock {
            Some(path) => Some(
                ApiServer::start(path, VmmHandle(shared.clone()))
                    .map_err(|e| BuildError::Api(path.clone(), e))?,
            ),
            None => None,
        };
        let mut threads = Vec::new();
        for (id, fd) in vcpu_fds.into_iter().enumerate() {
            match vcpu::spawn_vcpu(id as u8, fd, control.clone(), bus.clone()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    control.request_exit(VmExit::Failed(e.to_string()));
                    return Err(e.into());
                }
            }
        }
        control.wait_registered(threads.len());
        steps.done("vCPU threads");
        tracing::info!(steps = %steps, "VM built");
        Ok(Vmm {
            shared,
            threads,
            api,
            _bus: bus,
            _vm: vm,
            ram,
        })
    }
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

fn serial_output_from_config(config: &VmConfig) -> Result<SerialOutput, BuildError> {
    if let Some(path) = &config.serial_log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| BuildError::SerialLog(path.clone(), e))?;
        return Ok(SerialOutput::new(Box::new(file)));
    }
    if config.serial_stderr {
        return Ok(SerialOutput::new(Box::new(std::io::stderr())));
    }
    Ok(SerialOutput::sink())
}

/// The virtio devices in their fixed order: root (vda), scratch (vdb), vsock, rng.
fn virtio_devices(config: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, BuildError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    devices.push(Box::new(Block::new(&config.rootfs, true, "fissile-root")?));
    if let Some(scratch) = &config.scratch {
        devices.push(Box::new(Block::new(scratch, false, "fissile-scratch")?));
    }
    if let Some(uds) = &config.vsock_uds {
        devices.push(Box::new(Vsock::new(u64::from(config.guest_cid), uds)?));
    }
    if config.rng {
        devices.push(Box::new(Rng::new()));
    }
    Ok(devices)
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

/// State shared between the [`Vmm`], its handles and the control socket.
#[derive(Debug)]
struct VmmShared {
    control: Arc<RunControl>,
    started: Instant,
    vcpus: u8,
    mem_mib: u64,
}

/// A cloneable handle to control a running VM from other threads.
#[derive(Debug, Clone)]
pub struct VmmHandle(Arc<VmmShared>);

impl VmmHandle {
    /// A handle over an existing run control (used by tests of the control socket).
    #[cfg(test)]
    pub(crate) fn from_control(control: Arc<RunControl>, vcpus: u8, mem_mib: u64) -> Self {
        Self(Arc::new(VmmShared {
            control,
            started: Instant::now(),
            vcpus,
            mem_mib,
        }))
    }

    /// Pauses all vCPUs; returns once none is inside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.0.control.pause()
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.0.control.resume()
    }

    /// Stops the VM; [`Vmm::wait`] then returns [`VmExit::Stopped`].
    pub fn shutdown(&self) {
        self.0.control.request_exit(VmExit::Stopped);
    }

    /// Current state, uptime, vCPUs and memory.
    pub fn status(&self) -> VmStatus {
        let state = match self.0.control.target() {
            Target::Running => VmState::Running,
            Target::Paused => VmState::Paused,
            Target::Exited => VmState::Exited,
        };
        VmStatus {
            state,
            uptime_ms: u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            vcpus: self.0.vcpus,
            mem_mib: self.0.mem_mib,
        }
    }
}

/// A running VM. Dropping it without [`Vmm::wait`] stops the VM.
#[derive(Debug)]
pub struct Vmm {
    shared: Arc<VmmShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    api: Option<ApiServer>,
    _bus: Arc<DeviceManager>,
    _vm: Vm,
    ram: GuestRam,
}

impl Vmm {
    /// A handle for other threads.
    pub fn handle(&self) -> VmmHandle {
        VmmHandle(self.shared.clone())
    }

    /// Pauses all vCPUs; returns once none is inside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.handle().pause()
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.handle().resume()
    }

    /// Requests a stop.
    pub fn shutdown(&self) {
        self.handle().shutdown();
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        self.handle().status()
    }

    /// The guest RAM (and its memfd).
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Blocks until the VM ends; returns how it ended.
    pub fn wait(mut self) -> VmExit {
        let exit = self.shared.control.wait_exited();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(api) = self.api.take() {
            api.stop();
        }
        exit
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.control.request_exit(VmExit::Stopped);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
        if let Some(api) = self.api.take() {
            api.stop();
        }
    }
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
