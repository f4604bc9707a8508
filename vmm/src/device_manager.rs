//! The port-I/O and MMIO buses: vCPU exits are dispatched here to the device that owns the
//! address. Unknown ports/addresses read as 0xff and ignore writes (logged at debug, rate
//! limited, so the console stays quiet).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::arch::x86_64::layout::{
    SERIAL_PORT_BASE, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::devices::legacy::i8042::{COMMAND_PORT, DATA_PORT};
use crate::devices::legacy::{I8042, SerialConsole};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{IrqTrigger, VirtioDevice};
use crate::memory::GuestMemory;

/// What the vCPU must do after a bus access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAction {
    /// Keep running.
    Continue,
    /// The guest asked for a reset (i8042 0xFE).
    GuestReset,
}

/// One virtio-mmio device slot.
#[derive(Debug)]
pub struct MmioSlot {
    /// Guest physical base of the 4 KiB window.
    pub base: u64,
    /// GSI the device interrupts on.
    pub gsi: u32,
    /// The transport and device.
    pub transport: Mutex<MmioTransport>,
}

/// All devices reachable from the vCPUs.
#[derive(Debug)]
pub struct DeviceManager {
    serial: Mutex<SerialConsole>,
    i8042: Mutex<I8042>,
    mmio: Vec<MmioSlot>,
    unknown_accesses: AtomicU64,
}

/// Adding a device failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Creating the interrupt eventfd failed.
    #[error("creating the interrupt eventfd")]
    IrqEventFd(#[source] std::io::Error),
    /// The transport refused the device's queue sizes.
    #[error("virtio queue setup")]
    Queue(#[source] virtio_queue::Error),
}

impl DeviceManager {
    /// A bus with the serial console and i8042; virtio devices are added with
    /// [`DeviceManager::add_virtio`].
    pub fn new(serial: SerialConsole) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042::new()),
            mmio: Vec::new(),
            unknown_accesses: AtomicU64::new(0),
        }
    }

    /// Adds a virtio device in the next MMIO window; returns its slot.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
    ) -> Result<&MmioSlot, DeviceError> {
        let index = self.mmio.len();
        let irq = Arc::new(IrqTrigger::new().map_err(DeviceError::IrqEventFd)?);
        let transport = MmioTransport::new(device, mem, irq).map_err(DeviceError::Queue)?;
        self.mmio.push(MmioSlot {
            base: VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_IRQ_BASE + index as u32,
            transport: Mutex::new(transport),
        });
        Ok(&self.mmio[index])
    }

    /// The virtio slots in order.
    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.mmio
    }

    /// `virtio_mmio.device=` kernel parameters for every virtio device.
    pub fn virtio_cmdline(&self) -> String {
        self.mmio
            .iter()
            .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.gsi))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The serial console.
    pub fn serial(&self) -> &Mutex<SerialConsole> {
        &self.serial
    }

    fn unknown(&self, what: &str, addr: u64, len: usize) {
        let n = self.unknown_accesses.fetch_add(1, Ordering::Relaxed);
        if n < 20 || n.is_multiple_of(10_000) {
            tracing::debug!(
                what,
                addr,
                len,
                count = n + 1,
                "access to an unknown address ignored"
            );
        }
    }

    /// Port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read((p - SERIAL_PORT_BASE) as u8);
            }
            DATA_PORT | COMMAND_PORT if data.len() == 1 => {
                data[0] = lock(&self.i8042).read(port);
            }
            _ => {
                data.fill(0xff);
                self.unknown("pio read", u64::from(port), data.len());
            }
        }
    }

    /// Port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
        match (port, data) {
            (p, [value]) if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) => {
                lock(&self.serial).write((p - SERIAL_PORT_BASE) as u8, *value);
            }
            (DATA_PORT | COMMAND_PORT, [value]) => {
                if lock(&self.i8042).write(port, *value) {
                    return BusAction::GuestReset;
                }
            }
            _ => self.unknown("pio write", u64::from(port), data.len()),
        }
        BusAction::Continue
    }

    fn find_mmio(&self, addr: u64) -> Option<(&MmioSlot, u64)> {
        let index = addr.checked_sub(VIRTIO_MMIO_BASE)? / VIRTIO_MMIO_SIZE;
        let slot = self.mmio.get(usize::try_from(index).ok()?)?;
        Some((slot, addr - slot.base))
    }

    /// MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.find_mmio(addr) {
            Some((slot, offset)) => lock(&slot.transport).read(offset, data),
            None => {
                data.fill(0xff);
                self.unknown("mmio read", addr, data.len());
            }
        }
    }

    /// MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.find_mmio(addr) {
            Some((slot, offset)) => lock(&slot.transport).write(offset, data),
            None => self.unknown("mmio write", addr, data.len()),
        }
    }
}

/// Locks a device mutex; a device that panicked while locked stays usable (its state is
/// plain data and every access re-validates guest input).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::SerialOutput;
    use crate::devices::legacy::serial::EventFdTrigger;
    use crate::devices::virtio::rng::Rng;
    use vmm_sys_util::eventfd::EventFd;

    fn manager() -> DeviceManager {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        DeviceManager::new(SerialConsole::new(
            EventFdTrigger::new(evt),
            SerialOutput::sink(),
        ))
    }

    #[test]
    fn virtio_devices_get_consecutive_windows_and_irqs_on_the_cmdline() {
        let mut dm = manager();
        let mem = crate::devices::virtio::test_utils::test_memory();
        dm.add_virtio(Box::new(Rng::new()), mem.clone()).unwrap();
        dm.add_virtio(Box::new(Rng::new()), mem).unwrap();

        assert_eq!(
            dm.virtio_cmdline(),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        let mut magic = [0u8; 4];
        dm.mmio_read(0xd000_1000, &mut magic);
        assert_eq!(&magic, b"virt");
        let mut device_id = [0u8; 4];
        dm.mmio_read(0xd000_1008, &mut device_id);
        assert_eq!(
            u32::from_le_bytes(device_id),
            crate::devices::virtio::TYPE_RNG
        );
    }

    #[test]
    fn unknown_port_reads_0xff_and_reset_is_reported() {
        let dm = manager();
        let mut data = [0u8; 2];

        dm.pio_read(0x1234, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        let mut unknown_mmio = [0u8; 4];
        dm.mmio_read(0xd00f_0000, &mut unknown_mmio);
        assert_eq!(unknown_mmio, [0xff; 4]);

        assert_eq!(dm.pio_write(0x80, &[1]), BusAction::Continue);
        assert_eq!(dm.pio_write(0x64, &[0xfe]), BusAction::GuestReset);
    }
}
