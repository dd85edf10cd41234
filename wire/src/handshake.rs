//! The handshake: the primary sends [`Hello`]; the backup answers [`HelloAck`] or
//! [`Refuse`]. Both sides check the protocol version, so a mismatch produces a clear error
//! on each side rather than an undecodable checkpoint later.

use crate::message::{
    FrameType, Hello, HelloAck, Message, Refuse, RefuseReason, Role, VmId, PROTOCOL_VERSION,
    SOFTWARE_VERSION,
};
use tracing::warn;

/// What a backup accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptPolicy {
    /// The VM the backup serves; `None` accepts any VM (a fresh backup with no replica).
    pub vm_id: Option<VmId>,
    /// Lowest generation accepted: a backup that already served generation `g` refuses
    /// anything older than `g + 1`, so a stale primary cannot overwrite a newer replica.
    pub min_generation: u64,
}

/// The handshake failed on the primary's side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The backup refused the session.
    #[error("backup refused the session ({reason}): {detail}")]
    Refused {
        /// The backup's reason.
        reason: RefuseReason,
        /// The backup's explanation.
        detail: String,
    },
    /// The backup accepted but speaks another protocol version.
    #[error(
        "backup speaks protocol version {theirs} ({software}), ours is {ours} ({SOFTWARE_VERSION})"
    )]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The backup's version.
        theirs: u32,
        /// The backup's software version.
        software: String,
    },
    /// The backup acknowledged another VM or generation than we sent.
    #[error("backup acknowledged VM {got_vm} generation {got_generation}, we sent VM {sent_vm} generation {sent_generation}")]
    Mismatch {
        /// VM we sent.
        sent_vm: VmId,
        /// Generation we sent.
        sent_generation: u64,
        /// VM acknowledged.
        got_vm: VmId,
        /// Generation acknowledged.
        got_generation: u64,
    },
    /// The backup answered with something other than `HelloAck` or `Refuse`.
    #[error("expected HelloAck or Refuse, got {frame_type:?}")]
    Unexpected {
        /// What arrived.
        frame_type: FrameType,
    },
}

/// The `Refuse` a backup sends when a `Hello` of protocol version `theirs` did not even decode
/// (see `DecodeError::IncompatibleHello`).
pub fn refuse_incompatible(theirs: u32) -> Refuse {
    Refuse {
        reason: RefuseReason::VersionMismatch,
        detail: format!(
            "primary speaks protocol version {theirs}, backup speaks {PROTOCOL_VERSION} ({SOFTWARE_VERSION})"
        ),
    }
}

/// The backup's decision on a `Hello`: the `HelloAck` to send, or the `Refuse` to send before
/// closing. Refusals are logged here so that the backup's log names both versions.
pub fn accept_hello(policy: &AcceptPolicy, hello: &Hello) -> Result<HelloAck, Refuse> {
    let refuse = |reason, detail: String| {
        warn!(%reason, %detail, "refusing primary");
        Err(Refuse { reason, detail })
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return refuse(
            RefuseReason::VersionMismatch,
            format!(
                "primary speaks protocol version {} ({}), backup speaks {PROTOCOL_VERSION} ({SOFTWARE_VERSION})",
                hello.protocol_version, hello.software_version
            ),
        );
    }
    if hello.role != Role::Primary {
        return refuse(
            RefuseReason::WrongRole,
            format!(
                "peer announced role {:?}, a backup only accepts a primary",
                hello.role
            ),
        );
    }
    if let Some(vm_id) = policy.vm_id {
        if vm_id != hello.vm_id {
            return refuse(
                RefuseReason::VmMismatch,
                format!("backup serves VM {vm_id}, primary runs VM {}", hello.vm_id),
            );
        }
    }
    if hello.generation < policy.min_generation {
        return refuse(
            RefuseReason::StaleGeneration,
            format!(
                "generation {} is older than the {} this backup requires",
                hello.generation, policy.min_generation
            ),
        );
    }
    Ok(HelloAck {
        protocol_version: PROTOCOL_VERSION,
        software_version: SOFTWARE_VERSION.to_owned(),
        vm_id: hello.vm_id,
        generation: hello.generation,
    })
}

