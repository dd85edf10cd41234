//! COM1: a 16550A UART (vm-superio) on port 0x3F8, IRQ 4, output to a writer.

use std::io::Write;

use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::persist::Persist;

/// Raises the serial IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// COM1 on the port-I/O bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, LineFlusher>,
}

/// Flushes the console at every newline so a log follower sees whole lines promptly.
pub struct LineFlusher(pub ConsoleOut);

impl Write for LineFlusher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        if buf[..n].contains(&b'\n') {
            self.0.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Serializable register state of the UART (vm-superio's `SerialState` is not serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Errors restoring the UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("the saved UART state is invalid")]
    State(#[source] vm_superio::serial::Error<std::io::Error>),
}

/// Host resources of a (restored) UART: its interrupt line and where its output goes.
pub struct SerialArgs {
    pub irq: EventFd,
    pub out: ConsoleOut,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), LineFlusher(out)),
        }
    }
}

impl Persist<'_> for SerialDevice {
    type State = SerialDeviceState;
    type ConstructorArgs = SerialArgs;
    type Error = SerialError;

    fn save(&self) -> Result<SerialDeviceState, SerialError> {
        let s = self.uart.state();
        Ok(SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    /// Rebuilds the UART; a pending interrupt the state records is raised again on `irq`.
    fn restore(args: SerialArgs, state: &SerialDeviceState) -> Result<Self, SerialError> {
        let s = SerialState {
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
        let uart = Serial::from_state(
            &s,
            IrqTrigger(args.irq),
            vm_superio::serial::NoEvents,
            LineFlusher(args.out),
        )
        .map_err(SerialError::State)?;
        Ok(SerialDevice { uart })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                tracing::warn!("serial console write failed: {e:?}");
            }
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
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_reach_the_console_and_state_round_trips() {
        let out = Shared::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0x3f8, 0, &[*b]);
        }
        s.write(0x3f8, 7, &[0x5a]); // scratch
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        let st = s.save().unwrap();
        assert_eq!(st.scratch, 0x5a);
        let s2 = SerialDevice::restore(args(), &st).unwrap();
        assert_eq!(s2.save().unwrap(), st);
    }

    fn args() -> SerialArgs {
        SerialArgs {
            irq: EventFd::new(0).unwrap(),
            out: Box::new(std::io::sink()),
        }
    }

    #[test]
    fn save_restore_save_is_identical_through_an_encoding() {
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        s.write(0x3f8, 3, &[0x80]); // DLAB on
        s.write(0x3f8, 0, &[0x0c]); // divisor 9600 baud
        s.write(0x3f8, 3, &[0x03]); // 8N1, DLAB off
        s.write(0x3f8, 1, &[0x01]); // RX data interrupt enabled
        s.write(0x3f8, 7, &[0xa5]);
        let st = s.save().unwrap();
        let bytes = bincode::serialize(&st).unwrap();
        let decoded: SerialDeviceState = bincode::deserialize(&bytes).unwrap();
        let restored = SerialDevice::restore(args(), &decoded).unwrap();
        assert_eq!(restored.save().unwrap(), st);
        assert_eq!((st.baud_divisor_low, st.line_control), (0x0c, 0x03));
    }

    #[test]
    fn a_state_with_an_overfull_fifo_is_refused_by_type() {
        let st = SerialDeviceState {
            in_buffer: vec![0; 65],
            ..Default::default()
        };
        match SerialDevice::restore(args(), &st) {
            Err(SerialError::State(vm_superio::serial::Error::FullFifo)) => {}
            Err(e) => panic!("another error: {e:?}"),
            Ok(_) => panic!("a UART with 65 bytes in its 64-byte FIFO was restored"),
        }
    }
}
