//! Power-off port: a byte written to port 0x501 stops the VM with that exit status.

use std::sync::mpsc::Sender;

use crate::VmEvent;
use twin_devices::bus::BusDevice;

pub struct PowerDevice {
    events: Sender<VmEvent>,
}

impl PowerDevice {
    pub fn new(events: Sender<VmEvent>) -> Self {
        PowerDevice { events }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            let _ = self.events.send(VmEvent::PowerOff(code));
        }
    }
}
