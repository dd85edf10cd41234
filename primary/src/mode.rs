//! Where the primary is in its life, and the one function that moves it.

use crate::LossPolicy;

/// The primary's mode, shown by `twin status` (the type is the control API's).
pub use twin_api::Mode;

/// What happens to the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeEvent {
    /// A session starts connecting.
    Connecting,
    /// The backup accepted the session; the initial sync begins.
    Syncing,
    /// The backup acknowledged an epoch.
    Acked,
    /// The session ended without a takeover; the loss policy applies.
    BackupLost(LossPolicy),
    /// The backup that holds this session's committed replica took over.
    TakenOver,
    /// Replication stops.
    Stopped,
}

/// The one transition function of [`Mode`].
pub trait Transition {
    fn next(self, event: ModeEvent) -> Mode;
}

impl Transition for Mode {
    fn next(self, event: ModeEvent) -> Mode {
        use Mode::*;
        match (self, event) {
            (Fenced, _) => Fenced,
            (Stopped, _) => Stopped,
            (_, ModeEvent::TakenOver) => Fenced,
            (_, ModeEvent::Stopped) => Stopped,
            // Reconnecting after a loss changes nothing until the backup answers: output
            // still flows unprotected (or stays held).
            (Unprotected | HoldingOutput, ModeEvent::Connecting) => self,
            (_, ModeEvent::Connecting) => Connecting,
            (_, ModeEvent::Syncing) => Syncing,
            (_, ModeEvent::Acked) => Protected,
            (_, ModeEvent::BackupLost(LossPolicy::Release)) => Unprotected,
            (_, ModeEvent::BackupLost(LossPolicy::Hold)) => HoldingOutput,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Mode::*;
    use ModeEvent as E;

    fn run(events: &[ModeEvent]) -> Vec<Mode> {
        let mut m = Connecting;
        events
            .iter()
            .map(|&e| {
                m = m.next(e);
                m
            })
            .collect()
    }

    #[test]
    fn a_life_with_a_lost_and_returning_backup() {
        let release = E::BackupLost(LossPolicy::Release);
        assert_eq!(
            run(&[
                E::Connecting,
                E::Syncing,
                E::Acked,
                E::Acked,
                release,
                E::Connecting,
                release,
                E::Connecting,
                E::Syncing,
                E::Acked,
                E::Stopped
            ]),
            [
                Connecting,
                Syncing,
                Protected,
                Protected,
                Unprotected,
                Unprotected,
                Unprotected,
                Unprotected,
                Syncing,
                Protected,
                Stopped
            ]
        );
    }

    #[test]
    fn hold_policy_holds_until_a_backup_acknowledges() {
        let hold = E::BackupLost(LossPolicy::Hold);
        assert_eq!(
            run(&[E::Connecting, hold, E::Connecting, E::Syncing, E::Acked]),
            [Connecting, HoldingOutput, HoldingOutput, Syncing, Protected]
        );
    }

    #[test]
    fn fenced_and_stopped_are_final() {
        for e in [
            E::Connecting,
            E::Syncing,
            E::Acked,
            E::BackupLost(LossPolicy::Release),
            E::TakenOver,
            E::Stopped,
        ] {
            assert_eq!(Fenced.next(e), Fenced, "{e:?}");
            assert_eq!(Stopped.next(e), Stopped, "{e:?}");
        }
        assert_eq!(Protected.next(E::TakenOver), Fenced);
        assert_eq!(HoldingOutput.next(E::TakenOver), Fenced);
    }
}
