//! The main proof that the compiler is right: random small worlds (≤ 3
//! namespaces, ≤ 6 pods, labels from a small alphabet, random policies with
//! ipBlock/except, named ports, endPort, policyTypes, empty and broken
//! selectors), and for every probe between their pods, the node and outside
//! addresses, the independent model in `model/` and the compiled tables
//! (through `lookup`, as the datapath sees them) give the same answer.

mod model;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::ContainerPort;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use model::{End, Mode, Namespace, Pod, Probe, Proto, World};
use trellis_policy::identity::{HOST, POD_FIRST, WORLD};
use trellis_policy::{
    CidrTable, Compiled, IdentityInfo, Input, LocalEndpoint, NamedPorts, PolicyEnforcement,
    SecurityLabels, compile_endpoint,
};

// ---- the address plan --------------------------------------------------------

/// Pod addresses (each pod takes one of each family, some only IPv4).
const POD_V4: [&str; 8] = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "10.0.0.130",
    "10.0.1.1",
    "10.0.1.2",
    "10.0.1.77",
    "10.0.1.200",
];
const POD_V6: [&str; 8] = [
    "fd00::1",
    "fd00::2",
    "fd00::3",
    "fd00::80",
    "fd00::1:1",
    "fd00::1:2",
    "fd00::1:4d",
    "fd00::1:c8",
];
/// The node.
const HOST_V4: &str = "10.0.0.254";
const HOST_V6: &str = "fd00::fe";
/// Addresses that are neither a pod nor the node.
const OUTSIDE: [&str; 6] = [
    "10.0.0.200",
    "10.0.2.5",
    "192.168.1.1",
    "fd00::2:1",
    "2001:db8::1",
    "8.8.8.8",
];
const V4_LENS: [u8; 11] = [0, 8, 16, 22, 23, 24, 25, 26, 30, 31, 32];
const V6_LENS: [u8; 9] = [0, 8, 64, 104, 112, 120, 126, 127, 128];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

/// Every address a prefix may be built around.
fn anchors() -> Vec<IpAddr> {
    POD_V4
        .iter()
        .chain(&POD_V6)
        .chain(&[HOST_V4, HOST_V6])
        .chain(&OUTSIDE)
        .map(|s| ip(s))
        .collect()
}

fn prefix(addr: IpAddr, len_choice: usize) -> String {
    let len = match addr {
        IpAddr::V4(_) => V4_LENS[len_choice % V4_LENS.len()],
        IpAddr::V6(_) => V6_LENS[len_choice % V6_LENS.len()],
    };
    // Written with host bits: Kubernetes accepts that and clears them.
    format!("{addr}/{len}")
}

// ---- generators --------------------------------------------------------------

const POD_KEYS: [&str; 2] = ["app", "tier"];
const NS_KEYS: [&str; 2] = ["env", "kubernetes.io/metadata.name"];
const VALUES: [&str; 4] = ["a", "b", "ns0", "ns1"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
const PROBE_PORTS: [u16; 9] = [1, 53, 80, 81, 443, 8080, 8085, 8090, 65535];

fn labels_strategy(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(keys).prop_map(str::to_owned),
        prop::sample::select(values).prop_map(str::to_owned),
        0..=keys.len(),
    )
}

fn selector_strategy() -> impl Strategy<Value = LabelSelector> {
    let key = prop_oneof![
        10 => prop::sample::select(&["app", "tier", "env", "kubernetes.io/metadata.name"][..]).prop_map(str::to_owned),
        1 => Just("bad key".to_owned()),
    ];
    let value = prop::sample::select(&VALUES[..]).prop_map(str::to_owned);
    let values = prop::collection::vec(value.clone(), 0..=2);
    let expr = (key.clone(), prop_oneof![
        4 => Just("In"), 4 => Just("NotIn"), 3 => Just("Exists"), 3 => Just("DoesNotExist"), 1 => Just("Equals"),
    ], values, any::<bool>())
        .prop_map(|(key, op, values, force_shape)| {
            // Mostly the shape the apiserver wants; sometimes not.
            let values = match (op, force_shape) {
                ("In" | "NotIn", true) if values.is_empty() => vec!["a".to_owned()],
                ("Exists" | "DoesNotExist", true) => vec![],
                _ => values,
            };
            LabelSelectorRequirement {
                key,
                operator: op.to_owned(),
                values: (!values.is_empty()).then_some(values),
            }
        });
    let match_labels = prop_oneof![
        2 => Just(None),
        1 => Just(Some(BTreeMap::new())),
        4 => prop::collection::btree_map(key, value, 1..=2).prop_map(Some),
    ];
    let match_expressions = prop_oneof![
        3 => Just(None),
        2 => prop::collection::vec(expr, 1..=2).prop_map(Some),
    ];
    (match_labels, match_expressions).prop_map(|(match_labels, match_expressions)| LabelSelector {
        match_labels,
        match_expressions,
    })
}

