//! The compiler's tables against the reference evaluator (design 0006):
//! random NetworkPolicies, PolicyBundles, pod identities, CIDRs, pod
//! networks and enforcement modes; for every local endpoint, direction,
//! remote end (each pod identity, a pod identity nobody knows, WORLD, the
//! node), remote address (one of every CIDR class the remote can have,
//! and some fixed ones) and port, `table::lookup` on the compiled table
//! must give the reference's verdict, and the provenance of what it found
//! must name a rule the reference says decides.
//!
//! The only exceptions are the documented ones, for a known pod identity:
//! where its verdict is the same at every address it can have but the
//! deciding rule is not, the entry names one of those rules; where the
//! verdict itself depends on the address, the compiled verdict is a deny
//! and the compiler reported `AddressDependentVerdict` for the identity.
//!
//! A small seeded generator (no shrinking): a failure prints the seed and
//! the objects. `TRELLIS_POLICY_CASES=n` runs n cases (default 48),
//! `TRELLIS_POLICY_SEED=s` only seed s.

mod random;

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use random::{Rng, describe, gen_input};
use trellis_policy::identity::{HOST, WORLD};
use trellis_policy::reference::{self, Packet, Verdict};
use trellis_policy::table::lookup;
use trellis_policy::{
    Decision, Direction, Input, LocalEndpoint, Problem, Protocol, compile_endpoint,
};

const PORTS: [u16; 25] = [
    0, 1, 9, 10, 22, 23, 52, 53, 54, 80, 443, 1024, 1025, 7999, 8000, 8050, 8080, 8081, 8082, 8100,
    8101, 9100, 30000, 32767, 65535,
];
/// Addresses every remote may have besides its classes' witnesses.
const FIXED: [&str; 9] = [
    "10.0.0.7",
    "10.0.1.200",
    "10.0.0.5",
    "169.254.169.254",
    "8.8.8.8",
    "192.0.2.1",
    "fd00::1",
    "2001:db8::1",
    "fe80::1",
];
/// A pod identity no input holds.
const UNKNOWN_POD: u32 = 999;

/// The addresses a remote with identity `id` can have: for a known pod,
/// one in each CIDR class inside the pod networks (when known); for the
/// others, one in each class anywhere; and the fixed ones that qualify.
fn addresses(input: &Input, known_pod: bool) -> Vec<IpAddr> {
    let everywhere: Vec<IpNet> = vec![
        "0.0.0.0/0".parse().expect("net"),
        "::/0".parse().expect("net"),
    ];
    let within = match (&input.pod_networks, known_pod) {
        (Some(nets), true) => nets.clone(),
        _ => everywhere,
    };
    let classes: Vec<u32> = input
        .cidrs
        .iter()
        .map(|(_, id)| id)
        .chain([WORLD])
        .collect();
    let mut out = BTreeSet::new();
    for class in classes {
        for net in &within {
            if let Some(a) = input.cidrs.witness(class, *net) {
                assert_eq!(
                    input.cidrs.cidr_identity(a),
                    class,
                    "witness {a} of {class:#x}"
                );
                assert!(net.contains(&a), "witness {a} outside {net}");
                out.insert(a);
            }
        }
    }
    for a in FIXED {
        let a: IpAddr = a.parse().expect("address");
        if within.iter().any(|n| n.contains(&a)) {
            out.insert(a);
        }
    }
    out.into_iter().collect()
}

#[derive(Default)]
struct Stats {
    checked: usize,
    approximate: usize,
    degraded: usize,
}

