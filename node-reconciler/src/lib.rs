//! `trellis-node`: the only writer of one node's network state.
//!
//! ```text
//!  own NodeNetwork + peers' NodeNetworks + host facts ──▶ desired ─┐
//!  netlink dumps, filtered to what Trellis owns ────────▶ observed ─┴─▶ plan ──▶ [Op] ──▶ apply ──▶ report
//! ```
//!
//! `model`, `desired` and `plan` are pure (values in, values out) and
//! unit-tested; the netlink `observed`/`apply` layer and the `NetworkStatus`
//! report build on them.

pub mod desired;
pub mod model;
pub mod plan;
