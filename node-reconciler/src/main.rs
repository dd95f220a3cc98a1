//! `trellis-node`: the only writer of one node's network state.
//!
//! ```text
//!  own NodeNetwork + peers' NodeNetworks ──▶ desired ─┐
//!  netlink dumps + pinned BPF maps ───────▶ observed ─┴─▶ plan ──▶ [Op] ──▶ apply ──▶ report (NetworkStatus)
//! ```
//!
//! The reconciler arrives with the node-reconciler issue; until then this
//! binary only identifies itself.

fn main() {
    eprintln!(
        "trellis-node {}: the reconciler is not built yet (node reconciler issue)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
