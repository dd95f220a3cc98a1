//! The trellis CNI plugin: a thin client of `trellis-node`.
//!
//! ```text
//!  runtime ──(CNI_* env + config on stdin)──▶ trellis ──(unix socket, proto)──▶ trellis-node
//!          ◀──(result or error JSON)─────────
//! ```
//!
//! `proto` is the wire protocol, shared with `trellis-node`.

pub mod proto;
