//! Virtio devices on the virtio-mmio transport (virtio 1.x, split virtqueues).

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
pub mod vsock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Feature bit: virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type: network card.
pub const TYPE_NET: u32 = 1;
/// Device type: block.
pub const TYPE_BLOCK: u32 = 2;
/// Device type: entropy source.
pub const TYPE_RNG: u32 = 4;
/// Device type: vsock.
pub const TYPE_VSOCK: u32 = 19;
/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one virtio-mmio device: the InterruptStatus register plus the irqfd
/// that KVM turns into a guest interrupt.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A new line with a fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(error = %e, "virtio interrupt eventfd write failed");
        }
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets InterruptStatus to `bits` (snapshot restore), raising the line if any is set.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0
            && let Err(e) = self.evt.write(1)
        {
            tracing::warn!(error = %e, "virtio interrupt eventfd write failed");
        }
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// A device could not start with the queues the driver set up.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// Wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// A device-specific resource failed to start.
    #[error("device backend: {0}")]
    Backend(String),
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// Virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (its length is the number of queues).
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of the offered ones).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device config space at `offset`; bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (ignored by devices with a read-only config).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u32);
    /// The driver reset the device: drop queues and in-flight state.
    fn reset(&mut self);
    /// Snapshot: the state of the live queues (empty when not activated). Required, like
    /// the rest of the persist methods: a device cannot be added without deciding what its
    /// snapshot holds.
    fn queue_states(&self) -> Vec<QueueState>;
    /// Snapshot: stop (`true`) or restart (`false`) any processing the device does outside
    /// vCPU exits (host socket readiness for vsock), so guest memory and queues hold still
    /// while they are captured. Devices that only run on queue notifications do nothing.
    fn quiesce(&mut self, paused: bool);
    /// Restore: the device was just activated with queues from a snapshot. Host-side state
    /// that could not be saved (vsock connections) is reset here.
    fn restored(&mut self);
    /// Host-side state worth seeing when diagnosing a guest that does not answer (queues
    /// are shown by the transport); empty for most devices.
    fn debug_state(&self) -> String {
        String::new()
    }
}

/// Copies `src` (a device config struct as bytes) at `offset` into `data`; out of range reads
/// yield zeros.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(avail) = src.get(offset..) {
        let n = avail.len().min(data.len());
        data[..n].copy_from_slice(&avail[..n]);
    }
}

#[cfg(test)]
pub(crate) mod test_utils;
