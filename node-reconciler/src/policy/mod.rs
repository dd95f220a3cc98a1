//! Compiled policy → the contents of the datapath's maps, and the ordered
//! writes that get them there without a packet ever seeing a half-written
//! table (docs/design/0004, decision 5).
//!
//! ```text
//!  World { Input, locals, remote pods, host addrs }      Datapath maps (pinned)
//!        │                                                     │ dump (start, periodic resync)
//!        ▼                                                     ▼
//!  desired::desired(world, &installed.ids()) ◀── PolicyIds ── sync::Installed (mirror)
//!        │  compile once per (labels, named ports)              ▲          │
//!        │  equal tables share one id; installed ids kept       │          │
//!        ▼                                                      │          │
//!  Desired { endpoints, tables, ipcache, compiled, conflicts }   │          │
//!        └──────────────▶ sync::plan(desired, installed) ◀──────┼──────────┘
//!                               │ [MapOp]: ipcache ▸ new tables ▸ endpoints
//!                               ▼          ▸ gone endpoints ▸ old tables ▸ old ipcache
//!                         sync::apply(maps, &mut installed, ops) ─▶ failures (the rest still ran)
//! ```
//!
//! Around them: [`cluster`] holds the node's watches (NetworkPolicies,
//! PolicyBundles, IP pools, namespaces, identities, the nodes' endpoint
//! shards, this node's pods), and [`engine`] ties everything to the pods' lifecycle: CNI ADD is answered
//! only once the pod's identity and policy are in the maps and the programs
//! are on its veth ("no traffic before policy"); every change of the caches
//! syncs the maps again.
//!
//! The engine does not compute the IP cache from scratch: [`shards`] hands
//! it the shards that changed, and [`ipcache::IpCacheIndex`] keeps the
//! cache claim by claim (the rules of [`desired::desired`], held equal to
//! it by `tests/ipcache_index.rs`), so a sync plans only the keys that
//! changed ([`sync::plan_with`]).
//!
//! [`desired`] is pure. [`sync`] holds the mirror of what the maps contain,
//! the pure [`sync::plan`] and the executor [`sync::apply`], which writes
//! through the small [`sync::PolicyMaps`] trait ([`crate::bpf::Datapath`]
//! in production, a recording fake in unit tests) and keeps the mirror
//! equal to the maps op by op.

pub mod cluster;
pub mod desired;
pub mod engine;
pub mod ipcache;
pub mod shards;
pub mod sync;
/// Test support, not an API: the builders of the unit tests of `desired`
/// and `sync`, which the integration tests (`tests/policy_maps.rs`) build
/// their worlds with too. Public, and hidden from the docs, because an
/// integration test sees the crate only as any user does; a cargo feature
/// instead would need this crate as its own dev-dependency, or leave
/// `cargo test -p trellis-node` silently skipping the tests that need it.
/// (As `trellis_common::ops::testing` does.)
#[doc(hidden)]
pub mod testing;
