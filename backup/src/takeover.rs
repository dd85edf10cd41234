//! The takeover decision: what the backup does when a session ends. Pure, so that every case
//! the fault suite drives end to end is also a unit test here.
//!
//! The rule underneath: the replica may stand in for the VM only if it holds everything the
//! world has seen from it. That holds while the primary that produced the committed
//! checkpoints is in the session that committed them; it stops holding as soon as that
//! primary may run on without this backup (it said it abandons the session, it started
//! another one, it sent something this backup could not take). So only the loss of a
//! session that committed, with no word from its primary, is a reason to take over, and a
//! loss that this process's own stall may explain is given a grace for the primary to come
//! back first.

use std::time::Duration;

use twin_wire::GoodbyeReason;

/// How a session ended, as far as the decision is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndKind {
    /// Silence beyond the heartbeat timeout, EOF or a connection error, without a goodbye:
    /// what a dead primary (or its dead host) looks like.
    Lost,
    /// The primary said goodbye.
    Goodbye(GoodbyeReason),
    /// The primary sent what the protocol forbids, or a corrupt or unverifiable epoch, or
    /// the replica could not be written: the primary is alive and will run on without us.
    Abandoned,
    /// A newer session of the same VM arrived: its primary has left this one.
    Superseded,
    /// An operator asked for a planned switchover (`twin failover`).
    TakeoverRequested,
    /// This backup is shutting down.
    Stopping,
}

/// What the backup does next (the type is the control API's, so that the decision is
/// reported as it was taken).
pub use twin_api::Decision;

/// How long a backup that was stalled waits for the primary to come back before it takes
/// a lost connection for a dead primary. A primary that abandoned its backup starts a new
/// session after one second.
pub const STALL_GRACE: Duration = Duration::from_secs(3);

/// A gap in this process's running this long may have made the primary give up on this
/// backup: half the primary's default `--backup-timeout` (500 ms).
pub const SELF_STALL: Duration = Duration::from_millis(250);

/// How long after a stall a lost connection is still put down to it.
pub const STALL_MEMORY: Duration = Duration::from_secs(1);

/// The decision. `committed`: this session applied at least one epoch (the replica is a
/// failover image of what its primary released). `stalled`: this process was stopped or
/// starved recently enough to explain the loss.
pub fn decide(end: EndKind, committed: bool, stalled: bool) -> Decision {
    match end {
        EndKind::Stopping => Decision::Stop,
        EndKind::Goodbye(GoodbyeReason::Stopping) => Decision::Release,
        EndKind::Goodbye(GoodbyeReason::Handover) | EndKind::TakeoverRequested if committed => {
            Decision::TakeOver
        }
        EndKind::Lost if committed && stalled => Decision::Grace,
        EndKind::Lost if committed => Decision::TakeOver,
        // Everything else leaves a replica that may lack what the world has seen.
        EndKind::Lost
        | EndKind::Goodbye(_)
        | EndKind::TakeoverRequested
        | EndKind::Abandoned
        | EndKind::Superseded => Decision::Detach,
    }
}

/// How long a backup waits between claims while the arbiter does not answer.
pub const CLAIM_RETRY: Duration = Duration::from_millis(500);

/// The backup between sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standby {
    /// Waiting for a primary (with or without a replica; none it may fail over to).
    Waiting,
    /// A committed replica whose primary was lost right after this backup stalled: take
    /// over at `until` unless the same VM's primary starts a session first.
    Grace { until: std::time::Instant },
    /// Ready to take over, asking the arbiter for the VM first (next attempt at
    /// `next_try`): only the winner of its compare-and-swap may run it.
    Claiming { next_try: std::time::Instant },
    /// Take over now.
    TakeOver,
}

/// What a claim to the arbiter came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The VM is ours at the next generation.
    Won,
    /// Someone else (the primary, running on) claimed it since we saw the record.
    Lost,
    /// The arbiter did not answer: nobody decides; ask again.
    Unreachable,
}

/// Events between sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandbyEvent {
    /// A session ended with this decision.
    Decided(Decision),
    /// Time passed (`now`).
    Tick(std::time::Instant),
    /// The pinned VM's primary started a new session (a valid `Hello`): whatever the old
    /// replica was, its primary has moved on.
    SameVmHello,
    /// An operator asked for a takeover and the replica has a committed checkpoint.
    TakeoverRequested,
    /// The arbiter answered a claim (or did not).
    Claimed(ClaimOutcome),
}

