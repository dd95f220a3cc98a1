//! `network.trellis.dev/v1alpha1`.

mod common;
mod ip_pool;
mod network_config;
mod network_status;
mod node_endpoints;
mod node_network;
mod policy_bundle;
mod security_identity;

pub use common::*;
pub use ip_pool::*;
pub use network_config::*;
pub use network_status::*;
pub use node_endpoints::*;
pub use node_network::*;
pub use policy_bundle::*;
pub use security_identity::*;

/// The API group of every Trellis kind.
pub const GROUP: &str = "network.trellis.dev";
/// The API version of this module's kinds.
pub const VERSION: &str = "v1alpha1";
