//! `kubectl-trellis`: the kubectl plugin of Trellis (`kubectl trellis …`
//! once the binary is on `PATH`).
//!
//! ```text
//!  apiserver ─(main.rs: list/get, as kubectl)─▶ explain::Objects
//!                                                   │ trellis_policy::cluster: the nodes' Input
//!                                                   ▼
//!  explain::explain (pure) ─▶ compile_endpoint ×2 ─▶ table::lookup + Provenance
//!                                                   │ reference::evaluate must agree
//!                                                   ▼
//!                               Explanation (text or JSON): egress, ingress, verdict
//! ```
//!
//! - [`explain`]: which rule lets a connection through or drops it, on
//!   both ends, computed by the one policy compiler from the same input the
//!   nodes build.

pub mod explain;
