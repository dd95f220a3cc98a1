//! Every sample under `config/samples/` that is one of our kinds must
//! deserialize into the Rust types, so the docs' examples and the code that
//! reads them agree. (That the apiserver accepts them is the e2e suite's job.)

use std::path::PathBuf;

use serde::Deserialize;
use trellis_api::v1alpha1::{
    Encapsulation, IPPool, NetworkConfig, NetworkStatus, NodeEndpoints, NodeNetwork, PolicyBundle,
    Protocol, RuleAction, SecurityIdentity,
};

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../config/samples")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("YAML document"))
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(file: &str) -> Vec<T> {
    documents(file)
        .into_iter()
        .map(|v| serde_yaml::from_value(v).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

#[test]
fn network_config_sample_is_the_defaults() {
    let [config]: [NetworkConfig; 1] = one("network.trellis.dev_v1alpha1_networkconfig.yaml")
        .try_into()
        .expect("one doc");
    assert_eq!(config.metadata.name.as_deref(), Some("default"));
    assert_eq!(config.spec.encapsulation, Encapsulation::Vxlan);
    assert_eq!(config.spec.vxlan.vni, 1);
    assert_eq!(config.spec.vxlan.port, 8472);
    // An empty spec means the same thing as the sample, field by field.
    let empty: NetworkConfig = serde_yaml::from_str(
        "apiVersion: network.trellis.dev/v1alpha1\nkind: NetworkConfig\nmetadata: {name: default}\nspec: {}\n",
    )
    .expect("empty spec");
    assert_eq!(empty.spec, config.spec);
}

#[test]
fn ip_pool_samples_parse() {
    let pools: Vec<IPPool> = one("network.trellis.dev_v1alpha1_ippool.yaml");
    assert_eq!(pools.len(), 2);
    assert_eq!(pools[0].spec.cidr, "10.244.0.0/16");
    assert_eq!(pools[1].spec.block_size, 120);
    assert_eq!(
        pools[1].spec.node_selector.match_labels["trellis.dev/dual-stack"],
        "true"
    );
}

#[test]
fn policy_bundle_sample_parses_in_order() {
    let [bundle]: [PolicyBundle; 1] = one("network.trellis.dev_v1alpha1_policybundle.yaml")
        .try_into()
        .expect("one doc");
    let actions: Vec<_> = bundle.spec.ingress.iter().map(|r| r.action).collect();
    assert_eq!(actions, [RuleAction::Allow, RuleAction::Deny]);
}

#[test]
fn node_network_and_status_samples_parse() {
    let [node]: [NodeNetwork; 1] = one("network.trellis.dev_v1alpha1_nodenetwork.yaml")
        .try_into()
        .expect("one doc");
    assert_eq!(node.spec.pod_cidrs, ["10.244.3.0/24"]);
    let [status]: [NetworkStatus; 1] = one("network.trellis.dev_v1alpha1_networkstatus.yaml")
        .try_into()
        .expect("one doc");
    assert_eq!(status.metadata.name.as_deref(), Some("trellis-sample-node"));
}

#[test]
fn security_identity_and_node_endpoints_samples_agree() {
    let [identity]: [SecurityIdentity; 1] =
        one("network.trellis.dev_v1alpha1_securityidentity.yaml")
            .try_into()
            .expect("one doc");
    assert_eq!(identity.metadata.name.as_deref(), Some("3022894"));
    assert_eq!(identity.spec.namespace, "payments");
    assert_eq!(identity.spec.pod_labels["app"], "checkout");
    let [shard]: [NodeEndpoints; 1] = one("network.trellis.dev_v1alpha1_nodeendpoints.yaml")
        .try_into()
        .expect("one doc");
    // The shard's pods carry the sample identity's number and namespace.
    assert_eq!(shard.spec.endpoints.len(), 2);
    for e in &shard.spec.endpoints {
        assert_eq!(e.identity.to_string(), "3022894");
        assert_eq!(e.namespace, identity.spec.namespace);
    }
    assert_eq!(
        shard.spec.endpoints[0].named_ports[0].protocol,
        Protocol::Tcp
    );
}
