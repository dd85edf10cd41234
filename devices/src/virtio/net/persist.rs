//! Save and restore of virtio-net: the model's state is its MAC and link status; the
//! transport saves its own (see [`crate::virtio::pci`]).

use serde::{Deserialize, Serialize};

use super::{Net, NetError, NetSink};
use crate::persist::Persist;
use crate::virtio::pci::{VirtioPciArgs, VirtioPciDeviceState};

/// Saved state of the virtio-net model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub link_up: bool,
}

/// Saved state of the whole device: transport plus model.
pub type VirtioNetState = VirtioPciDeviceState<NetState>;

/// Host resources a (restored) device is built with: guest memory, the interrupt sender,
/// and where its transmitted frames go (`model`).
pub type NetResources = VirtioPciArgs<Box<dyn NetSink>>;

/// The MAC and the link status are the model's state; the sink (the TAP, or the
/// output-commit buffer) is the host's. Counters and the RX pause are host-side too.
impl Persist<'_> for Net {
    type State = NetState;
    type ConstructorArgs = Box<dyn NetSink>;
    type Error = NetError;

    fn save(&self) -> Result<NetState, NetError> {
        Ok(NetState {
            mac: self.mac,
            link_up: self.link_up,
        })
    }

    fn restore(sink: Box<dyn NetSink>, state: &NetState) -> Result<Self, NetError> {
        let mut net = Self::new(state.mac, sink)?;
        net.link_up = state.link_up;
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::VirtioNet;
    use super::*;
    use crate::virtio::pci::tests::w;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn save_restore_save_is_identical() {
        let mut s = setup();
        s.txq.add(&[(0x40000, 72, false)]);
        w(&mut s.dev, 0x3004, 2, 1);
        s.rxq.add(&[(0x50000, 1526, true)]);
        s.dev.set_link_up(false);
        let st = s.dev.save().unwrap();
        assert_eq!(st.transport.queues[1].next_avail, 1);
        assert_eq!(st.transport.queues[1].next_used, 1);
        assert_eq!(st.device.mac, MAC);
        assert!(!st.device.link_up);
        // Through a real encoding, as a checkpoint would carry it.
        let bytes = bincode::serialize(&st).unwrap();
        let decoded: VirtioNetState = bincode::deserialize(&bytes).unwrap();
        let sent = Recorder::default();
        let mut restored = VirtioNet::restore(
            NetResources {
                mem: s.mem.clone(),
                msi: s.msi.clone(),
                model: Box::new(sent.clone()),
            },
            &decoded,
        )
        .unwrap();
        assert_eq!(restored.save().unwrap(), st);
        // And it carries on where the original stopped.
        s.mem
            .write_slice(&frame(9, 60), GuestAddress(0x4100c))
            .unwrap();
        s.txq.add(&[(0x41000, 72, false)]);
        s.msi.take();
        w(&mut restored, 0x3004, 2, 1);
        assert_eq!(sent.0.lock().unwrap().len(), 1);
        assert_eq!(s.txq.used_idx(), 2);
        assert_eq!(s.msi.take()[0].data, 0x42);
    }
}
