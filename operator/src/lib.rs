//! `trellis-operator`: the cluster brain.
//!
//! ```text
//!  IPPool  NetworkConfig  Node  NodeNetwork (the record)  NetworkStatus
//!        │ controller: watches → stores → Snapshot     (only while the lease is ours)
//!        ▼
//!  plan ── ipam::allocate ──▶ desired::node_network_spec ──▶ NodeNetwork specs
//!       └─ status::* ────────▶ NodeNetwork / IPPool / NetworkConfig status, Events
//!        │ Plan (only what differs)
//!        ▼
//!  apply::Writer ── server-side apply, field manager "trellis-operator"
//! ```
//!
//! A second loop, `policy_controller`, rolls what the nodes report up into
//! `PolicyBundle.status` (`policy_status`: desired / realised / lagging
//! nodes, `Accepted`, `Realized`, `Conflicting`). A third,
//! `identity_gc_controller`, deletes the SecurityIdentities no
//! `NodeEndpoints` shard has named for a grace period (`identity_gc`).
//!
//! `ipam`, `desired`, `status`, `conditions`, `plan`, `policy_status` and
//! `identity_gc` are pure (values in, values out; no client, no clock: the
//! collection's "now" is an argument) and tested in microseconds;
//! `controller` and `apply` are the thin shell that does the I/O; `lease`
//! elects the one replica that writes; `ops` serves metrics and health.

pub mod apply;
/// Condition bookkeeping, shared with `trellis-node`.
pub use trellis_common::conditions;
pub mod controller;
pub mod desired;
pub mod identity_gc;
pub mod identity_gc_controller;
pub mod ipam;
pub mod lease;
pub mod ops;
pub mod plan;
pub mod policy_controller;
pub mod policy_status;
pub mod status;
#[cfg(test)]
mod test_support;
