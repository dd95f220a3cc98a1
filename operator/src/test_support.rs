//! Builders shared by the operator's unit tests.

use trellis_api::v1alpha1::{NodeEndpoints, NodeEndpointsSpec, PodEndpoint};

/// Node `node`'s shard, with one pod per identity of `ids` (as written,
/// numbers the schema would refuse included).
pub fn mk_shard(node: &str, ids: &[i32]) -> NodeEndpoints {
    NodeEndpoints::new(
        node,
        NodeEndpointsSpec {
            endpoints: ids
                .iter()
                .enumerate()
                .map(|(i, id)| PodEndpoint {
                    namespace: "shop".into(),
                    name: format!("{node}-pod-{i}"),
                    addresses: vec![format!("10.244.0.{}", i + 2)],
                    identity: *id,
                    named_ports: vec![],
                })
                .collect(),
        },
    )
}