fn optional_selector() -> impl Strategy<Value = Option<LabelSelector>> {
    prop_oneof![
        1 => Just(None),
        2 => Just(Some(LabelSelector::default())),
        5 => selector_strategy().prop_map(Some),
    ]
}

fn ip_block_strategy() -> impl Strategy<Value = IPBlock> {
    let except = (any::<prop::sample::Index>(), any::<usize>(), 0..10u8);
    (
        any::<prop::sample::Index>(),
        any::<usize>(),
        prop::collection::vec(except, 0..=2),
        0..30u8,
    )
        .prop_map(|(anchor, len, excepts, garbage)| {
            let all = anchors();
            let cidr_addr = *anchor.get(&all);
            let cidr = prefix(cidr_addr, len);
            let net: ipnet::IpNet = cidr.parse().expect("a prefix");
            let excepts = excepts
                .into_iter()
                .map(|(a, l, kind)| match kind {
                    // Mostly a prefix around an address inside the cidr, longer.
                    0..=6 => {
                        let inside: Vec<IpAddr> =
                            all.iter().copied().filter(|a| net.contains(a)).collect();
                        let addr = if inside.is_empty() {
                            *a.get(&all)
                        } else {
                            *a.get(&inside)
                        };
                        let max = if addr.is_ipv4() { 32 } else { 128 };
                        let plen = net.prefix_len();
                        let longer = if plen >= max {
                            max
                        } else {
                            plen + 1 + (l % usize::from(max - plen)) as u8
                        };
                        format!("{addr}/{longer}")
                    }
                    7 => prefix(*a.get(&all), l),  // anywhere
                    8 => cidr.clone(),             // not strictly inside
                    _ => "10.0.0.0/40".to_owned(), // not a CIDR
                })
                .collect::<Vec<_>>();
            IPBlock {
                cidr: if garbage == 0 {
                    "nope".to_owned()
                } else {
                    cidr
                },
                except: (!excepts.is_empty()).then_some(excepts),
            }
        })
}

fn peer_strategy() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        4 => selector_strategy().prop_map(|s| NetworkPolicyPeer { pod_selector: Some(s), ..Default::default() }),
        3 => optional_selector().prop_map(|s| NetworkPolicyPeer { namespace_selector: Some(s.unwrap_or_default()), ..Default::default() }),
        3 => (optional_selector(), optional_selector()).prop_map(|(n, p)| NetworkPolicyPeer {
            namespace_selector: Some(n.unwrap_or_default()),
            pod_selector: Some(p.unwrap_or_default()),
            ..Default::default()
        }),
        1 => Just(NetworkPolicyPeer { pod_selector: Some(LabelSelector::default()), ..Default::default() }),
        5 => ip_block_strategy().prop_map(|b| NetworkPolicyPeer { ip_block: Some(b), ..Default::default() }),
        1 => Just(NetworkPolicyPeer::default()),
        1 => ip_block_strategy().prop_map(|b| NetworkPolicyPeer {
            ip_block: Some(b),
            pod_selector: Some(LabelSelector::default()),
            ..Default::default()
        }),
    ]
}

fn port_strategy() -> impl Strategy<Value = NetworkPolicyPort> {
    let protocol = prop_oneof![
        4 => Just(None),
        3 => Just(Some("TCP")),
        2 => Just(Some("UDP")),
        1 => Just(Some("SCTP")),
        1 => prop::sample::select(&["tcp", "ICMP"][..]).prop_map(Some),
    ];
    let number = prop_oneof![
        10 => prop::sample::select(&[53, 80, 81, 443, 8080][..]),
        1 => prop::sample::select(&[0, 65536, -1][..]),
    ];
    let port = prop_oneof![
        2 => Just(None),
        5 => number.prop_map(|n| Some(IntOrString::Int(n))),
        6 => prop::sample::select(&PORT_NAMES[..]).prop_map(|n| Some(IntOrString::String(n.to_owned()))),
        1 => prop::sample::select(&["HTTP", "8080", "-x"][..]).prop_map(|n| Some(IntOrString::String(n.to_owned()))),
    ];
    let end = prop_oneof![
        5 => Just(None),
        3 => prop::sample::select(&[80, 81, 443, 8090, 65535, 1][..]).prop_map(Some),
        1 => Just(Some(70_000)),
    ];
    (protocol, port, end).prop_map(|(protocol, port, end_port)| NetworkPolicyPort {
        protocol: protocol.map(str::to_owned),
        port,
        end_port,
    })
}

