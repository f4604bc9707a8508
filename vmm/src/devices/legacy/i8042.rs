//! A minimal i8042 keyboard controller: enough for the guest's `reboot=k` reset (command 0xFE
//! written to port 0x64). Status reads say "buffers empty" so the guest never waits.

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;
/// Command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller.
#[derive(Debug, Default)]
pub struct I8042 {
    reset_requested: bool,
}

impl I8042 {
    /// A new controller.
    pub fn new() -> Self {
        Self::default()
    }

    /// Port read: status 0 (no data, input buffer empty), data 0.
    pub fn read(&mut self, _port: u16) -> u8 {
        0
    }

    /// Port write. Returns true when the guest asked for a CPU reset.
    pub fn write(&mut self, port: u16, value: u8) -> bool {
        if port == COMMAND_PORT && value == CMD_RESET_CPU {
            self.reset_requested = true;
            return true;
        }
        false
    }

    /// Whether a reset was requested.
    pub fn reset_requested(&self) -> bool {
        self.reset_requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_requests_reset() {
        let mut kbd = I8042::new();
        assert!(!kbd.write(DATA_PORT, CMD_RESET_CPU));
        assert!(!kbd.write(COMMAND_PORT, 0x20));
        assert!(kbd.write(COMMAND_PORT, CMD_RESET_CPU));
        assert!(kbd.reset_requested());
        assert_eq!(kbd.read(COMMAND_PORT), 0);
    }
}