impl Standby {
    /// The one transition function between sessions. With an `arbiter`, every way to a
    /// takeover passes through [`Standby::Claiming`].
    pub fn next(self, event: StandbyEvent, now: std::time::Instant, arbiter: bool) -> Standby {
        let take_over = if arbiter {
            Standby::Claiming { next_try: now }
        } else {
            Standby::TakeOver
        };
        match (self, event) {
            (_, StandbyEvent::Decided(Decision::TakeOver)) => take_over,
            (_, StandbyEvent::Decided(Decision::Grace)) => Standby::Grace {
                until: now + STALL_GRACE,
            },
            (_, StandbyEvent::Decided(_)) => Standby::Waiting,
            (Standby::Claiming { .. } | Standby::TakeOver, StandbyEvent::TakeoverRequested) => self,
            (_, StandbyEvent::TakeoverRequested) => take_over,
            (Standby::Grace { .. } | Standby::Claiming { .. }, StandbyEvent::SameVmHello) => {
                Standby::Waiting
            }
            (Standby::Grace { until }, StandbyEvent::Tick(t)) if t >= until => take_over,
            (Standby::Claiming { .. }, StandbyEvent::Claimed(ClaimOutcome::Won)) => {
                Standby::TakeOver
            }
            (Standby::Claiming { .. }, StandbyEvent::Claimed(ClaimOutcome::Lost)) => {
                Standby::Waiting
            }
            (Standby::Claiming { .. }, StandbyEvent::Claimed(ClaimOutcome::Unreachable)) => {
                Standby::Claiming {
                    next_try: now + CLAIM_RETRY,
                }
            }
            (s, _) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use GoodbyeReason as G;

    /// Every way a session can end, with and without a committed epoch and a stall, against
    /// the scenario of the fault suite (`tests/tests/faults.rs`) that drives it end to end.
    #[test]
    fn every_end_of_a_session() {
        use Decision::*;
        use EndKind::*;
        let cases: &[(EndKind, bool, bool, Decision, &str)] = &[
            // primary_killed_*: SIGKILL, EOF or silence after commits.
            (Lost, true, false, TakeOver, "primary_killed_mid_stream"),
            // primary_killed_during_initial_sync: nothing committed, nothing to run.
            (
                Lost,
                false,
                false,
                Detach,
                "primary_killed_during_initial_sync",
            ),
            // backup_stalled_past_the_primary_timeout: EOF right after our own stall.
            (
                Lost,
                true,
                true,
                Grace,
                "backup_stalled_past_the_primary_timeout",
            ),
            (
                Lost,
                false,
                true,
                Detach,
                "backup_stalled_7s (reconnect never described)",
            ),
            // Orderly stop of the VM (SIGTERM of twin protect).
            (
                Goodbye(G::Stopping),
                true,
                false,
                Release,
                "twin protect stopped",
            ),
            (
                Goodbye(G::Stopping),
                false,
                false,
                Release,
                "stopped during sync",
            ),
            // The primary abandons a session it cannot trust (proxy_corrupt_ack etc.).
            (
                Goodbye(G::Abandon),
                true,
                false,
                Detach,
                "proxy_corrupt_ack",
            ),
            (
                Goodbye(G::Abandon),
                true,
                true,
                Detach,
                "abandoned while we were stalled",
            ),
            // tap_deleted_while_running: the primary hands over.
            (
                Goodbye(G::Handover),
                true,
                false,
                TakeOver,
                "tap_deleted_while_running",
            ),
            (
                Goodbye(G::Handover),
                false,
                false,
                Detach,
                "handover before any commit",
            ),
            // A primary never sends Takeover; an unknown reason is not a reason to run.
            (
                Goodbye(G::Takeover),
                true,
                false,
                Detach,
                "takeover from a primary",
            ),
            (Goodbye(G::Other(99)), true, false, Detach, "future reason"),
            // proxy_corrupt_*, proxy_truncated_frame (the primary is alive).
            (Abandoned, true, false, Detach, "proxy_corrupt_frame_crc"),
            (Abandoned, true, true, Detach, "corrupt after a stall"),
            // backup_stall_with_health_probe / the primary reconnecting during a session.
            (
                Superseded,
                true,
                false,
                Detach,
                "superseded by a newer session",
            ),
            // twin failover.
            (
                TakeoverRequested,
                true,
                false,
                TakeOver,
                "planned switchover",
            ),
            (
                TakeoverRequested,
                false,
                false,
                Detach,
                "switchover without a commit",
            ),
            (Stopping, true, false, Stop, "backup SIGTERM"),
            (Stopping, false, true, Stop, "backup SIGTERM"),
        ];
        for &(end, committed, stalled, want, scenario) in cases {
            assert_eq!(
                decide(end, committed, stalled),
                want,
                "{scenario}: {end:?} committed={committed} stalled={stalled}"
            );
        }
    }

    #[test]
    fn only_a_lost_committed_session_can_start_a_takeover_on_its_own() {
        let ends = [
            EndKind::Lost,
            EndKind::Goodbye(G::Stopping),
            EndKind::Goodbye(G::Abandon),
            EndKind::Goodbye(G::Takeover),
            EndKind::Goodbye(G::Other(7)),
            EndKind::Abandoned,
            EndKind::Superseded,
            EndKind::Stopping,
        ];
        for end in ends {
            for stalled in [false, true] {
                let d = decide(end, false, stalled);
                assert!(
                    !matches!(d, Decision::TakeOver | Decision::Grace),
                    "{end:?} without a commit gave {d:?}"
                );
                let d = decide(end, true, stalled);
                if matches!(d, Decision::TakeOver | Decision::Grace) {
                    assert_eq!(end, EndKind::Lost, "{end:?} gave {d:?}");
                }
            }
        }
    }

    #[test]
    fn grace_ends_in_a_takeover_unless_the_same_vm_says_hello() {
        let t0 = Instant::now();
        let s = Standby::Waiting.next(StandbyEvent::Decided(Decision::Grace), t0, false);
        assert_eq!(
            s,
            Standby::Grace {
                until: t0 + STALL_GRACE
            }
        );
        // Time passes, not enough.
        let s = s.next(StandbyEvent::Tick(t0 + STALL_GRACE / 2), t0, false);
        assert!(matches!(s, Standby::Grace { .. }));
        // The grace runs out: take over.
        assert_eq!(
            s.next(StandbyEvent::Tick(t0 + STALL_GRACE), t0, false),
            Standby::TakeOver
        );
        // The same VM's primary comes back: no takeover.
        let back = s.next(StandbyEvent::SameVmHello, t0, false);
        assert_eq!(back, Standby::Waiting);
        assert_eq!(
            back.next(StandbyEvent::Tick(t0 + STALL_GRACE * 2), t0, false),
            Standby::Waiting
        );
        // An operator may cut the grace short.
        assert_eq!(
            s.next(StandbyEvent::TakeoverRequested, t0, false),
            Standby::TakeOver
        );
    }

    #[test]
    fn decisions_map_to_standby_states() {
        let t0 = Instant::now();
        for (d, want_takeover) in [
            (Decision::TakeOver, true),
            (Decision::Detach, false),
            (Decision::Release, false),
        ] {
            let s = Standby::Waiting.next(StandbyEvent::Decided(d), t0, false);
            assert_eq!(s == Standby::TakeOver, want_takeover, "{d:?}");
        }
        // A hello from the VM changes nothing when there is no grace.
        assert_eq!(
            Standby::Waiting.next(StandbyEvent::SameVmHello, t0, false),
            Standby::Waiting
        );
    }

    #[test]
    fn with_an_arbiter_every_takeover_is_claimed_first() {
        let t0 = Instant::now();
        let claiming = Standby::Claiming { next_try: t0 };
        // Each road to a takeover stops at the claim.
        assert_eq!(
            Standby::Waiting.next(StandbyEvent::Decided(Decision::TakeOver), t0, true),
            claiming
        );
        assert_eq!(
            Standby::Waiting.next(StandbyEvent::TakeoverRequested, t0, true),
            claiming
        );
        let grace = Standby::Waiting.next(StandbyEvent::Decided(Decision::Grace), t0, true);
        assert_eq!(
            grace.next(StandbyEvent::Tick(t0 + STALL_GRACE), t0, true),
            claiming
        );
        // Won: take over. Lost: the primary runs on; detach.
        assert_eq!(
            claiming.next(StandbyEvent::Claimed(ClaimOutcome::Won), t0, true),
            Standby::TakeOver
        );
        assert_eq!(
            claiming.next(StandbyEvent::Claimed(ClaimOutcome::Lost), t0, true),
            Standby::Waiting
        );
        // Unreachable: nobody decides; ask again later, and a live primary ends it.
        let retry = claiming.next(StandbyEvent::Claimed(ClaimOutcome::Unreachable), t0, true);
        assert_eq!(
            retry,
            Standby::Claiming {
                next_try: t0 + CLAIM_RETRY
            }
        );
        assert_eq!(
            retry.next(StandbyEvent::Tick(t0 + STALL_GRACE * 10), t0, true),
            retry,
            "no amount of waiting turns an unanswered claim into a takeover"
        );
        assert_eq!(
            retry.next(StandbyEvent::SameVmHello, t0, true),
            Standby::Waiting
        );
        // A claim result outside a claim changes nothing.
        assert_eq!(
            Standby::Waiting.next(StandbyEvent::Claimed(ClaimOutcome::Won), t0, true),
            Standby::Waiting
        );
    }
}
