//! What `trellis-operator` and `trellis-node` share: the ops endpoints
//! (`/metrics`, `/healthz`, `/readyz`), status-condition bookkeeping, and the
//! process plumbing every Trellis daemon has (logging, kube client, signals).

pub mod conditions;
pub mod ops;
pub mod process;
pub mod versions;
