//! The eBPF policy datapath: the C programs of `node-reconciler/bpf/`, their
//! maps, and the node's only way to load, attach and write them.
//!
//! ```text
//!  trellis-policy tables ─┐                       pod netns │ node netns
//!  identities, IP cache ──┼─▶ Datapath ──maps──▶  eth0 ──veth──▶ trellisXXXXXXXX
//!  endpoints (ifindex) ───┘      │                          │   tcx/clsact ingress: trellis_from_pod (pod egress)
//!                                └─attach (node netns)──────┼─▶ tcx/clsact egress:  trellis_to_pod   (pod ingress)
//!                                                           │
//!  <bpffs-root>/v1/  trellis_endpoints trellis_ipcache trellis_policy trellis_ct trellis_frags trellis_counters
//!  <bpffs-root>/v1/links/<ifname>_from_pod, <ifname>_to_pod   (TCX links, so they outlive the process)
//! ```
//!
//! [`abi`] is the byte layout shared with the C header (docs/design/0004);
//! [`Datapath`] loads the object (pinned, or private for tests and
//! benchmarks), gives typed access to the maps, runs programs on
//! synthetic packets ([`Datapath::test_run`]), and attaches them in a
//! node's namespace (TCX first, clsact as the fallback) so that restarts
//! and upgrades never leave a pod without policy. Every packet of an
//! interface without an endpoint entry is dropped: attach first or write
//! first, traffic never passes before policy.

pub mod abi;
mod attach;
mod datapath;
mod error;

pub use attach::{AttachMode, Attachment, CLSACT_HANDLE, CLSACT_PRIORITY, Hook, LinkChange};
pub use datapath::{Counters, Datapath, MAPS, Program, Verdict};
pub use error::BpfError;
