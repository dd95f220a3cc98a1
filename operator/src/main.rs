//! `trellis-operator`: the cluster brain.
//!
//! ```text
//!  IPPool  NetworkConfig  Node ──▶ ipam ──▶ NodeNetwork (one per node)
//!  Pod  Namespace  NetworkPolicy  PolicyBundle ──▶ identity + policy ──▶ compiled rules
//!  NetworkStatus ×N ──▶ rollup ──▶ IPPool / PolicyBundle / NetworkConfig status
//! ```
//!
//! The controllers arrive with the IPAM issue; until then this binary only
//! identifies itself so that packaging and manifests can refer to it.

fn main() {
    eprintln!(
        "trellis-operator {}: controllers are not built yet (IPAM issue)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
