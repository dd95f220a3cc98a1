//! `IdentityDependencies` (the node's "which cached compilations can an
//! identity change", design 0005) against the compiler itself: random
//! NetworkPolicies, PolicyBundles, identities, pod networks and modes
//! (the generators of `bundles_match_reference.rs`, in `random/`); for
//! every endpoint and every identity the summary of the endpoint's
//! compilation says is irrelevant,
//!
//! - adding it to the input (at a random place in the list),
//! - removing it (an identity of the input),
//! - changing it (same id, other labels or named ports; both versions
//!   irrelevant)
//!
//! must leave `compile_endpoint` exactly as it was: the whole `Compiled`,
//! tables, rule ids, provenance and diagnostics. The summary itself must
//! not depend on the identities. The test also counts how often an
//! identity is judged irrelevant and fails when that is too rare to mean
//! anything (or when relevant ones never change a compilation: then a
//! too-lax summary would go unnoticed).
//!
//! `TRELLIS_POLICY_CASES=n` runs n cases (default 160),
//! `TRELLIS_POLICY_SEED=s` only seed s.

mod random;

use std::collections::BTreeMap;

use random::{APPS, NAMED, NAMESPACES, Rng, describe, gen_identity, gen_input, namespace_labels};
use trellis_policy::{
    Compiled, IdentityDependencies, IdentityInfo, Input, LocalEndpoint, NamedPorts, Protocol,
    SecurityLabels, compile_endpoint,
};

/// The first id of the identities added to an input (those of the input
/// are numbered from 300, at most 6).
const EXTRA_FIRST: u32 = 500;

/// An identity that the policies may or may not know: namespaces and apps
/// beyond those of the input, and a port name no rule uses.
fn gen_stranger(rng: &mut Rng, id: u32) -> IdentityInfo {
    if rng.chance(35) {
        return gen_identity(rng, id);
    }
    let ns = *rng.pick(&["a", "b", "c", "d", "e"]);
    let mut pod = BTreeMap::from([(
        "app".to_owned(),
        rng.pick(&["web", "db", "api", "batch", "cache", "cron"])
            .to_string(),
    )]);
    if rng.chance(30) {
        pod.insert("tier".to_owned(), rng.pick(&["front", "back"]).to_string());
    }
    let mut named_ports: NamedPorts = NAMED.iter().filter(|_| rng.chance(12)).copied().collect();
    if rng.chance(40) {
        named_ports.insert("grpc", Protocol::Tcp, 50051);
    }
    IdentityInfo {
        id,
        labels: SecurityLabels::new(ns, namespace_labels(ns), pod),
        named_ports,
    }
}

/// `identity` changed: other labels, other named ports, or both.
fn gen_change(rng: &mut Rng, identity: &IdentityInfo) -> IdentityInfo {
    let mut changed = identity.clone();
    match rng.below(3) {
        0 => changed.labels = gen_stranger(rng, identity.id).labels,
        1 => changed.named_ports = gen_stranger(rng, identity.id).named_ports,
        _ => changed = gen_stranger(rng, identity.id),
    }
    changed
}

fn endpoint_of(labels: &SecurityLabels, named_ports: &NamedPorts) -> LocalEndpoint {
    LocalEndpoint {
        identity: 1000,
        labels: labels.clone(),
        named_ports: named_ports.clone(),
    }
}

#[derive(Debug, Default)]
struct Stats {
    /// (endpoint, identity) pairs judged.
    judged: usize,
    /// … of which irrelevant (then checked equal).
    irrelevant: usize,
    /// Pairs where the compilation depends on some identities (its summary
    /// is not empty).
    nontrivial: usize,
    /// … of which irrelevant.
    irrelevant_nontrivial: usize,
    /// Relevant, and the compilation did change.
    relevant_changed: usize,
    /// Relevant, but the compilation stayed the same (false positives).
    relevant_same: usize,
}

struct Case<'a> {
    seed: u64,
    input: &'a Input,
    endpoint: &'a LocalEndpoint,
    deps: &'a IdentityDependencies,
    base: &'a Compiled,
}

