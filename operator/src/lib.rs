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
//! `ipam`, `desired`, `status`, `conditions` and `plan` are pure
//! (values in, values out; no client, no clock) and tested in microseconds;
//! `controller` and `apply` are the thin shell that does the I/O; `lease`
//! elects the one replica that writes; `ops` serves metrics and health.

pub mod apply;
/// Condition bookkeeping, shared with `trellis-node`.
pub use trellis_common::conditions;
pub mod controller;
pub mod desired;
pub mod ipam;
pub mod lease;
pub mod ops;
pub mod plan;
pub mod status;
