//! `trellis-policy`: the one policy compiler (designs 0004, 0006). Pure
//! functions over values — no client, no I/O, no clock — shared by the
//! operator (identities) and the node (tables for its local endpoints).
//!
//! ```text
//!  NetworkPolicy ─┬─▶ cidr::CidrTable ── cidr_identity(addr) ──▶ IP cache (cidr_identity)
//!  PolicyBundle ──┤
//!                 │
//!  Pod+Namespace ─┼─▶ identity::SecurityLabels ─▶ IdentityInfo (id, labels, named ports)
//!    (objects)    │      └─ identity::allocate (stable hash, then probe) ─▶ SecurityIdentity
//!                 ▼
//!  compile::compile_endpoint(Input, LocalEndpoint)
//!                 │  Admin bundles → NetworkPolicy → Baseline bundles → default,
//!                 │  resolved at compile time; ports → port prefixes (ports)
//!                 ▼
//!  Compiled { EndpointPolicy { ingress, egress: DirectionTable }, Provenance, Diagnostics }
//!                 │                                        │
//!  trellis-node ──┘ writes trellis_policy / endpoints      └─ table::lookup: the BPF lookup, mirrored
//!
//!  reference::evaluate(Input, LocalEndpoint, direction, packet): the same
//!  semantics, slowly and directly, to check the tables against
//! ```
//!
//! - [`identity`]: reserved identities (`ANY` 0, `HOST` 1, `WORLD` 2, pods
//!   from 256, CIDRs from `0x0100_0000`), the label set that makes pods share
//!   an identity, named ports, and how a node numbers a new label set (0005:
//!   a stable hash names the first id to try, then the next ids are probed).
//! - [`objects`]: Pod + Namespace → label set and named ports;
//!   `SecurityIdentity` and `NodeEndpoints` named ports ⇄ the values above.
//! - [`cidr`]: one identity per distinct `ipBlock` prefix, and the longest
//!   prefix lookup the IP cache stores for every address.
//! - [`cluster`]: the [`Input`] from the cluster's objects (mode, policies,
//!   bundles, `SecurityIdentity`s, `NodeEndpoints` shards, IP pools), the one
//!   way every node and `kubectl trellis explain` build it.
//! - [`ports`]: protocols, the minimal aligned cover of a port range, and
//!   the fewest prefixes that give each port its verdict.
//! - [`table`]: the map keys and values of 0004 and [`table::lookup`], the
//!   exact order the datapath looks them up in.
//! - [`compile`]: NetworkPolicy and PolicyBundles → one endpoint's two
//!   tables, the provenance of every entry, and [`Diagnostic`]s for what
//!   cannot be enforced (never wider than written).
//! - [`bundle`]: the order of PolicyBundles, their subjects, how an entry
//!   names a bundle rule, [`bundle::conflicts`], and [`bundle::validate`]
//!   (what is wrong with one bundle whichever pods it meets).
//! - [`reference`](mod@reference): the reference evaluator.
//! - [`relevance`]: which identities one compilation depends on
//!   ([`IdentityDependencies`]), so that a node recompiles for a new,
//!   removed or changed identity only what it can change.
//! - [`selector`]: label selectors, from our CRDs and from Kubernetes.
//! - `fnv`: the one 64-bit FNV-1a behind every persisted hash (identity
//!   numbers, [`generation::policy_hash`]).
//!
//! Decisions worth knowing (see each module):
//! - `ipBlock` matches pod addresses too, through CIDR identities.
//! - Egress named ports resolve per destination identity (the union of the
//!   container ports of its pods); towards an `ipBlock` they cannot be
//!   enforced by a NetworkPolicy and match nothing (a warning). Ingress
//!   named ports resolve against the pod itself.
//! - An isolated pod always admits its own node (`HOST`), on every port,
//!   whatever a bundle says.

pub mod bundle;
pub mod cidr;
pub mod cluster;
pub mod compile;
pub mod diagnostic;
mod fnv;
pub mod generation;
pub mod identity;
pub mod objects;
pub mod ports;
pub mod reference;
pub mod relevance;
pub mod selector;
pub mod table;
#[cfg(test)]
mod test_support;

pub use bundle::{BundleOrigin, BundleTier, Conflict, conflicts};
pub use cidr::CidrTable;
pub use compile::{Compiled, Input, LocalEndpoint, Origin, Provenance, compile_endpoint};
pub use diagnostic::{Diagnostic, Problem, Severity, Source};
pub use identity::{
    IdentityInfo, IdentitySpaceFull, NamedPorts, SecurityLabels, allocate, preferred_identity,
};
pub use objects::ObjectError;
pub use ports::Protocol;
pub use relevance::IdentityDependencies;
pub use table::{Decision, Direction, DirectionTable, EndpointPolicy, lookup};
pub use trellis_api::v1alpha1::PolicyEnforcement;
