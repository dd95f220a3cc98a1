//! Trellis API: the custom resources platform teams declare and the objects
//! Trellis derives from them (group `network.trellis.dev`, `v1alpha1`).
//!
//! ```text
//!  platform team ──▶ NetworkConfig  IPPool  PolicyBundle   (+ NetworkPolicy, Node, Pod)
//!                                 │
//!                        trellis-operator ──▶ NodeNetwork (one per node, desired)
//!                                 │
//!                        trellis-node ──┬───▶ NetworkStatus (one per node, observed)
//!                                       ├───▶ NodeEndpoints (one per node: its pods'
//!                                       │     addresses, identities, named ports)
//!                                       └───▶ SecurityIdentity (one per pod label set)
//! ```
//!
//! Types only: this crate re-exports `kube` and `k8s-openapi` so the other
//! crates name one version of each (`trellis_api::k8s::api::core::v1::Node`).
//! The schemas carry the validation (OpenAPI bounds and CEL rules) so the
//! apiserver refuses bad input before any controller sees it; [`crds`]
//! renders the CustomResourceDefinitions that `crdgen` writes to `config/crd/`.

// kube's `printcolumn(name = …, type_ = …)` repeats argument names across
// columns by design; clippy reads that as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub use k8s_openapi as k8s;
pub use kube;

pub mod crds;
pub mod v1alpha1;
