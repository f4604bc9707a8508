//! virtio-rng: fills guest buffers from the host's getrandom.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use crate::devices::virtio::chain::{LogLimiter, collect_chain};
use crate::devices::virtio::{
    ActivateError, INT_VRING, IrqTrigger, TYPE_RNG, VIRTIO_F_VERSION_1, VirtioDevice,
};
use crate::memory::GuestMemory;

/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request (bounds the host buffer and the time per request).
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    queue_sizes: [u16; 1],
    active: Option<Active>,
    log: LogLimiter,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    queue: Queue,
    irq: Arc<IrqTrigger>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Self {
            queue_sizes: [QUEUE_SIZE],
            active: None,
            log: LogLimiter::default(),
        }
    }

    /// Serves every available request; returns how many were handled.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mem = &active.mem;
        let max = usize::from(active.queue.size());
        let mut handled = 0;
        while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match collect_chain(chain, max) {
                Ok(descs) => fill(mem, &descs),
                Err(e) => {
                    if self.log.allow() {
                        tracing::warn!(error = %e, "virtio-rng: dropped malformed chain");
                    }
                    0
                }
            };
            if active.queue.add_used(mem, head, written).is_ok() {
                handled += 1;
            }
        }
        if handled > 0 && active.queue.needs_notification(mem).unwrap_or(true) {
            active.irq.trigger(INT_VRING);
        }
        handled
    }
}

/// Fills the writable descriptors with random bytes, up to [`MAX_BYTES_PER_REQUEST`].
fn fill(mem: &GuestMemory, descs: &[virtio_queue::desc::split::Descriptor]) -> u32 {
    let mut written: usize = 0;
    let mut buf = [0u8; 4096];
    for d in descs.iter().filter(|d| d.is_write_only()) {
        let mut addr = d.addr();
        let mut left = (d.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
        while left > 0 {
            let n = left.min(buf.len());
            if getrandom(&mut buf[..n]).is_err() || mem.write_slice(&buf[..n], addr).is_err() {
                return written as u32;
            }
            addr = vm_memory::GuestAddress(addr.0 + n as u64);
            left -= n;
            written += n;
        }
        if written >= MAX_BYTES_PER_REQUEST {
            break;
        }
    }
    written as u32
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the duration of
        // the call; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queue: queues.remove(0),
            irq,
        });
        Ok(())
    }
    fn queue_notify(&mut self, _index: u32) {
        self.process_queue();
    }
    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn quiesce(&mut self, _paused: bool) {
        // Requests are served on the vCPU thread that notified: nothing runs on its own.
    }

    fn restored(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{TestQueue, test_irq, test_memory};
    use vm_memory::GuestAddress;

    #[test]
    fn rng_fills_writable_buffers_and_caps_large_requests() {
        let mem = test_memory();
        let mut tq = TestQueue::new(&mem, 0x10_0000, 8);
        let mut rng = Rng::new();
        rng.activate(mem.clone(), vec![tq.queue()], test_irq())
            .unwrap();
        let head = tq.add_chain(&mem, &[(0x20_0000, 64, true)]);
        tq.publish(&mem, head);
        let big = tq.add_chain(&mem, &[(0x30_0000, 1 << 20, true)]);
        tq.publish(&mem, big);

        rng.process_queue();

        assert_eq!(tq.used_entry(&mem, 0), (u32::from(head), 64));
        assert_eq!(
            tq.used_entry(&mem, 1),
            (u32::from(big), MAX_BYTES_PER_REQUEST as u32)
        );
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert!(buf.iter().any(|&b| b != 0));
    }
}