fn list<T: std::fmt::Debug + Clone>(
    item: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<Vec<T>>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(vec![])),
        5 => prop::collection::vec(item, 1..=2).prop_map(Some),
    ]
}

fn policy_strategy(namespaces: usize) -> impl Strategy<Value = NetworkPolicy> {
    let types = prop_oneof![
        4 => Just(None),
        1 => Just(Some(vec![])),
        2 => Just(Some(vec!["Ingress"])),
        2 => Just(Some(vec!["Egress"])),
        2 => Just(Some(vec!["Ingress", "Egress"])),
        1 => Just(Some(vec!["Egress", "Bogus"])),
    ];
    let ingress = list((list(peer_strategy()), list(port_strategy())));
    let egress = list((list(peer_strategy()), list(port_strategy())));
    (0..namespaces, optional_selector(), types, ingress, egress).prop_map(
        |(ns, pod_selector, types, ingress, egress)| NetworkPolicy {
            metadata: ObjectMeta {
                namespace: Some(format!("ns{ns}")),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector,
                policy_types: types.map(|t| t.into_iter().map(str::to_owned).collect()),
                ingress: ingress.map(|rules| {
                    rules
                        .into_iter()
                        .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                        .collect()
                }),
                egress: egress.map(|rules| {
                    rules
                        .into_iter()
                        .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                        .collect()
                }),
            }),
        },
    )
}

/// Names with a usual number and protocol, and some variety: two pods with
/// the same labels may number a name differently.
const CONTAINER_PORTS: [(&str, u16, Option<&str>); 7] = [
    ("http", 80, None),
    ("http", 8080, Some("TCP")),
    ("dns", 53, Some("UDP")),
    ("dns", 53, None),
    ("metrics", 443, None),
    ("metrics", 81, Some("SCTP")),
    ("metrics", 8085, None),
];

fn container_port_strategy() -> impl Strategy<Value = ContainerPort> {
    prop::sample::select(&CONTAINER_PORTS[..]).prop_map(|(name, port, protocol)| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: protocol.map(str::to_owned),
        ..Default::default()
    })
}

fn world_strategy() -> impl Strategy<Value = World> {
    (1..=3usize)
        .prop_flat_map(|n_ns| {
            let namespaces = prop::collection::vec(labels_strategy(&NS_KEYS[..1], &VALUES[..2]), n_ns);
            let pods = prop::collection::vec(
                (
                    0..n_ns,
                    labels_strategy(&POD_KEYS, &VALUES[..2]),
                    any::<bool>(),
                    prop::collection::vec(container_port_strategy(), 0..=3),
                ),
                1..=6,
            );
            let order = Just((0..POD_V4.len()).collect::<Vec<_>>()).prop_shuffle();
            let policies = prop::collection::vec(policy_strategy(n_ns), 0..=4);
            let mode = prop_oneof![8 => Just(Mode::Default), 1 => Just(Mode::Always), 1 => Just(Mode::Never)];
            (namespaces, pods, order, policies, mode)
        })
        .prop_map(|(ns_labels, pods, order, mut policies, mode)| {
            let namespaces = ns_labels
                .into_iter()
                .enumerate()
                .map(|(i, mut labels)| {
                    let name = format!("ns{i}");
                    labels.insert("kubernetes.io/metadata.name".into(), name.clone());
                    Namespace { name, labels }
                })
                .collect();
            let pods = pods
                .into_iter()
                .enumerate()
                .map(|(i, (ns, labels, dual, ports))| {
                    let slot = order[i];
                    let mut ips = vec![ip(POD_V4[slot])];
                    if dual {
                        ips.push(ip(POD_V6[slot]));
                    }
                    Pod {
                        namespace: format!("ns{ns}"),
                        name: format!("pod{i}"),
                        labels,
                        ips,
                        ports,
                    }
                })
                .collect();
            for (i, p) in policies.iter_mut().enumerate() {
                p.metadata.name = Some(format!("p{i}"));
            }
            World {
                mode,
                namespaces,
                pods,
                policies,
            }
        })
}

