//! virtio-mmio transport, version 2 register layout (virtio 1.x spec, section 4.2.2).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::persist::{self, MmioTransportState, QueueSaved, TransportStateError};
use super::{IrqTrigger, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::memory::GuestMemory;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4653_4c46; // "FLSF"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits.
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

/// One virtio-mmio window: transport registers in front of a [`VirtioDevice`].
#[derive(Debug)]
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    irq: Arc<IrqTrigger>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    /// Queue ready bits kept after the queues moved into the device on activation.
    queue_ready: Vec<bool>,
    status: u32,
    config_generation: u32,
    activated: bool,
    bad_access_log: super::chain::LogLimiter,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the device's interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = fresh_queues(device.queue_max_sizes())?;
        let queue_ready = vec![false; queues.len()];
        Ok(Self {
            device,
            mem,
            irq,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            queue_ready,
            status: 0,
            config_generation: 0,
            activated: false,
            bad_access_log: Default::default(),
        })
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The wrapped device, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The interrupt line.
    pub fn irq(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// True once the driver set DRIVER_OK and the device started.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Guest read of `data.len()` bytes at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            self.log_bad_access("read", offset, data.len());
            data.fill(0);
            return;
        }
        let sel = self.queue_sel as usize;
        let value = match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.avail_features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self
                .device
                .queue_max_sizes()
                .get(sel)
                .copied()
                .map_or(0, u32::from),
            REG_QUEUE_READY => {
                if self.activated {
                    u32::from(self.queue_ready.get(sel).copied().unwrap_or(false))
                } else {
                    self.queues.get(sel).map_or(0, |q| u32::from(q.ready()))
                }
            }
            REG_INTERRUPT_STATUS => self.irq.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.log_bad_access("read", offset, data.len());
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Guest write of `data` at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_DRIVER_OK == 0 || self.activated {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.log_bad_access("write", offset, data.len());
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.set_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // try_set_size rejects zero, non-powers of two and sizes above the max.
                    if q.try_set_size(u16::try_from(value).unwrap_or(0)).is_err() {
                        tracing::debug!(value, "virtio-mmio: invalid queue size ignored");
                    }
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW => {
                self.set_queue_addr(|q, v| q.set_desc_table_address(Some(v), None), value)
            }
            REG_QUEUE_DESC_HIGH => {
                self.set_queue_addr(|q, v| q.set_desc_table_address(None, Some(v)), value)
            }
            REG_QUEUE_DRIVER_LOW => {
                self.set_queue_addr(|q, v| q.set_avail_ring_address(Some(v), None), value)
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.set_queue_addr(|q, v| q.set_avail_ring_address(None, Some(v)), value)
            }
            REG_QUEUE_DEVICE_LOW => {
                self.set_queue_addr(|q, v| q.set_used_ring_address(Some(v), None), value)
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.set_queue_addr(|q, v| q.set_used_ring_address(None, Some(v)), value)
            }
            REG_QUEUE_NOTIFY => {
                if self.activated {
                    self.device.queue_notify(value);
                }
            }
            REG_INTERRUPT_ACK => self.irq.ack(value),
            REG_STATUS => self.set_status(value),
            _ => self.log_bad_access("write", offset, data.len()),
        }
    }

    fn set_queue_addr(&mut self, f: impl FnOnce(&mut Queue, u32), value: u32) {
        if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != STATUS_FEATURES_OK {
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q, value);
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let offered = self.device.avail_features() | VIRTIO_F_VERSION_1;
        let mask = 0xffff_ffffu64 << shift;
        self.acked_features =
            (self.acked_features & !mask) | ((u64::from(value) << shift) & offered & mask);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.x 3.1.1), except FAILED.
        let new_bits = value & !self.status;
        if value & self.status != self.status {
            tracing::debug!(
                value,
                status = self.status,
                "virtio-mmio: status bits cleared without reset"
            );
            return;
        }
        self.status = value;
        if new_bits & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported: refuse FEATURES_OK.
            self.status &= !STATUS_FEATURES_OK;
        }
        if new_bits & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let needed = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if self.activated || self.status & needed != needed {
            return;
        }
        let all_valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        if !all_valid {
            tracing::warn!(
                device = self.device.device_type(),
                "virtio-mmio: driver set up an invalid queue; device failed"
            );
            self.status |= STATUS_FAILED;
            return;
        }
        self.device.set_acked_features(self.acked_features);
        self.queue_ready = self.queues.iter().map(|q| q.ready()).collect();
        let queues = std::mem::take(&mut self.queues);
        match self
            .device
            .activate(self.mem.clone(), queues, self.irq.clone())
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(device = self.device.device_type(), error = %e, "virtio device activation failed");
                self.status |= STATUS_FAILED;
            }
        }
        if let Ok(queues) = fresh_queues(self.device.queue_max_sizes()) {
            self.queues = queues;
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.activated = false;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.irq.ack(u32::MAX);
        if let Ok(queues) = fresh_queues(self.device.queue_max_sizes()) {
            self.queue_ready = vec![false; queues.len()];
            self.queues = queues;
        }
    }

    fn log_bad_access(&mut self, what: &str, offset: u64, len: usize) {
        if self.bad_access_log.allow() {
            tracing::debug!(
                what,
                offset,
                len,
                "virtio-mmio: unsupported register access"
            );
        }
    }
}

