//! The trellis CNI plugin: a thin client of `trellis-node`.
//!
//! ```text
//!  runtime ──CNI_* env──▶ env ─────┐
//!          ──stdin──────▶ config ──┴─▶ invocation::parse ──▶ Invocation
//!                                                              │ request()
//!                          client (unix socket, proto) ◀───────┘
//!                                   │ Response
//!          ◀──stdout── plugin::execute ──▶ result (ADD, CHECK) / error (every failure)
//! ```
//!
//! Parsing (`env`, `config`, `result`, `invocation`) is pure, so unit tests
//! and the fuzzer (`cni/fuzz`) drive it without a process or a socket;
//! `client` is the only module that does I/O, behind the `Transport` trait.
//! `proto` is the wire protocol, shared with `trellis-node`; `runtime` runs
//! the binary the way a container runtime does, for tests.

pub mod client;
pub mod config;
pub mod env;
pub mod error;
pub mod invocation;
pub mod plugin;
pub mod proto;
pub mod result;
pub mod runtime;

pub use error::{Error, ErrorResult, Failure};
pub use invocation::{Invocation, parse};
