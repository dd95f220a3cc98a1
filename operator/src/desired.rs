//! The desired `NodeNetwork` spec of one node, from its blocks, its
//! addresses and the cluster's `NetworkConfig`.

use std::net::IpAddr;

use ipnet::IpNet;
use trellis_api::v1alpha1::{Encapsulation, NetworkConfigSpec, NodeNetworkSpec, Vtep};

/// What the spec needs from the `Node` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddresses {
    pub name: String,
    /// `status.addresses` of type `InternalIP`, in the Node's order.
    pub internal_ips: Vec<IpAddr>,
}

impl NodeAddresses {
    /// The underlay address: the first IPv4 InternalIP, else the first IPv6
    /// one. (VXLAN here runs over IPv4 underlays first: its overhead and the
    /// Flannel-compatible defaults assume it.)
    pub fn underlay(&self) -> Option<IpAddr> {
        let v4 = self.internal_ips.iter().find(|a| a.is_ipv4());
        v4.or_else(|| self.internal_ips.first()).copied()
    }
}

/// The spec, or `None` when the node has no usable address yet and none was
/// recorded before (a `NodeNetwork` cannot exist without one).
pub fn node_network_spec(
    node: &NodeAddresses,
    previous_underlay: Option<&str>,
    blocks: &[IpNet],
    config: &NetworkConfigSpec,
) -> Option<NodeNetworkSpec> {
    let underlay = match node.underlay() {
        Some(addr) => addr.to_string(),
        // A Node briefly without addresses keeps its record rather than
        // losing its blocks.
        None => previous_underlay?.to_owned(),
    };
    let vxlan = config.encapsulation == Encapsulation::Vxlan;
    let first = |v4: bool| {
        blocks
            .iter()
            .find(|b| matches!(b, IpNet::V4(_)) == v4)
            .map(|b| b.network().to_string())
    };
    Some(NodeNetworkSpec {
        pod_cidrs: blocks.iter().map(ToString::to_string).collect(),
        underlay_address: underlay,
        encapsulation: config.encapsulation,
        vxlan: vxlan.then_some(config.vxlan),
        vtep: vxlan.then(|| Vtep {
            mac: vtep_mac(&node.name),
            ipv4: first(true),
            ipv6: first(false),
        }),
        mtu: config.mtu,
    })
}

/// A stable, locally administered unicast MAC for the node's VXLAN device:
/// 46 bits of a FNV-1a hash of the node name. Stable across restarts and
/// address changes; among 5,000 nodes the chance of any collision is about
/// 2·10⁻⁷.
pub fn vtep_mac(node: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    // Bit 1 of the first octet: locally administered; bit 0 clear: unicast.
    let first = (b[0] & 0xfc) | 0x02;
    format!(
        "{first:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[1], b[2], b[3], b[4], b[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::v1alpha1::VxlanConfig;

    fn node(ips: &[&str]) -> NodeAddresses {
        NodeAddresses {
            name: "trellis-node-1".into(),
            internal_ips: ips.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn nets(cidrs: &[&str]) -> Vec<IpNet> {
        cidrs.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn vxlan_node_gets_vtep_on_its_first_block_addresses() {
        let spec = node_network_spec(
            &node(&["fd00::b", "192.0.2.11"]),
            None,
            &nets(&["10.244.3.0/24", "fd00:10:244::300/120"]),
            &NetworkConfigSpec::default(),
        )
        .unwrap();
        assert_eq!(
            spec.underlay_address, "192.0.2.11",
            "IPv4 InternalIP preferred"
        );
        assert_eq!(spec.pod_cidrs, ["10.244.3.0/24", "fd00:10:244::300/120"]);
        assert_eq!(spec.vxlan, Some(VxlanConfig { vni: 1, port: 8472 }));
        let vtep = spec.vtep.unwrap();
        assert_eq!(vtep.ipv4.as_deref(), Some("10.244.3.0"));
        assert_eq!(vtep.ipv6.as_deref(), Some("fd00:10:244::300"));
        assert_eq!(vtep.mac, vtep_mac("trellis-node-1"));
        assert_eq!(spec.mtu, None, "auto MTU unless configured");
    }

    #[test]
    fn native_routing_has_no_tunnel_fields_and_keeps_the_mtu() {
        let config = NetworkConfigSpec {
            encapsulation: Encapsulation::None,
            mtu: Some(1500),
            ..Default::default()
        };
        let spec = node_network_spec(
            &node(&["192.0.2.11"]),
            None,
            &nets(&["10.244.3.0/24"]),
            &config,
        )
        .unwrap();
        assert_eq!((spec.vxlan, spec.vtep, spec.mtu), (None, None, Some(1500)));
    }

    #[test]
    fn a_node_without_addresses_keeps_its_recorded_underlay_or_waits() {
        let config = NetworkConfigSpec::default();
        let spec = node_network_spec(&node(&[]), Some("192.0.2.11"), &[], &config).unwrap();
        assert_eq!(spec.underlay_address, "192.0.2.11");
        assert!(node_network_spec(&node(&[]), None, &[], &config).is_none());
    }

    #[test]
    fn vtep_macs_are_locally_administered_unicast_and_distinct() {
        let macs: std::collections::BTreeSet<String> =
            (0..5000).map(|i| vtep_mac(&format!("node-{i}"))).collect();
        assert_eq!(macs.len(), 5000, "no collisions among 5000 nodes");
        for mac in &macs {
            let first = u8::from_str_radix(&mac[..2], 16).unwrap();
            assert_eq!(first & 0b11, 0b10, "{mac}: locally administered, unicast");
            assert_eq!(mac.len(), 17);
        }
    }
}