impl crate::snapshot::Persist for MmioTransport {
    type State = MmioTransportState;
    type Error = TransportStateError;

    /// Snapshot state of the transport and its queues.
    fn save(&self) -> MmioTransportState {
        let queues: Vec<QueueSaved> = if self.activated {
            self.device
                .queue_states()
                .into_iter()
                .map(Into::into)
                .collect()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        MmioTransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
            activated: self.activated,
            queues,
        }
    }

    /// Puts the transport (and its device) in the state of a snapshot: resets the device,
    /// validates and installs the queues, and re-activates it if it was active. Used on a
    /// fresh transport (restore) and on a live one (merge).
    fn restore(&mut self, state: &MmioTransportState) -> Result<(), TransportStateError> {
        persist::validate(self.device.as_ref(), state)?;
        let queues = persist::queues_from_state(&state.queues, self.device.queue_max_sizes())?;
        self.device.reset();
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.activated = false;
        // Before the device restarts: what `restored()` raises (vsock's transport reset
        // event) must add to the saved status, not be overwritten by it, or the guest
        // reads InterruptStatus 0 and ignores the interrupt.
        self.irq.restore_status(state.interrupt_status);
        if state.activated {
            self.queue_ready = queues.iter().map(|q| q.ready()).collect();
            self.device.set_acked_features(self.acked_features);
            self.device
                .activate(self.mem.clone(), queues, self.irq.clone())
                .map_err(TransportStateError::Activate)?;
            self.activated = true;
            self.queues = fresh_queues(self.device.queue_max_sizes()).map_err(|e| {
                TransportStateError::Queue {
                    index: 0,
                    why: e.to_string(),
                }
            })?;
            self.device.restored();
        } else {
            self.queue_ready = vec![false; queues.len()];
            self.queues = queues;
        }
        Ok(())
    }
}

fn fresh_queues(max_sizes: &[u16]) -> Result<Vec<Queue>, virtio_queue::Error> {
    max_sizes.iter().map(|&max| Queue::new(max)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::{test_irq, test_memory};
    use crate::snapshot::Persist;

    fn transport() -> MmioTransport {
        MmioTransport::new(Box::new(Rng::new()), test_memory(), test_irq()).unwrap()
    }

    fn write(t: &mut MmioTransport, reg: u64, v: u32) {
        t.write(reg, &v.to_le_bytes());
    }

    fn read(t: &mut MmioTransport, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    /// ACKNOWLEDGE | DRIVER, VERSION_1 acked, FEATURES_OK.
    fn negotiated() -> MmioTransport {
        let mut t = transport();
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t, REG_DRIVER_FEATURES, 1); // VERSION_1 is bit 32
        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        t
    }

    #[test]
    fn identity_registers_read_as_the_spec_says() {
        let mut t = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(
            read(&mut t, REG_DEVICE_ID),
            crate::devices::virtio::TYPE_RNG
        );
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 offered");
        write(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn status_bits_cleared_without_reset_are_ignored_and_zero_resets() {
        let mut t = negotiated();
        let before = t.status();

        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);

        assert_eq!(t.status(), before);
        write(&mut t, REG_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.save().acked_features, 0, "reset forgets the features");
    }

    #[test]
    fn a_legacy_driver_is_refused_features_ok() {
        let mut t = transport();
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // No VERSION_1 acked.
        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn queue_addresses_are_taken_only_between_features_ok_and_driver_ok() {
        let mut t = transport();
        write(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        assert_eq!(t.save().queues[0].desc_table, 0, "before FEATURES_OK");

        let mut t = negotiated();
        write(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        assert_eq!(t.save().queues[0].desc_table, 0x1000, "after FEATURES_OK");
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        write(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        write(&mut t, REG_QUEUE_READY, 1);
        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.is_activated());
        write(&mut t, REG_QUEUE_DESC_LOW, 0x9000);
        assert_eq!(t.save().queues[0].desc_table, 0x1000, "after DRIVER_OK");
    }

    #[test]
    fn an_out_of_range_queue_select_reads_zero_and_ignores_writes() {
        let mut t = negotiated();
        write(&mut t, REG_QUEUE_SEL, 5);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0);
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_READY, 1);
        write(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
        let q = &t.save().queues[0];
        assert_eq!((q.ready, q.desc_table), (false, 0), "queue 0 untouched");
    }

    #[test]
    fn register_accesses_that_are_not_four_bytes_are_ignored() {
        let mut t = negotiated();
        let mut two = [0xffu8; 2];
        t.read(REG_MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        let status = t.status();
        t.write(REG_STATUS, &[0, 0]);
        assert_eq!(t.status(), status);
    }

    #[test]
    fn an_invalid_queue_at_driver_ok_fails_the_device_without_activating_it() {
        let mut t = negotiated();
        // Ready, but the rings point beyond guest memory.
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_DESC_HIGH, 0xffff);
        write(&mut t, REG_QUEUE_READY, 1);

        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );

        assert!(!t.is_activated());
        assert_ne!(t.status() & STATUS_FAILED, 0);
        // Notifying a failed device does nothing.
        write(&mut t, REG_QUEUE_NOTIFY, 0);
    }
}
