//! Cost of computing a node's desired state and plan with many peers: the
//! scale target is 5,000 nodes, so a node has 4,999 peers. 500 peers is the
//! baseline for the scaling ratio.
//!
//!   cargo bench -p trellis-node --bench plan

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use trellis_api::v1alpha1::{Encapsulation, NodeNetworkSpec, Vtep, VxlanConfig};
use trellis_node::desired::{Host, desired};
use trellis_node::model::{Observed, UnderlayLink};
use trellis_node::plan::{kernel_after, plan};

const UNDERLAY: UnderlayLink = UnderlayLink {
    index: 2,
    mtu: 1500,
};

/// Node `i` of a /8 pod network with /24 blocks and a 10.0.0.0/8 underlay.
fn node(i: u32) -> (String, NodeNetworkSpec) {
    let (a, b) = (i / 256, i % 256);
    let spec = NodeNetworkSpec {
        pod_cidrs: vec![format!("10.{a}.{b}.0/24")],
        underlay_address: format!("172.16.{a}.{b}"),
        encapsulation: Encapsulation::Vxlan,
        vxlan: Some(VxlanConfig { vni: 1, port: 8472 }),
        vtep: Some(Vtep {
            mac: format!("0a:00:00:00:{a:02x}:{b:02x}"),
            ipv4: Some(format!("10.{a}.{b}.0")),
            ipv6: None,
        }),
        mtu: None,
    };
    (format!("node-{i}"), spec)
}

fn bench(c: &mut Criterion) {
    let host = Host {
        underlay: Some(UNDERLAY),
        underlay_networks: vec!["172.16.0.0/12".parse().expect("net")],
    };
    let mut group = c.benchmark_group("node_plan");
    for peers in [500u32, 5000] {
        let nodes: Vec<(String, NodeNetworkSpec)> = (0..=peers).map(node).collect();
        let views: Vec<(&str, &NodeNetworkSpec)> =
            nodes.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let own = &nodes[0].1;
        let d = desired("node-0", own, &views, &host).expect("desired");
        assert_eq!(d.peers_programmed as u32, peers);
        let empty = Observed {
            underlay: Some(UNDERLAY),
            ..Observed::default()
        };
        let first = plan(&d, &empty);
        let kernel = kernel_after(&empty, &first);
        assert!(
            plan(&d, &kernel).is_empty(),
            "converged kernel must plan nothing"
        );

        group.bench_function(format!("desired/{peers}"), |b| {
            b.iter(|| desired("node-0", black_box(own), black_box(&views), &host))
        });
        group.bench_function(format!("plan_fresh/{peers}"), |b| {
            b.iter(|| plan(black_box(&d), black_box(&empty)))
        });
        group.bench_function(format!("plan_converged/{peers}"), |b| {
            b.iter(|| plan(black_box(&d), black_box(&kernel)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