/// The primary's check of the backup's answer to `sent`.
pub fn check_hello_reply(sent: &Hello, reply: Message) -> Result<HelloAck, HandshakeError> {
    match reply {
        Message::HelloAck(ack) => {
            if ack.protocol_version != sent.protocol_version {
                return Err(HandshakeError::VersionMismatch {
                    ours: sent.protocol_version,
                    theirs: ack.protocol_version,
                    software: ack.software_version,
                });
            }
            if ack.vm_id != sent.vm_id || ack.generation != sent.generation {
                return Err(HandshakeError::Mismatch {
                    sent_vm: sent.vm_id,
                    sent_generation: sent.generation,
                    got_vm: ack.vm_id,
                    got_generation: ack.generation,
                });
            }
            Ok(ack)
        }
        Message::Refuse(r) => Err(HandshakeError::Refused {
            reason: r.reason,
            detail: r.detail,
        }),
        other => Err(HandshakeError::Unexpected {
            frame_type: other.frame_type(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{DecodeError, FrameCodec};
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    const VM: VmId = VmId([7; 16]);

    fn policy() -> AcceptPolicy {
        AcceptPolicy {
            vm_id: Some(VM),
            min_generation: 3,
        }
    }

    #[test]
    fn matching_hello_is_accepted_and_checked() {
        let hello = Hello::new(Role::Primary, VM, 3);
        let ack = accept_hello(&policy(), &hello).unwrap();
        assert_eq!(
            check_hello_reply(&hello, Message::HelloAck(ack.clone())),
            Ok(ack)
        );
    }

    #[test]
    fn version_mismatch_is_refused_with_both_versions_on_both_sides() {
        let mut hello = Hello::new(Role::Primary, VM, 3);
        hello.protocol_version = PROTOCOL_VERSION + 1;
        hello.software_version = "twin 9.9.9".into();
        let refuse = accept_hello(&policy(), &hello).unwrap_err();
        assert_eq!(refuse.reason, RefuseReason::VersionMismatch);
        assert!(refuse.detail.contains("twin 9.9.9"), "{}", refuse.detail);
        assert!(
            refuse.detail.contains(SOFTWARE_VERSION),
            "{}",
            refuse.detail
        );
        let err = check_hello_reply(&hello, Message::Refuse(refuse)).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::Refused {
                reason: RefuseReason::VersionMismatch,
                ..
            }
        ));
        assert!(err.to_string().contains("protocol version"), "{err}");
    }

    #[test]
    fn a_primary_of_protocol_3_is_refused_naming_both_versions() {
        // Protocol 4 added compressed pages; a primary of 3 cannot be served, nor a backup
        // of 3 serve this primary (it refuses our Hello the same way).
        let mut hello = Hello::new(Role::Primary, VM, 3);
        hello.protocol_version = 3;
        let refuse = accept_hello(&policy(), &hello).unwrap_err();
        assert_eq!(refuse.reason, RefuseReason::VersionMismatch);
        assert!(
            refuse.detail.contains("version 3") && refuse.detail.contains("speaks 4"),
            "{}",
            refuse.detail
        );
    }

    #[test]
    fn newer_ack_is_a_version_mismatch_for_the_primary() {
        let hello = Hello::new(Role::Primary, VM, 3);
        let mut ack = accept_hello(&policy(), &hello).unwrap();
        ack.protocol_version += 1;
        assert!(matches!(
            check_hello_reply(&hello, Message::HelloAck(ack)),
            Err(HandshakeError::VersionMismatch { .. })
        ));
    }

    #[test]
    fn undecodable_hello_of_another_version_is_reported_and_refusable() {
        // A future Hello: the next version followed by a layout we cannot read.
        let mut codec = FrameCodec::new();
        let future = PROTOCOL_VERSION + 1;
        let mut payload = future.to_le_bytes().to_vec();
        payload.push(0xff);
        let header = crate::frame::FrameHeader {
            frame_type: FrameType::Hello as u8,
            flags: 0,
            payload_len: payload.len() as u32,
            payload_crc: crate::frame::crc64(&payload),
        };
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&header.to_bytes());
        buf.extend_from_slice(&payload);
        match codec.decode(&mut buf) {
            Err(DecodeError::IncompatibleHello { protocol_version })
                if protocol_version == future => {}
            other => panic!("unexpected {other:?}"),
        }
        let refuse = refuse_incompatible(future);
        assert_eq!(refuse.reason, RefuseReason::VersionMismatch);
    }

    #[test]
    fn wrong_role_vm_and_generation_are_refused() {
        let r = accept_hello(&policy(), &Hello::new(Role::Backup, VM, 3)).unwrap_err();
        assert_eq!(r.reason, RefuseReason::WrongRole);
        let r = accept_hello(&policy(), &Hello::new(Role::Primary, VmId([1; 16]), 3)).unwrap_err();
        assert_eq!(r.reason, RefuseReason::VmMismatch);
        let r = accept_hello(&policy(), &Hello::new(Role::Primary, VM, 2)).unwrap_err();
        assert_eq!(r.reason, RefuseReason::StaleGeneration);
        let any = AcceptPolicy {
            vm_id: None,
            min_generation: 0,
        };
        assert!(accept_hello(&any, &Hello::new(Role::Primary, VmId([1; 16]), 0)).is_ok());
    }

    #[test]
    fn unexpected_reply_and_echo_mismatch() {
        let hello = Hello::new(Role::Primary, VM, 3);
        assert_eq!(
            check_hello_reply(&hello, Message::Ack(crate::message::Ack { epoch: 1 })),
            Err(HandshakeError::Unexpected {
                frame_type: FrameType::Ack
            })
        );
        let mut ack = accept_hello(&policy(), &hello).unwrap();
        ack.generation = 4;
        assert!(matches!(
            check_hello_reply(&hello, Message::HelloAck(ack)),
            Err(HandshakeError::Mismatch { .. })
        ));
    }
}
