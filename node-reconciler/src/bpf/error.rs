//! What can go wrong loading, attaching and writing the policy datapath,
//! with the map, interface or path it concerns and the errno.

use std::io;
use std::path::PathBuf;

use aya::maps::MapError;
use aya::pin::PinError;
use aya::programs::links::LinkError;
use aya::programs::{ProgramError, tc::TcError};
use nix::errno::Errno;

use crate::netns::NetnsError;

/// A failed datapath operation.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot prepare the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not on a bpffs, so maps and links pinned there would not survive \
         (mount one: mount -t bpf bpffs /sys/fs/bpf)"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot load the policy object (maps pinned in {pin_dir:?}): {source}")]
    Load {
        /// `<dir>/v1` of a pinned load.
        pin_dir: Option<PathBuf>,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the policy object has no {what} {name}: it was built from other sources")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error(
        "map {map} does not have the layout this version expects \
         (a pinned map of an older layout? bump the pin version): {source}"
    )]
    MapLayout {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("the kernel refused program {program}: {source}")]
    Verify {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{op} {key} in map {map}: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        key: String,
        errno: Option<Errno>,
        #[source]
        source: Box<MapError>,
    },
    #[error("attach {program} to {ifname} ({hook}) in {namespace}: {source}")]
    Attach {
        program: &'static str,
        ifname: String,
        hook: &'static str,
        namespace: String,
        errno: Option<Errno>,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detach {program} from {ifname} in {namespace}: {source}")]
    Detach {
        program: &'static str,
        ifname: String,
        namespace: String,
        errno: Option<Errno>,
        #[source]
        source: Box<TcError>,
    },
    #[error("add the clsact qdisc to {ifname} in {namespace}: {source}")]
    Clsact {
        ifname: String,
        namespace: String,
        errno: Option<Errno>,
        #[source]
        source: Box<TcError>,
    },
    #[error("{context}: {source}")]
    Link {
        context: String,
        errno: Option<Errno>,
        #[source]
        source: Box<LinkError>,
    },
    #[error("pin the link of {program} on {ifname} at {path}: {source}")]
    PinLink {
        program: &'static str,
        ifname: String,
        path: PathBuf,
        #[source]
        source: Box<PinError>,
    },
    #[error("remove the pinned link {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("interface name {0:?} cannot name a link pin: bpffs refuses names with '.'")]
    InterfaceName(String),
    #[error("the namespace thread attaching to {ifname} panicked")]
    Thread { ifname: String },
    #[error("test run of {program}: {source}")]
    TestRun {
        program: &'static str,
        errno: Option<Errno>,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("read the counters: {source}")]
    Counters {
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "endpoint ifindex {ifindex} not switched to policy table {policy}: the table \
         is not completely written (see the failure before)"
    )]
    TableIncomplete { policy: u32, ifindex: u32 },
    #[error(
        "policy table {policy} not removed: endpoint ifindex {ifindex} still uses it \
         (its switch to another table failed)"
    )]
    TableInUse { policy: u32, ifindex: u32 },
    #[error(transparent)]
    Netns(Box<NetnsError>),
}

impl From<NetnsError> for BpfError {
    fn from(e: NetnsError) -> BpfError {
        BpfError::Netns(Box::new(e))
    }
}

impl BpfError {
    /// The errno the kernel answered, where there was one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            BpfError::Map { errno, .. }
            | BpfError::Attach { errno, .. }
            | BpfError::Detach { errno, .. }
            | BpfError::Clsact { errno, .. }
            | BpfError::Link { errno, .. }
            | BpfError::TestRun { errno, .. } => *errno,
            BpfError::PinDir { source, .. } | BpfError::Unpin { source, .. } => {
                source.raw_os_error().map(Errno::from_raw)
            }
            _ => None,
        }
    }
}

pub(crate) fn io_errno(e: &io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw)
}

pub(crate) fn map_errno(e: &MapError) -> Option<Errno> {
    match e {
        MapError::SyscallError(s) => io_errno(&s.io_error),
        MapError::IoError(e) | MapError::CreateError { io_error: e, .. } => io_errno(e),
        MapError::KeyNotFound | MapError::ElementNotFound => Some(Errno::ENOENT),
        _ => None,
    }
}

pub(crate) fn tc_errno(e: &TcError) -> Option<Errno> {
    match e {
        TcError::NetlinkError(n) => n.raw_os_error().map(Errno::from_raw),
        TcError::IoError(e) => io_errno(e),
        TcError::AlreadyAttached => Some(Errno::EEXIST),
        _ => None,
    }
}

pub(crate) fn program_errno(e: &ProgramError) -> Option<Errno> {
    match e {
        ProgramError::SyscallError(s) => io_errno(&s.io_error),
        ProgramError::LoadError { io_error, .. } | ProgramError::IOError(io_error) => {
            io_errno(io_error)
        }
        ProgramError::TcError(t) => tc_errno(t),
        ProgramError::NetlinkError(n) => n.raw_os_error().map(Errno::from_raw),
        ProgramError::MapError(m) => map_errno(m),
        _ => None,
    }
}

pub(crate) fn link_errno(e: &LinkError) -> Option<Errno> {
    match e {
        LinkError::SyscallError(s) => io_errno(&s.io_error),
        _ => None,
    }
}
