//! The objects that grow with the cluster stay inside the scale budget
//! (ARCHITECTURE.md: every object under 256 KiB; etcd refuses requests over
//! 1.5 MiB). The worst cases are built from the bounds in the generated
//! schemas, so loosening a bound without redoing the arithmetic fails here.

use std::collections::BTreeMap;

use kube::CustomResourceExt;
use serde_json::Value;
use trellis_api::v1alpha1::{
    MAX_ENDPOINT_NAMED_PORTS, MAX_NODE_ENDPOINTS, MAX_NODE_ENDPOINTS_BYTES, MAX_NODE_NAMED_PORTS,
    NamedPort, NodeEndpoints, NodeEndpointsSpec, PodEndpoint, Protocol, SecurityIdentity,
    SecurityIdentitySpec, ShardLimit,
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

/// The longest strings the schema admits, for every field of an endpoint.
fn longest_endpoint(named_ports: usize) -> PodEndpoint {
    let spec = spec_schema::<NodeEndpoints>();
    let item = &spec["properties"]["endpoints"]["items"]["properties"];
    let ports = &item["namedPorts"];
    let s = |schema: &Value| "x".repeat(bound(schema, "maxLength"));
    PodEndpoint {
        namespace: s(&item["namespace"]),
        name: s(&item["name"]),
        addresses: vec![s(&item["addresses"]["items"]); bound(&item["addresses"], "maxItems")],
        identity: 16_777_215,
        named_ports: vec![
            NamedPort {
                name: s(&ports["items"]["properties"]["name"]),
                protocol: Protocol::Sctp,
                port: 65535,
            };
            named_ports.min(bound(ports, "maxItems"))
        ],
    }
}

#[test]
fn the_size_estimate_bounds_the_json_from_above() {
    let spec = spec_schema::<NodeEndpoints>();
    let rules: Vec<&str> = spec["x-kubernetes-validations"]
        .as_array()
        .expect("list-wide rules")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(
        rules
            .iter()
            .any(|r| r.ends_with(&format!("<= {MAX_NODE_ENDPOINTS_BYTES}"))),
        "{rules:?}"
    );
    // Every endpoint shape the schema admits, at its longest and at its shortest.
    let shortest = PodEndpoint {
        namespace: "n".into(),
        name: "p".into(),
        addresses: vec!["::".into()],
        identity: 256,
        named_ports: vec![],
    };
    for (what, e) in [
        ("longest, no named port", longest_endpoint(0)),
        ("longest, 64 named ports", longest_endpoint(64)),
        ("shortest", shortest),
    ] {
        let list = NodeEndpointsSpec {
            endpoints: vec![e.clone(); 3],
        };
        let json = json_len(&list.endpoints);
        assert!(
            list.estimated_bytes() >= json,
            "{what}: estimate {} < JSON {json}",
            list.estimated_bytes()
        );
        // Not much more either (an empty namedPorts is left out, 15 bytes; a short identity
        // saves 5; a named port counts 1 more than its longest): the budget is not wasted.
        let slack = 3 * (24 + e.named_ports.len());
        assert!(
            list.estimated_bytes() <= json + slack,
            "{what}: estimate {} for JSON {json}",
            list.estimated_bytes()
        );
    }
}

#[test]
fn a_full_node_endpoints_shard_stays_under_the_object_budget() {
    // As many of the longest endpoints as the limits admit, the named-port total spent.
    let mut spec = NodeEndpointsSpec::default();
    let mut ports_left = MAX_NODE_NAMED_PORTS;
    loop {
        let e = longest_endpoint(ports_left);
        let mut next = spec.clone();
        next.endpoints.push(e.clone());
        if next.check_limits().is_err() {
            break;
        }
        ports_left -= e.named_ports.len();
        spec = next;
    }
    assert!(spec.endpoints.len() > 100, "{}", spec.endpoints.len());
    let size = json_len(&NodeEndpoints::new(&"n".repeat(253), spec));
    assert!(
        size < OBJECT_BUDGET,
        "the largest NodeEndpoints the limits admit is {} KiB",
        size / KIB
    );
    assert!(size < ETCD_BUDGET);
}

#[test]
fn shard_limits_say_which_one() {
    let one = |named_ports: usize| PodEndpoint {
        namespace: "payments".into(),
        name: "checkout-0".into(),
        addresses: vec!["10.244.1.2".into()],
        identity: 300,
        named_ports: (0..named_ports)
            .map(|i| NamedPort {
                name: format!("p-{i}"),
                protocol: Protocol::Tcp,
                port: 1000 + i32::try_from(i).expect("small"),
            })
            .collect(),
    };
    let spec = |n: usize, named_ports: usize| NodeEndpointsSpec {
        endpoints: vec![one(named_ports); n],
    };
    assert_eq!(spec(MAX_NODE_ENDPOINTS, 0).check_limits(), Ok(()));
    assert_eq!(
        spec(MAX_NODE_ENDPOINTS + 1, 0).check_limits(),
        Err(ShardLimit::Endpoints(MAX_NODE_ENDPOINTS + 1))
    );
    let err = spec(1, MAX_ENDPOINT_NAMED_PORTS + 1)
        .check_limits()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod payments/checkout-0 has 65 named container ports, more than the 64 a pod may publish"
    );
    assert_eq!(
        spec(MAX_NODE_NAMED_PORTS / 16 + 1, 16).check_limits(),
        Err(ShardLimit::NamedPorts(MAX_NODE_NAMED_PORTS + 16))
    );
    let long = PodEndpoint {
        name: "x".repeat(253),
        ..one(0)
    };
    let fits = MAX_NODE_ENDPOINTS_BYTES / long.estimated_bytes();
    let list = |n: usize| NodeEndpointsSpec {
        endpoints: vec![long.clone(); n],
    };
    assert_eq!(list(fits).check_limits(), Ok(()));
    assert!(matches!(
        list(fits + 1).check_limits(),
        Err(ShardLimit::Bytes(_))
    ));
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
