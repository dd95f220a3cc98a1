//! `trellis-operator`: the cluster brain.
//!
//! ```text
//!  IPPool  NetworkConfig  Node  NodeNetwork (the record)
//!        │ watch
//!        ▼
//!  ipam::allocate ──▶ desired::node_network_spec ──▶ NodeNetwork (one per node)
//!        └──────────▶ status::pool_conditions ─────▶ IPPool.status, Events
//! ```
//!
//! The modules above are pure (values in, values out; no client, no clock)
//! and tested in microseconds; a thin controller shell does the I/O.

pub mod conditions;
pub mod desired;
pub mod ipam;
pub mod selector;
pub mod status;