impl Case<'_> {
    /// Compiles `endpoint` against `other` (the input with one identity
    /// changed from `before` to `after`; `None`: added, or removed) and
    /// checks it against the judgement.
    fn check(
        &self,
        stats: &mut Stats,
        other: &Input,
        before: Option<&IdentityInfo>,
        after: Option<&IdentityInfo>,
    ) {
        assert_eq!(
            &IdentityDependencies::of(other, self.endpoint),
            self.deps,
            "seed {}: the summary depends on the identities",
            self.seed
        );
        let relevant = self.deps.affected_by_change(before, after);
        let compiled = compile_endpoint(other, self.endpoint);
        stats.judged += 1;
        stats.nontrivial += usize::from(!self.deps.is_empty());
        if relevant {
            if compiled == *self.base {
                stats.relevant_same += 1;
            } else {
                stats.relevant_changed += 1;
            }
            return;
        }
        stats.irrelevant += 1;
        if !self.deps.is_empty() {
            stats.irrelevant_nontrivial += 1;
        }
        assert!(
            compiled == *self.base,
            "seed {}: identity {before:#?} → {after:#?}, judged irrelevant to endpoint {:?}, \
             changed its compilation\nsummary: {:#?}\nbefore: {:#?}\nafter: {:#?}\n{}",
            self.seed,
            self.endpoint.labels,
            self.deps,
            self.base,
            compiled,
            describe(self.input),
        );
    }
}

fn run_case(seed: u64, stats: &mut Stats) {
    let mut rng = Rng::new(seed);
    let input = gen_input(&mut rng);
    let mut endpoints: Vec<LocalEndpoint> = input
        .identities
        .iter()
        .map(|i| endpoint_of(&i.labels, &i.named_ports))
        .collect();
    for j in 0..2 {
        let s = gen_stranger(&mut rng, EXTRA_FIRST + 100 + j);
        endpoints.push(endpoint_of(&s.labels, &s.named_ports));
    }
    let extras: Vec<IdentityInfo> = (0..8)
        .map(|j| gen_stranger(&mut rng, EXTRA_FIRST + j))
        .collect();
    let changes: Vec<IdentityInfo> = input
        .identities
        .iter()
        .map(|i| gen_change(&mut rng, i))
        .collect();
    let places: Vec<usize> = extras
        .iter()
        .map(|_| rng.below(input.identities.len() + 1))
        .collect();

    for endpoint in &endpoints {
        let deps = IdentityDependencies::of(&input, endpoint);
        let base = compile_endpoint(&input, endpoint);
        let case = Case {
            seed,
            input: &input,
            endpoint,
            deps: &deps,
            base: &base,
        };
        // Added.
        for (x, at) in extras.iter().zip(&places) {
            let mut with = input.clone();
            with.identities.insert(*at, x.clone());
            case.check(stats, &with, None, Some(x));
        }
        // Removed.
        for (i, y) in input.identities.iter().enumerate() {
            let mut without = input.clone();
            without.identities.remove(i);
            case.check(stats, &without, Some(y), None);
        }
        // Changed in place.
        for (i, (y, changed)) in input.identities.iter().zip(&changes).enumerate() {
            if changed == y {
                continue;
            }
            let mut other = input.clone();
            other.identities[i] = changed.clone();
            case.check(stats, &other, Some(y), Some(changed));
        }
    }
}

#[test]
fn an_identity_judged_irrelevant_changes_no_compilation() {
    // The generators' alphabets this test relies on.
    assert_eq!((NAMESPACES.len(), APPS.len()), (3, 3));
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("TRELLIS_POLICY_SEED") {
        Some(s) => vec![s],
        None => (1..=env("TRELLIS_POLICY_CASES").unwrap_or(160)).collect(),
    };
    let many = seeds.len() > 1;
    let mut stats = Stats::default();
    for seed in seeds {
        run_case(seed, &mut stats);
    }
    let share = |n: usize, of: usize| n as f64 / of.max(1) as f64;
    eprintln!(
        "{} (endpoint, identity change) pairs: {} judged irrelevant ({:.0}%); {} where the \
         compilation depends on some identity, {} of them judged irrelevant ({:.0}%); {} relevant \
         and the compilation changed, {} relevant but it did not (false positives, {:.0}% of the \
         relevant)",
        stats.judged,
        stats.irrelevant,
        100.0 * share(stats.irrelevant, stats.judged),
        stats.nontrivial,
        stats.irrelevant_nontrivial,
        100.0 * share(stats.irrelevant_nontrivial, stats.nontrivial),
        stats.relevant_changed,
        stats.relevant_same,
        100.0 * share(stats.relevant_same, stats.judged - stats.irrelevant),
    );
    if many {
        assert!(
            share(stats.irrelevant, stats.judged) >= 0.25,
            "too few identities judged irrelevant to mean anything: {stats:?}"
        );
        assert!(
            share(stats.nontrivial, stats.judged) >= 0.25
                && share(stats.irrelevant_nontrivial, stats.nontrivial) >= 0.20,
            "too few irrelevant judgements where the policies read identities: {stats:?}"
        );
        assert!(
            share(stats.relevant_changed, stats.judged) >= 0.05,
            "relevant identities hardly ever change a compilation: the test could not tell \
             a too-lax summary: {stats:?}"
        );
    }
}
