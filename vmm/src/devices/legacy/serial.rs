//! 8250 UART at COM1 (vm-superio), interrupt via irqfd, output to a log file or stderr.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
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

    /// Console output to `w`, at most `cap` bytes of it: a guest must not fill the host's
    /// disk. Past the cap one line says so and the rest is dropped.
    pub fn capped(w: Box<dyn Write + Send>, cap: u64) -> Self {
        Self(Box::new(Capped {
            inner: w,
            left: cap,
            noted: false,
        }))
    }
}

/// Largest guest console log written (the serial log file).
pub const SERIAL_LOG_CAP: u64 = 16 << 20;

/// A writer that passes at most `left` more bytes.
struct Capped {
    inner: Box<dyn Write + Send>,
    left: u64,
    noted: bool,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        if n > 0 {
            self.inner.write_all(&buf[..n])?;
            self.left -= n as u64;
        } else if !self.noted {
            self.noted = true;
            self.inner
                .write_all(b"\n[fissile-vmm: console log cap reached; further output dropped]\n")?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
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

/// The UART's registers in a snapshot (a serde mirror of vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSaved {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not read yet.
    pub in_buffer: Vec<u8>,
}

/// The most received bytes a UART holds (vm-superio's FIFO size).
pub const SERIAL_FIFO_MAX: usize = 64;

/// Restoring the UART failed.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    /// The receive buffer is larger than the FIFO.
    #[error("serial receive buffer of {0} bytes exceeds the {SERIAL_FIFO_MAX}-byte FIFO")]
    Fifo(usize),
    /// Duplicating the interrupt eventfd failed.
    #[error("duplicating the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// vm-superio refused the state.
    #[error("vm-superio refused the serial state: {0}")]
    Refused(String),
}

/// COM1 as seen by the port-I/O bus.
#[derive(Debug)]
pub struct SerialConsole {
    /// Always `Some` except inside `restore`.
    serial: Option<Serial<EventFdTrigger, NoEvents, SerialOutput>>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: SerialOutput) -> Self {
        Self {
            serial: Some(Serial::new(irq, out)),
        }
    }

    fn uart(&mut self) -> &mut Serial<EventFdTrigger, NoEvents, SerialOutput> {
        match self.serial.as_mut() {
            Some(s) => s,
            None => unreachable!("the UART is only absent inside restore()"),
        }
    }

    /// The interrupt eventfd.
    pub fn irq_eventfd(&self) -> Option<&EventFd> {
        self.serial.as_ref().map(|s| s.interrupt_evt().eventfd())
    }

    /// Port read at `offset` (0..8) from the base port.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart().read(offset)
    }

    /// Port write at `offset` (0..8) from the base port.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart().write(offset, value) {
            tracing::debug!(error = ?e, "serial write failed");
        }
    }
}

impl crate::snapshot::Persist for SerialConsole {
    type State = SerialSaved;
    type Error = SerialStateError;

    /// Snapshot state of the registers.
    fn save(&self) -> SerialSaved {
        let st = self.serial.as_ref().map(|s| s.state()).unwrap_or_default();
        SerialSaved {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer,
        }
    }

    /// Puts the registers in `state`, keeping this UART's interrupt line and output.
    fn restore(&mut self, state: &SerialSaved) -> Result<(), SerialStateError> {
        if state.in_buffer.len() > SERIAL_FIFO_MAX {
            return Err(SerialStateError::Fifo(state.in_buffer.len()));
        }
        let evt = self
            .irq_eventfd()
            .map(|e| e.try_clone())
            .transpose()
            .map_err(SerialStateError::EventFd)?
            .ok_or_else(|| SerialStateError::Refused("no UART".into()))?;
        let st = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let Some(old) = self.serial.take() else {
            return Err(SerialStateError::Refused("no UART".into()));
        };
        let out = old.into_writer();
        match Serial::from_state(&st, EventFdTrigger::new(evt), NoEvents, out) {
            Ok(s) => {
                self.serial = Some(s);
                Ok(())
            }
            Err(e) => Err(SerialStateError::Refused(format!("{e:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Persist;

    #[test]
    fn capped_output_stops_at_its_cap_and_says_so_once() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let mut out = SerialOutput::capped(Box::new(buf.clone()), 10);

        for _ in 0..100 {
            out.write_all(b"abcd").unwrap();
        }

        let got = buf.0.lock().unwrap().clone();
        let text = String::from_utf8(got).unwrap();
        assert!(
            text.starts_with("abcdabcdab\n[fissile-vmm: console log cap"),
            "{text}"
        );
        assert_eq!(text.matches("cap reached").count(), 1);
    }
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
    fn save_restore_save_is_equal_and_the_mutation_shows() {
        let new = || {
            SerialConsole::new(
                EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
                SerialOutput::sink(),
            )
        };
        let mut a = new();
        a.write(3, 0x83); // LCR: DLAB on
        a.write(0, 0x01); // divisor low
        a.write(3, 0x03); // 8N1
        a.write(7, 0x5a); // scratch
        let saved = a.save();
        assert_ne!(saved, new().save(), "the writes changed nothing");

        let mut b = new();
        b.restore(&saved).unwrap();

        assert_eq!(b.save(), saved);
        assert_eq!(b.read(7), 0x5a);
    }

    #[test]
    fn an_oversize_receive_buffer_is_refused() {
        let mut s = SerialConsole::new(
            EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            SerialOutput::sink(),
        );
        let mut bad = s.save();
        bad.in_buffer = vec![0; SERIAL_FIFO_MAX + 1];
        assert!(matches!(s.restore(&bad), Err(SerialStateError::Fifo(_))));
        assert_eq!(s.read(7), 0, "the UART still works");
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