fn run_case(seed: u64, stats: &mut Stats) {
    let mut rng = Rng::new(seed);
    let input = gen_input(&mut rng);
    let ports: Vec<(u8, u16)> = Protocol::ALL
        .iter()
        .flat_map(|p| {
            let mut ports: Vec<u16> = PORTS.iter().copied().filter(|_| rng.chance(45)).collect();
            ports.push(*rng.pick(&PORTS));
            ports.into_iter().map(move |n| (p.number(), n))
        })
        .chain([(1, 0), (58, 0)])
        .collect();
    let pod_addresses = addresses(&input, true);
    let any_addresses = addresses(&input, false);
    let mut remotes: Vec<(u32, &[IpAddr])> = input
        .identities
        .iter()
        .map(|i| (i.id, pod_addresses.as_slice()))
        .collect();
    remotes.extend([
        (UNKNOWN_POD, any_addresses.as_slice()),
        (WORLD, any_addresses.as_slice()),
        (HOST, any_addresses.as_slice()),
    ]);

    // The same objects in another order compile the same.
    let mut shuffled = input.clone();
    shuffled.policies.reverse();
    shuffled.bundles.reverse();
    shuffled.identities.reverse();

    for info in &input.identities {
        let endpoint = LocalEndpoint {
            identity: info.id,
            labels: info.labels.clone(),
            named_ports: info.named_ports.clone(),
        };
        let compiled = compile_endpoint(&input, &endpoint);
        assert_eq!(
            compiled,
            compile_endpoint(&shuffled, &endpoint),
            "seed {seed}: the order of the input changed the output\n{}",
            describe(&input)
        );
        for table in [&compiled.policy.ingress, &compiled.policy.egress] {
            for e in table.entries.values() {
                assert!(
                    compiled.provenance.get(e.rule).is_some(),
                    "seed {seed}: rule {} has no origin",
                    e.rule
                );
            }
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            let table = compiled.policy.table(direction);
            let enforced = reference::enforced(&input, &endpoint, direction);
            assert_eq!(
                table.isolated,
                enforced,
                "seed {seed}: endpoint {} {direction:?}: isolated {} but the reference says enforced {enforced}\n{}",
                info.id,
                table.isolated,
                describe(&input)
            );
            if !enforced {
                continue;
            }
            let degraded_ids: BTreeSet<u32> = compiled
                .diagnostics
                .iter()
                .filter(|d| {
                    d.field
                        .starts_with(&format!("spec.{}", dir_name(direction)))
                })
                .filter_map(|d| match &d.problem {
                    Problem::AddressDependentVerdict { identities } => Some(identities.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            for (id, addrs) in &remotes {
                let known_pod = input.identities.iter().any(|i| i.id == *id);
                for &(proto, port) in &ports {
                    let verdicts: Vec<(IpAddr, Verdict)> = addrs
                        .iter()
                        .map(|a| {
                            let packet = Packet {
                                identity: *id,
                                address: *a,
                                proto,
                                port,
                            };
                            let v = reference::evaluate(&input, &endpoint, direction, &packet)
                                .expect("enforced");
                            (*a, v)
                        })
                        .collect();
                    let same_action = verdicts
                        .iter()
                        .all(|(_, v)| v.allowed == verdicts[0].1.allowed);
                    for (address, want) in &verdicts {
                        stats.checked += 1;
                        let cidr_id = input.cidrs.cidr_identity(*address);
                        let d = lookup(table, *id, cidr_id, proto, port);
                        let allowed = matches!(d, Decision::Allow { .. });
                        let origin = compiled.provenance.explain(direction, d);
                        if allowed == want.allowed
                            && origin.is_some_and(|o| want.equally.contains(o))
                        {
                            continue;
                        }
                        if known_pod && same_action && allowed == want.allowed {
                            let any = origin.is_some_and(|o| {
                                verdicts.iter().any(|(_, v)| v.equally.contains(o))
                            });
                            if any {
                                stats.approximate += 1;
                                continue;
                            }
                        }
                        if known_pod && !same_action && !allowed && degraded_ids.contains(id) {
                            stats.degraded += 1;
                            continue;
                        }
                        panic!(
                            "seed {seed}: endpoint {} {direction:?}: remote {id} at {address} \
                             (cidr {cidr_id:#x}) proto {proto} port {port}:\n  \
                             table: {d:?} = {} by {:?}\n  reference: {} by {}\n\
                             diagnostics: {:#?}\ntable: {:#?}\n{}",
                            info.id,
                            if allowed { "allow" } else { "deny" },
                            origin.map(ToString::to_string),
                            if want.allowed { "allow" } else { "deny" },
                            want.by,
                            compiled.diagnostics,
                            table,
                            describe(&input),
                        );
                    }
                }
            }
        }
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

#[test]
fn tables_give_the_reference_verdicts() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("TRELLIS_POLICY_SEED") {
        Some(s) => vec![s],
        None => (1..=env("TRELLIS_POLICY_CASES").unwrap_or(48)).collect(),
    };
    let mut stats = Stats::default();
    for seed in seeds {
        run_case(seed, &mut stats);
    }
    eprintln!(
        "{} packets checked; {} with one of several deciding rules named, {} denied where the verdict depends on the address",
        stats.checked, stats.approximate, stats.degraded
    );
    assert!(
        stats.checked > 10_000,
        "the generator produced too few packets"
    );
}