// ---- the compiler's side -------------------------------------------------------

struct CompiledWorld {
    input: Input,
    /// Pod index → its identity and compiled tables.
    pods: Vec<(u32, Compiled)>,
}

fn security_labels(world: &World, pod: &Pod) -> SecurityLabels {
    let ns_labels = world
        .namespaces
        .iter()
        .find(|n| n.name == pod.namespace)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    SecurityLabels::new(pod.namespace.clone(), ns_labels, pod.labels.clone())
}

/// Identities as an allocator would make them: one per distinct label set,
/// numbered in label-set order, or the reverse (any numbering must do);
/// `reverse` also reverses the policies.
fn compile_world(world: &World, reverse: bool) -> CompiledWorld {
    let mut sets: BTreeMap<SecurityLabels, NamedPorts> = BTreeMap::new();
    for pod in &world.pods {
        sets.entry(security_labels(world, pod))
            .or_default()
            .extend(&NamedPorts::from_container_ports(&pod.ports));
    }
    let mut ordered: Vec<(SecurityLabels, NamedPorts)> = sets.into_iter().collect();
    let mut policies = world.policies.clone();
    if reverse {
        ordered.reverse();
        policies.reverse();
    }
    let ids: BTreeMap<SecurityLabels, u32> = ordered
        .iter()
        .zip(POD_FIRST..)
        .map(|((labels, _), id)| (labels.clone(), id))
        .collect();
    let identities = ordered
        .into_iter()
        .map(|(labels, named_ports)| IdentityInfo {
            id: ids[&labels],
            labels,
            named_ports,
        })
        .collect();
    let input = Input {
        enforcement: match world.mode {
            Mode::Default => PolicyEnforcement::Default,
            Mode::Always => PolicyEnforcement::Always,
            Mode::Never => PolicyEnforcement::Never,
        },
        cidrs: CidrTable::from_policies(&policies),
        policies,
        bundles: Vec::new(),
        identities,
        pod_networks: None,
    };
    let pods = world
        .pods
        .iter()
        .map(|pod| {
            let labels = security_labels(world, pod);
            let identity = ids[&labels];
            let endpoint = LocalEndpoint {
                identity,
                labels,
                named_ports: NamedPorts::from_container_ports(&pod.ports),
            };
            (identity, compile_endpoint(&input, &endpoint))
        })
        .collect();
    CompiledWorld { input, pods }
}

/// The datapath's answer: the sender's egress table (when it is a pod) and
/// the receiver's ingress table (when it is a pod), each looked up with the
/// other side's identity and CIDR identity from the IP cache.
fn datapath_allows(world: &World, cw: &CompiledWorld, probe: &Probe) -> bool {
    let index = |p: &Pod| {
        world
            .pods
            .iter()
            .position(|q| std::ptr::eq(q, p))
            .expect("a pod of the world")
    };
    let identity = |end: End| match end {
        End::Pod(p) => cw.pods[index(p)].0,
        End::Host => HOST,
        End::Outside => WORLD,
    };
    let proto = match probe.proto {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
        Proto::Icmp => 1,
    };
    let egress = match probe.src {
        End::Pod(p) => cw.pods[index(p)].1.policy.egress.permits(
            identity(probe.dst),
            cw.input.cidrs.cidr_identity(probe.dst_ip),
            proto,
            probe.port,
        ),
        _ => true,
    };
    let ingress = match probe.dst {
        End::Pod(p) => cw.pods[index(p)].1.policy.ingress.permits(
            identity(probe.src),
            cw.input.cidrs.cidr_identity(probe.src_ip),
            proto,
            probe.port,
        ),
        _ => true,
    };
    egress && ingress
}

