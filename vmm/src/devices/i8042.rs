//! Just enough of the i8042 keyboard controller for the guest kernel to probe
//! it quickly and to reset the machine through it (command 0xFE), which ends
//! the VMM. The guest's `reboot=k` (and a failed power-off) land here.

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::layout::{I8042_COMMAND_PORT, I8042_DATA_PORT};

const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_PORT: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const SELF_TEST_PASSED: u8 = 0x55;

/// The controller. Its bus range starts at the data port (0x60) and covers
/// the command port (0x64).
pub struct I8042 {
    reset: EventFd,
    config: u8,
    output: Option<u8>,
    /// The next data-port write is the operand of this command.
    pending: Option<u8>,
    last_was_command: bool,
}

impl I8042 {
    pub fn new(reset: EventFd) -> Self {
        Self {
            reset,
            config: 0,
            output: None,
            pending: None,
            last_was_command: false,
        }
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        match command {
            CMD_PULSE_RESET => {
                tracing::info!("guest reset through the i8042");
                if let Err(e) = self.reset.write(1) {
                    tracing::error!("signalling the reset: {e}");
                }
            }
            CMD_READ_CONFIG => self.output = Some(self.config),
            CMD_WRITE_CONFIG | CMD_WRITE_OUTPUT_PORT => self.pending = Some(command),
            CMD_SELF_TEST => self.output = Some(SELF_TEST_PASSED),
            CMD_TEST_PORT => self.output = Some(0),
            CMD_READ_OUTPUT_PORT => self.output = Some(0x01),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.last_was_command = false;
        if self.pending.take() == Some(CMD_WRITE_CONFIG) {
            self.config = value;
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG;
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }
}

const COMMAND_OFFSET: u64 = (I8042_COMMAND_PORT - I8042_DATA_PORT) as u64;

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.output.take().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.data(value),
            COMMAND_OFFSET => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_the_vmm() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut i8042 = I8042::new(reset.try_clone().unwrap());
        assert!(reset.read().is_err(), "no reset yet");
        i8042.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn config_byte_round_trips_and_self_test_passes() {
        let mut i8042 = I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut byte = [0u8];
        i8042.write(COMMAND_OFFSET, &[CMD_WRITE_CONFIG]);
        i8042.write(0, &[0x47]);
        i8042.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
        i8042.read(COMMAND_OFFSET, &mut byte);
        assert_ne!(byte[0] & STATUS_OUTPUT_FULL, 0);
        i8042.read(0, &mut byte);
        assert_eq!(byte[0], 0x47);
        i8042.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        i8042.read(0, &mut byte);
        assert_eq!(byte[0], SELF_TEST_PASSED);
        i8042.read(COMMAND_OFFSET, &mut byte);
        assert_eq!(byte[0] & STATUS_OUTPUT_FULL, 0);
    }
}
