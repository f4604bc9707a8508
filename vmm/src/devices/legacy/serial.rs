//! 8250 UART at COM1 (vm-superio), interrupt via irqfd, output to a log file or stderr.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The serial interrupt line: an eventfd registered with `KVM_IRQFD`.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The eventfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest console goes.
pub struct SerialOutput(Box<dyn Write + Send>);

impl SerialOutput {
    /// Console output to `w`.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Self(w)
    }

    /// Console output discarded.
    pub fn sink() -> Self {
        Self(Box::new(std::io::sink()))
    }
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialOutput")
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A broken console must not stop the guest: swallow errors.
        if self.0.write_all(buf).is_err() {
            return Ok(buf.len());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// COM1 as seen by the port-I/O bus.
#[derive(Debug)]
pub struct SerialConsole {
    serial: Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: SerialOutput) -> Self {
        Self {
            serial: Serial::new(irq, out),
        }
    }

    /// The interrupt eventfd.
    pub fn irq_eventfd(&self) -> &EventFd {
        self.serial.interrupt_evt().eventfd()
    }

    /// Port read at `offset` (0..8) from the base port.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    /// Port write at `offset` (0..8) from the base port.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.serial.write(offset, value) {
            tracing::debug!(error = ?e, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = SerialConsole::new(
            EventFdTrigger::new(evt),
            SerialOutput::new(Box::new(out.clone())),
        );

        for b in b"hi\n" {
            serial.write(0, *b);
        }

        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }
}
