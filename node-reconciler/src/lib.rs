//! `trellis-node`: the only writer of one node's network state.
//!
//! ```text
//!  own NodeNetwork + peers' NodeNetworks + host facts ──▶ desired ─┐
//!  netlink dumps, filtered to what Trellis owns ────────▶ observed ─┴─▶ plan ──▶ [Op] ──▶ apply ──▶ report
//!                                        agent ──NodeFacts (blocks, pod MTU, ready)──▶ endpoint ◀── CNI binary (unix socket)
//!                                        agent ──the node's addresses (HOST)──▶ policy::engine
//! ```
//!
//! `model`, `desired` and `plan` are pure (values in, values out) and
//! unit-tested. `netns` runs work inside a node's network namespace on a
//! dedicated thread (setns, never `ip netns exec`); `observe` dumps links,
//! addresses, routes, neighbour and FDB entries there, keeping only what
//! Trellis owns; `apply` executes the planned ops with replace semantics;
//! `report` (pure) turns the outcome into the node's `NetworkStatus`;
//! `agent` is the loop that ties them to the apiserver and to netlink
//! notifications (`wake`, pure, says which of those can matter to it), and
//! publishes the node's facts (blocks, pod MTU, readiness) to `endpoint`,
//! which serves the CNI plugin: pod addresses, veths and their routes, on a
//! unix socket; it also publishes the node's addresses to the policy engine
//! (traffic from them is `HOST`). `bpf` is the policy datapath:
//! it loads the C programs of `bpf/` (compiled by build.rs), attaches them
//! to pods' host veths and writes their maps; `policy` turns compiled
//! NetworkPolicy tables into those maps' contents (pure) and writes them in
//! an order that never exposes a half-written table.

pub mod agent;
pub mod apply;
pub mod bpf;
pub mod desired;
pub mod endpoint;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod observe;
pub mod plan;
pub mod policy;
pub mod report;
pub mod wake;