/// Every probe of a world: pod → pod, node → pod, outside → pod, pod → node,
/// pod → outside; both families where both ends have one; every protocol.
fn probes(world: &World) -> Vec<Probe<'_>> {
    let mut ends: Vec<(End, Vec<IpAddr>)> = world
        .pods
        .iter()
        .map(|p| (End::Pod(p), p.ips.clone()))
        .collect();
    ends.push((End::Host, vec![ip(HOST_V4), ip(HOST_V6)]));
    for o in OUTSIDE {
        ends.push((End::Outside, vec![ip(o)]));
    }
    let mut out = Vec::new();
    for (i, (src, src_ips)) in ends.iter().enumerate() {
        for (j, (dst, dst_ips)) in ends.iter().enumerate() {
            let one_pod = matches!(src, End::Pod(_)) || matches!(dst, End::Pod(_));
            if i == j || !one_pod {
                continue;
            }
            for &src_ip in src_ips {
                for &dst_ip in dst_ips.iter().filter(|d| d.is_ipv4() == src_ip.is_ipv4()) {
                    let mut add = |proto, port| {
                        out.push(Probe {
                            src: *src,
                            src_ip,
                            dst: *dst,
                            dst_ip,
                            proto,
                            port,
                        });
                    };
                    add(Proto::Icmp, 0);
                    for proto in [Proto::Tcp, Proto::Udp, Proto::Sctp] {
                        for port in PROBE_PORTS {
                            add(proto, port);
                        }
                    }
                }
            }
        }
    }
    out
}

fn describe(probe: &Probe) -> String {
    let end = |e: End| match e {
        End::Pod(p) => format!("{}/{}", p.namespace, p.name),
        End::Host => "node".to_owned(),
        End::Outside => "outside".to_owned(),
    };
    format!(
        "{} ({}) -> {} ({}) {:?}/{}",
        end(probe.src),
        probe.src_ip,
        end(probe.dst),
        probe.dst_ip,
        probe.proto,
        probe.port
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    /// Model == compiler, for every probe.
    #[test]
    fn compiler_agrees_with_the_model(world in world_strategy()) {
        let cw = compile_world(&world, false);
        for probe in probes(&world) {
            let want = model::allowed(&world, &probe);
            let got = datapath_allows(&world, &cw, &probe);
            prop_assert_eq!(got, want, "{}", describe(&probe));
        }
    }

    /// The order of policies and identities changes nothing but the
    /// identity numbers: renumbered back, the tables are equal.
    #[test]
    fn input_order_does_not_matter(world in world_strategy()) {
        let forward = compile_world(&world, false);
        let backward = compile_world(&world, true);
        prop_assert_eq!(&forward.input.cidrs, &backward.input.cidrs);
        let renumber: BTreeMap<u32, u32> = backward
            .pods
            .iter()
            .zip(&forward.pods)
            .map(|((b, _), (f, _))| (*b, *f))
            .collect();
        for ((_, f), (_, b)) in forward.pods.iter().zip(&backward.pods) {
            let mut b = b.clone();
            for table in [&mut b.policy.ingress, &mut b.policy.egress] {
                table.entries = std::mem::take(&mut table.entries)
                    .into_iter()
                    .map(|(mut k, e)| {
                        k.identity = renumber.get(&k.identity).copied().unwrap_or(k.identity);
                        (k, e)
                    })
                    .collect();
            }
            prop_assert_eq!(f, &b);
        }
    }
}

/// The generator is not degenerate: over a fixed set of worlds, every
/// feature decides some probe, and neither answer dominates. A model
/// agreeing with a compiler on worlds that never exercise ipBlock excepts or
/// named ports would prove nothing.
#[test]
fn the_generator_reaches_every_feature() {
    let mut runner = TestRunner::deterministic();
    let strategy = world_strategy();
    let (mut allowed, mut total, mut isolated_pods) = (0u64, 0u64, 0u64);
    model::take_hits();
    for _ in 0..300 {
        let world = strategy.new_tree(&mut runner).expect("a world").current();
        for probe in probes(&world) {
            total += 1;
            allowed += u64::from(model::allowed(&world, &probe));
        }
        let cw = compile_world(&world, false);
        isolated_pods += cw
            .pods
            .iter()
            .filter(|(_, c)| c.policy.ingress.isolated || c.policy.egress.isolated)
            .count() as u64;
    }
    let hits = model::take_hits();
    for feature in [
        "host admitted",
        "isolated and denied",
        "unknown policy type",
        "except outside cidr",
        "address in an except",
        "ipBlock matched",
        "ipBlock matched a pod",
        "inside a range, past its start",
        "named port, ingress",
        "named port, egress",
        "named port, egress, through a pod with the same labels",
    ] {
        let n = hits.get(feature).copied().unwrap_or(0);
        assert!(n >= 5, "{feature}: {n} hits; all: {hits:#?}");
    }
    let share = allowed as f64 / total as f64;
    assert!((0.2..0.9).contains(&share), "{allowed} of {total} allowed");
    assert!(isolated_pods > 300, "{isolated_pods} isolated pods");
}
