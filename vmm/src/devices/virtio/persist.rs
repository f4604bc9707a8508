//! Snapshot state of a virtio-mmio transport and its queues.
//!
//! The device's host resources (disk file, vsock sockets) are not state: the restoring VMM
//! builds the device from its own configuration, then applies this. Everything here comes
//! from a snapshot and is validated like guest input (virtio-queue's `TryFrom<QueueState>`
//! checks each queue; the transport checks device type, feature bits and queue counts).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::{VIRTIO_F_VERSION_1, VirtioDevice};

/// One virtqueue (a serde mirror of virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSaved {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring index to pop.
    pub next_avail: u16,
    /// Next used-ring index to write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Driver finished configuring it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSaved {
    fn from(q: QueueState) -> Self {
        QueueSaved {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSaved> for QueueState {
    fn from(q: QueueSaved) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// One virtio-mmio transport with its device's queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Virtio device type (checked against the device rebuilt from config).
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status register.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device was activated (DRIVER_OK): `queues` are its live queues.
    pub activated: bool,
    /// The queues (live ones when activated, else the ones being configured).
    pub queues: Vec<QueueSaved>,
}

/// Applying a transport state failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    /// The snapshot's device is another kind than the configured one.
    #[error("device type {found} in the snapshot, {expected} configured")]
    DeviceType {
        /// Configured.
        expected: u32,
        /// In the snapshot.
        found: u32,
    },
    /// Feature bits the device never offered.
    #[error("acked features {acked:#x} include bits outside the offered {offered:#x}")]
    Features {
        /// Acked in the snapshot.
        acked: u64,
        /// Offered by the device.
        offered: u64,
    },
    /// Wrong number of queues.
    #[error("{found} queues in the snapshot, the device has {expected}")]
    QueueCount {
        /// The device's count.
        expected: usize,
        /// In the snapshot.
        found: usize,
    },
    /// A queue is invalid.
    #[error("queue {index}: {why}")]
    Queue {
        /// Queue index.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The device refused to start with the restored queues.
    #[error("activating the restored device")]
    Activate(#[source] super::ActivateError),
}

/// Builds validated queues for a device whose maximum sizes are `max_sizes`.
pub fn queues_from_state(
    saved: &[QueueSaved],
    max_sizes: &[u16],
) -> Result<Vec<Queue>, TransportStateError> {
    if saved.len() != max_sizes.len() {
        return Err(TransportStateError::QueueCount {
            expected: max_sizes.len(),
            found: saved.len(),
        });
    }
    saved
        .iter()
        .zip(max_sizes)
        .enumerate()
        .map(|(index, (q, &max))| {
            if q.max_size != max {
                return Err(TransportStateError::Queue {
                    index,
                    why: format!("max size {} but the device offers {max}", q.max_size),
                });
            }
            Queue::try_from(QueueState::from(*q)).map_err(|e| TransportStateError::Queue {
                index,
                why: e.to_string(),
            })
        })
        .collect()
}

/// Checks the transport-level fields of `state` against `device` (the one behind the
/// transport being restored).
pub fn validate(
    device: &dyn VirtioDevice,
    state: &MmioTransportState,
) -> Result<(), TransportStateError> {
    let expected = device.device_type();
    if state.device_type != expected {
        return Err(TransportStateError::DeviceType {
            expected,
            found: state.device_type,
        });
    }
    let offered = device.avail_features() | VIRTIO_F_VERSION_1;
    if state.acked_features & !offered != 0 {
        return Err(TransportStateError::Features {
            acked: state.acked_features,
            offered,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::{TestQueue, test_irq, test_memory};
    use crate::memory::GuestMemory;
    use crate::snapshot::Persist;

    fn write(t: &mut MmioTransport, reg: u64, v: u32) {
        t.write(reg, &v.to_le_bytes());
    }

    /// A transport whose Rng device a "driver" set up and activated, queue at 0x10000.
    fn driven(mem: &GuestMemory) -> (MmioTransport, TestQueue) {
        let mut t = MmioTransport::new(Box::new(Rng::new()), mem.clone(), test_irq()).unwrap();
        let q = TestQueue::new(mem, 0x10000, 16);
        write(&mut t, 0x70, 1 | 2); // ACKNOWLEDGE | DRIVER
        write(&mut t, 0x24, 1); // driver features, high word
        write(&mut t, 0x20, 1); // VIRTIO_F_VERSION_1
        write(&mut t, 0x70, 1 | 2 | 8); // FEATURES_OK
        write(&mut t, 0x30, 0); // queue 0
        write(&mut t, 0x38, 16);
        write(&mut t, 0x80, q.desc as u32);
        write(&mut t, 0x90, q.avail as u32);
        write(&mut t, 0xa0, q.used as u32);
        write(&mut t, 0x44, 1);
        write(&mut t, 0x70, 1 | 2 | 8 | 4); // DRIVER_OK
        assert!(t.is_activated());
        (t, q)
    }

    fn request(t: &mut MmioTransport, q: &mut TestQueue, mem: &GuestMemory) {
        let head = q.add_chain(mem, &[(0x20000, 64, true)]);
        q.publish(mem, head);
        write(t, 0x50, 0); // QueueNotify
    }

    #[test]
    fn activated_transport_save_restore_save_is_equal() {
        let mem = test_memory();
        let (mut a, mut q) = driven(&mem);
        let before = a.save();
        request(&mut a, &mut q, &mem);
        let saved = a.save();
        // The paired check: serving a request really changed the state.
        assert_ne!(saved, before);
        assert_eq!(saved.queues[0].next_used, 1);

        let mut b = MmioTransport::new(Box::new(Rng::new()), mem.clone(), test_irq()).unwrap();
        b.restore(&saved).unwrap();

        assert_eq!(b.save(), saved);
        // The restored device goes on where the saved one stopped.
        request(&mut b, &mut q, &mem);
        assert_eq!(q.used_idx(&mem), 2);
        assert_eq!(b.save().queues[0].next_used, 2);
    }

    #[test]
    fn a_transport_being_configured_round_trips_too() {
        let mem = test_memory();
        let mut a = MmioTransport::new(Box::new(Rng::new()), mem.clone(), test_irq()).unwrap();
        write(&mut a, 0x70, 1 | 2);
        write(&mut a, 0x38, 8);
        let saved = a.save();
        let mut b = MmioTransport::new(Box::new(Rng::new()), mem, test_irq()).unwrap();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        assert!(!b.is_activated());
    }

    #[test]
    fn hostile_transport_states_are_refused_and_the_transport_keeps_working() {
        let mem = test_memory();
        let (a, _) = driven(&mem);
        let good = a.save();
        let mut b = MmioTransport::new(Box::new(Rng::new()), mem.clone(), test_irq()).unwrap();
        let cases: Vec<(&str, MmioTransportState)> = vec![
            (
                "device type",
                MmioTransportState {
                    device_type: 2,
                    ..good.clone()
                },
            ),
            (
                "features",
                MmioTransportState {
                    acked_features: 1 << 40 | 1 << 32,
                    ..good.clone()
                },
            ),
            (
                "queue count",
                MmioTransportState {
                    queues: vec![],
                    ..good.clone()
                },
            ),
            ("queue size", {
                let mut s = good.clone();
                s.queues[0].size = 3;
                s
            }),
            ("queue max", {
                let mut s = good.clone();
                s.queues[0].max_size = 4096;
                s
            }),
        ];
        for (what, bad) in cases {
            assert!(b.restore(&bad).is_err(), "{what} accepted");
        }
        b.restore(&good).unwrap();
        assert_eq!(b.save(), good);
    }
}
