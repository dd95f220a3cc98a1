//! Why an endpoint request failed, and the one mapping to the CNI spec's
//! error codes.

use trellis_cni::proto::{Attachment, ErrorReply, code};

use super::datapath::DatapathError;
use super::store::StoreError;
use crate::netns::NetnsError;

/// An endpoint request that failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// `CNI_CONTAINERID` or `CNI_IFNAME` the spec does not allow.
    #[error("{0}")]
    InvalidAttachment(String),
    /// The node cannot serve ADD yet (no facts, no block, no MTU).
    #[error("{0}")]
    NotReady(String),
    /// `CNI_NETNS` cannot be entered.
    #[error("cannot enter the pod's network namespace {path}: {reason}")]
    Netns { path: String, reason: String },
    /// CHECK of an attachment with no record.
    #[error("no endpoint for container {} interface {}", .0.container_id, .0.ifname)]
    Unknown(Attachment),
    /// The host veth name derived from this attachment is another
    /// endpoint's (a hash collision).
    #[error(
        "host veth {name} (derived from container {} interface {}) already belongs to container \
         {} interface {}",
        wanted.container_id, wanted.ifname, held.container_id, held.ifname
    )]
    LinkClash {
        name: String,
        held: Attachment,
        wanted: Attachment,
    },
    /// CHECK found the kernel differing from the record.
    #[error("the endpoint differs from its record: {}", .0.join("; "))]
    Mismatch(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// A blocking task panicked or was cancelled.
    #[error("{what} did not finish: {reason}")]
    Task { what: &'static str, reason: String },
    /// An ADD that failed, and what its rollback could not undo (the record
    /// stays, so DEL, GC or a restart finishes the job).
    #[error("{cause}{}", rollback_note(.rollback))]
    RolledBack {
        cause: Box<EndpointError>,
        rollback: Vec<String>,
    },
    /// The endpoint's policy could not be put in force (or taken out); a
    /// `transient` one (the cluster's view not synced yet, the apiserver
    /// unreachable) is worth retrying.
    #[error("policy: {reason}")]
    Policy { reason: String, transient: bool },
    /// Something GC or recovery could not clean up.
    #[error("{0}")]
    Leftover(String),
    /// Teardown steps that failed (DEL, GC); the others still ran.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<EndpointError>),
}

fn rollback_note(rollback: &[String]) -> String {
    if rollback.is_empty() {
        String::new()
    } else {
        format!(
            " (rolling back also failed, the record is kept for DEL or GC: {})",
            rollback.join("; ")
        )
    }
}

impl EndpointError {
    /// The CNI error code (see [`code`]).
    pub fn code(&self) -> u32 {
        match self {
            EndpointError::InvalidAttachment(_) => code::INVALID_ENVIRONMENT,
            EndpointError::NotReady(_) => code::TRY_AGAIN_LATER,
            EndpointError::Netns { .. } | EndpointError::Unknown(_) => code::UNKNOWN_CONTAINER,
            EndpointError::Mismatch(_) => code::ENDPOINT_MISMATCH,
            EndpointError::Store(StoreError::Exhausted(_)) => code::ADDRESSES_EXHAUSTED,
            EndpointError::Store(StoreError::Io { .. }) => code::IO_FAILURE,
            EndpointError::Store(_)
            | EndpointError::Datapath(_)
            | EndpointError::LinkClash { .. }
            | EndpointError::Leftover(_)
            | EndpointError::Task { .. } => code::INTERNAL,
            EndpointError::Policy {
                transient: true, ..
            } => code::TRY_AGAIN_LATER,
            EndpointError::Policy {
                transient: false, ..
            } => code::INTERNAL,
            EndpointError::RolledBack { cause, .. } => cause.code(),
            EndpointError::Several(errors) => match errors.as_slice() {
                [one] => one.code(),
                _ => code::INTERNAL,
            },
        }
    }

    /// The spec's error object.
    pub fn reply(&self) -> ErrorReply {
        ErrorReply::new(self.code(), self.to_string(), "")
    }

    pub(crate) fn netns(path: &str, e: &NetnsError) -> Self {
        let reason = match e {
            NetnsError::Open { source, .. } => source.to_string(),
            NetnsError::Enter { source, .. } => {
                format!("{source} (is it a network namespace?)")
            }
            other => other.to_string(),
        };
        EndpointError::Netns {
            path: path.to_owned(),
            reason,
        }
    }

    pub(crate) fn task(what: &'static str, e: &tokio::task::JoinError) -> Self {
        EndpointError::Task {
            what,
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::ipam::{Exhausted, Family};

    #[test]
    fn errors_map_to_the_spec_codes() {
        let exhausted = EndpointError::Store(StoreError::Exhausted(Exhausted {
            family: Family::V4,
            blocks: vec!["10.244.1.0/30".parse().expect("a block")],
        }));
        assert_eq!(exhausted.code(), 100);
        assert!(exhausted.reply().msg.contains("10.244.1.0/30"));
        let netns = EndpointError::Netns {
            path: "/run/netns/gone".into(),
            reason: "No such file or directory (os error 2)".into(),
        };
        assert_eq!(netns.code(), 3);
        assert!(netns.to_string().contains("/run/netns/gone"));
        assert_eq!(EndpointError::NotReady("x".into()).code(), 11);
        assert_eq!(EndpointError::Mismatch(vec!["a".into()]).code(), 101);
        assert_eq!(EndpointError::InvalidAttachment("x".into()).code(), 4);
        let rolled = EndpointError::RolledBack {
            cause: Box::new(netns),
            rollback: vec!["delete link x: EBUSY".into()],
        };
        assert_eq!(rolled.code(), 3);
        assert!(rolled.to_string().contains("record is kept"), "{rolled}");
    }
}
