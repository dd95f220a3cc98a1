//! The objects that grow with the cluster stay inside the scale budget
//! (ARCHITECTURE.md: every object under 256 KiB; etcd refuses requests over
//! 1.5 MiB). The worst cases are built from the bounds in the generated
//! schemas, so loosening a bound without redoing the arithmetic fails here.

use std::collections::BTreeMap;

use kube::CustomResourceExt;
use serde_json::Value;
use trellis_api::v1alpha1::{
    MAX_NODE_NAMED_PORTS, NamedPort, NodeEndpoints, NodeEndpointsSpec, PodEndpoint, Protocol,
    SecurityIdentity, SecurityIdentitySpec,
};

const KIB: usize = 1024;
/// What etcd accepts in one request, less room for `metadata` (names,
/// `managedFields` with atomic lists, the apiserver's own fields).
const ETCD_BUDGET: usize = 1024 * KIB;
/// ARCHITECTURE.md's budget for every object.
const OBJECT_BUDGET: usize = 256 * KIB;

fn spec_schema<K: CustomResourceExt>() -> Value {
    let crd = serde_json::to_value(K::crd()).expect("CRD as JSON");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

fn bound(schema: &Value, key: &str) -> usize {
    let n = schema[key]
        .as_u64()
        .or_else(|| schema[key].as_f64().map(|f| f as u64))
        .unwrap_or_else(|| panic!("no {key} in {schema}"));
    usize::try_from(n).expect("bound fits usize")
}

fn json_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).expect("serialize").len()
}

fn endpoints_object(endpoints: Vec<PodEndpoint>) -> NodeEndpoints {
    NodeEndpoints::new("node-a", NodeEndpointsSpec { endpoints })
}

#[test]
fn a_full_node_endpoints_shard_stays_under_etcds_limit() {
    let spec = spec_schema::<NodeEndpoints>();
    let list = &spec["properties"]["endpoints"];
    let item = &list["items"]["properties"];
    let ports = &item["namedPorts"];
    let max_endpoints = bound(list, "maxItems");
    let max_ports = bound(ports, "maxItems");
    let total_rule = spec["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .expect("the named-port total rule");
    assert!(
        total_rule.ends_with(&format!("<= {MAX_NODE_NAMED_PORTS}")),
        "{total_rule}"
    );

    let s = |schema: &Value| "x".repeat(bound(schema, "maxLength"));
    let port = NamedPort {
        name: s(&ports["items"]["properties"]["name"]),
        protocol: Protocol::Sctp,
        port: 65535,
    };
    let mut ports_left = MAX_NODE_NAMED_PORTS;
    let endpoints = (0..max_endpoints)
        .map(|_| {
            let n = ports_left.min(max_ports);
            ports_left -= n;
            PodEndpoint {
                namespace: s(&item["namespace"]),
                name: s(&item["name"]),
                addresses: vec![
                    s(&item["addresses"]["items"]);
                    bound(&item["addresses"], "maxItems")
                ],
                identity: 16_777_215,
                named_ports: vec![port.clone(); n],
            }
        })
        .collect();
    let size = json_len(&endpoints_object(endpoints));
    assert!(
        size < ETCD_BUDGET,
        "the largest NodeEndpoints the schema admits is {} KiB",
        size / KIB
    );
}

#[test]
fn typical_node_endpoints_shards_stay_small() {
    let typical = |i: usize| PodEndpoint {
        namespace: "payments".to_owned(),
        name: format!("checkout-7c9d8f6b5-{i:05}"),
        addresses: vec![
            format!("10.244.3.{}", i % 250),
            format!("fd00:10:244::3{i:02x}"),
        ],
        identity: 1_234_567,
        named_ports: vec![
            NamedPort {
                name: "http".to_owned(),
                protocol: Protocol::Tcp,
                port: 8080,
            },
            NamedPort {
                name: "metrics".to_owned(),
                protocol: Protocol::Tcp,
                port: 9090,
            },
        ],
    };
    // Kubernetes' default --max-pods.
    let node = json_len(&endpoints_object((0..110).map(typical).collect()));
    assert!(node < 32 * KIB, "110 typical pods take {node} bytes");
    let full = json_len(&endpoints_object((0..1024).map(typical).collect()));
    assert!(full < OBJECT_BUDGET, "1024 typical pods take {full} bytes");
}

#[test]
fn a_full_security_identity_stays_under_the_object_budget() {
    let spec = spec_schema::<SecurityIdentity>();
    let labels = |field: &str, prefix: char| -> BTreeMap<String, String> {
        let map = &spec["properties"][field];
        let value_len = bound(&map["additionalProperties"], "maxLength");
        // 317: the longest label key (a 253-character prefix, '/', 63).
        (0..bound(map, "maxProperties"))
            .map(|i| {
                let key = format!("{prefix}{i:0>316}");
                (key, "v".repeat(value_len))
            })
            .collect()
    };
    let identity = SecurityIdentity::new(
        "16777215",
        SecurityIdentitySpec {
            namespace: "n".repeat(bound(&spec["properties"]["namespace"], "maxLength")),
            namespace_labels: labels("namespaceLabels", 'n'),
            pod_labels: labels("podLabels", 'p'),
        },
    );
    let size = json_len(&identity);
    assert!(
        size < OBJECT_BUDGET,
        "the largest SecurityIdentity the schema admits is {} KiB",
        size / KIB
    );
}
