//! Security identities (0004 §1): the reserved numbers, the label set that
//! decides which pods share an identity, what the compiler needs to know
//! about each identity, and how a node picks the number of a new label set
//! (0005): a stable hash of the labels names the first id to try, and the
//! next ids are probed from there.
//!
//! ```text
//!  SecurityLabels ── stable_hash: FNV-1a 64 over canonical bytes
//!        │
//!        ▼
//!  preferred_identity = 256 + hash mod (number of pod ids)
//!        │  held by another label set? try the next id (after the last, 256)
//!        ▼
//!  allocate → the first id that is free or already holds these labels
//! ```

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::ContainerPort;

use crate::fnv::Fnv1a;
use crate::ports::Protocol;

/// A wildcard in policy keys; never a packet's identity.
pub const ANY: u32 = 0;
/// An address of this node (health probes come from here).
pub const HOST: u32 = 1;
/// An address outside every known pod and CIDR.
pub const WORLD: u32 = 2;
/// The first pod identity (3–255 are reserved).
pub const POD_FIRST: u32 = 256;
/// The last pod identity.
pub const POD_LAST: u32 = 0x00ff_ffff;
/// The first CIDR identity; CIDR identities are local to a node.
pub const CIDR_FIRST: u32 = 0x0100_0000;

/// What kind of identity a number is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentityKind {
    /// [`ANY`], [`HOST`], [`WORLD`] or another number below [`POD_FIRST`].
    Reserved,
    /// A pod label set, cluster-wide.
    Pod,
    /// A policy prefix, local to a node.
    Cidr,
}

impl IdentityKind {
    /// The kind of `id`.
    pub fn of(id: u32) -> Self {
        match id {
            0..POD_FIRST => IdentityKind::Reserved,
            POD_FIRST..=POD_LAST => IdentityKind::Pod,
            _ => IdentityKind::Cidr,
        }
    }
}

/// The labels that decide a pod's identity: its namespace's name, the
/// namespace's labels and the pod's own labels. Pods with equal label sets
/// share one identity; this is the key whoever allocates identities maps to
/// numbers (it is `Ord` and `Hash`).
///
/// Every label counts, because a policy may select on any of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecurityLabels {
    /// The pod's namespace.
    pub namespace: String,
    /// The namespace's labels (including `kubernetes.io/metadata.name`, which
    /// the apiserver sets).
    pub namespace_labels: BTreeMap<String, String>,
    /// The pod's labels.
    pub pod_labels: BTreeMap<String, String>,
}

impl SecurityLabels {
    /// The label set of a pod in `namespace`.
    pub fn new(
        namespace: impl Into<String>,
        namespace_labels: BTreeMap<String, String>,
        pod_labels: BTreeMap<String, String>,
    ) -> Self {
        SecurityLabels {
            namespace: namespace.into(),
            namespace_labels,
            pod_labels,
        }
    }
}

impl SecurityLabels {
    /// A hash of the label set that is the same on every node, version and
    /// architecture: 64-bit FNV-1a (offset basis `0xcbf29ce484222325`, prime
    /// `0x100000001b3`) over this canonical encoding of the label set:
    ///
    /// ```text
    ///  str(namespace)  map(namespace_labels)  map(pod_labels)
    ///
    ///  str(s) = len(s)  the UTF-8 bytes of s
    ///  map(m) = len(m)  str(key) str(value) …   entries in ascending byte order of key
    ///  len(n) = n as a u64, little-endian (bytes for a string, entries for a map)
    /// ```
    ///
    /// Every length is written, so no two label sets share an encoding.
    ///
    /// **Never change this function or the encoding.** Nodes name new
    /// identities by it (0005), and two nodes agree on the number of a new
    /// label set only while they compute the same hash. In a cluster whose
    /// nodes run versions with different hashes, the same new label set would
    /// get a different number from each version: two identities for one label
    /// set, each selected alike by policy but each a separate IP-cache and
    /// policy entry on every node, until the operator collects the unused one.
    /// Tests pin the function with golden values.
    pub fn stable_hash(&self) -> u64 {
        let mut h = Encoder(Fnv1a::new());
        h.str(&self.namespace);
        h.map(&self.namespace_labels);
        h.map(&self.pod_labels);
        h.0.finish()
    }
}

/// The canonical encoding of [`SecurityLabels::stable_hash`], written into
/// the hash.
struct Encoder(Fnv1a);

impl Encoder {
    fn len(&mut self, n: usize) {
        // `usize` is at most 64 bits on every target Rust supports: lossless.
        self.0.write(&(n as u64).to_le_bytes());
    }

    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.write(s.as_bytes());
    }

    fn map(&mut self, m: &BTreeMap<String, String>) {
        // A BTreeMap<String, _> iterates in ascending byte order of its keys
        // (`str`'s `Ord` compares UTF-8 bytes), whatever order it was built in.
        self.len(m.len());
        for (k, v) in m {
            self.str(k);
            self.str(v);
        }
    }
}

/// The pod identity a label set asks for first (0005):
/// `POD_FIRST + stable_hash mod (POD_LAST − POD_FIRST + 1)`. Every node
/// computes the same number for the same labels, so two nodes that race to
/// create the identity of a new label set pick the same name and one create
/// wins.
pub fn preferred_identity(labels: &SecurityLabels) -> u32 {
    preferred_in(labels.stable_hash(), &POD_RANGE)
}

/// The id to use for `labels`: the first id, starting at
/// [`preferred_identity`] and probing upwards (after [`POD_LAST`] comes
/// [`POD_FIRST`]), that either already holds these labels or is free.
/// `taken(id)` answers the label set an existing identity holds, from the
/// caller's watch of `SecurityIdentity` objects; when the answer is `None`
/// the caller creates the identity, and on `AlreadyExists` (another node won
/// the race) reads it and calls again.
///
/// A label set can hold an identity off its probe path (after a race lost
/// with a different view of the taken ids), so callers look the labels up in
/// their index first and allocate only when they are not there.
pub fn allocate<L: Borrow<SecurityLabels>>(
    labels: &SecurityLabels,
    taken: impl FnMut(u32) -> Option<L>,
) -> Result<u32, IdentitySpaceFull> {
    allocate_in(labels, POD_RANGE, taken)
}

/// Every pod identity.
const POD_RANGE: RangeInclusive<u32> = POD_FIRST..=POD_LAST;

/// [`allocate`] within `range` (tests use small ranges).
fn allocate_in<L: Borrow<SecurityLabels>>(
    labels: &SecurityLabels,
    range: RangeInclusive<u32>,
    mut taken: impl FnMut(u32) -> Option<L>,
) -> Result<u32, IdentitySpaceFull> {
    let (first, last) = (*range.start(), *range.end());
    let start = preferred_in(labels.stable_hash(), &range);
    let mut id = start;
    loop {
        match taken(id) {
            None => return Ok(id),
            Some(held) if held.borrow() == labels => return Ok(id),
            Some(_) => {}
        }
        id = if id == last { first } else { id + 1 };
        if id == start {
            return Err(IdentitySpaceFull { first, last });
        }
    }
}

/// `range.start() + hash mod len(range)`.
fn preferred_in(hash: u64, range: &RangeInclusive<u32>) -> u32 {
    let len = u64::from(range.end() - range.start()) + 1;
    // The remainder is below `len`, which is at most 2^32: it fits a u32.
    range.start() + (hash % len) as u32
}

/// Every id of the range holds another label set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "every pod identity from {first} to {last} holds another label set; the operator frees identities that no node has used for ten minutes"
)]
pub struct IdentitySpaceFull {
    /// The first id of the range.
    pub first: u32,
    /// The last id of the range.
    pub last: u32,
}

impl fmt::Display for SecurityLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{", self.namespace)?;
        for (i, (k, v)) in self.pod_labels.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        f.write_str("}")
    }
}

/// Container ports by name: name → every (protocol, number) it stands for.
/// A set, because pods sharing an identity may number one name differently
/// (0004: then every such number counts for all of them).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPorts(BTreeMap<String, BTreeSet<(Protocol, u16)>>);

impl NamedPorts {
    /// No named ports.
    pub fn new() -> Self {
        NamedPorts::default()
    }

    /// Adds `name` → (`protocol`, `port`).
    pub fn insert(&mut self, name: impl Into<String>, protocol: Protocol, port: u16) {
        self.0
            .entry(name.into())
            .or_default()
            .insert((protocol, port));
    }

    /// Adds every named port of `other` (the union over the pods of an identity).
    pub fn extend(&mut self, other: &NamedPorts) {
        for (name, ports) in &other.0 {
            self.0.entry(name.clone()).or_default().extend(ports);
        }
    }

    /// The numbers `name` stands for with `protocol`, ascending.
    pub fn resolve<'a>(
        &'a self,
        name: &str,
        protocol: Protocol,
    ) -> impl Iterator<Item = u16> + use<'a> {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .filter(move |(p, _)| *p == protocol)
            .map(|(_, port)| *port)
    }

    /// Every (name, protocol, port), sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Protocol, u16)> {
        self.0
            .iter()
            .flat_map(|(name, ports)| ports.iter().map(move |(p, n)| (name.as_str(), *p, *n)))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The named ports of a pod's containers (`spec.containers[*].ports`).
    /// Unnamed ports, and ports the apiserver would have refused (a number
    /// outside 1–65535, an unknown protocol), are skipped.
    pub fn from_container_ports<'a>(ports: impl IntoIterator<Item = &'a ContainerPort>) -> Self {
        let mut named = NamedPorts::new();
        for p in ports {
            let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
                continue;
            };
            let Some(number) = u16::try_from(p.container_port).ok().filter(|n| *n != 0) else {
                continue;
            };
            named.insert(name, protocol, number);
        }
        named
    }
}

impl<S: Into<String>> FromIterator<(S, Protocol, u16)> for NamedPorts {
    fn from_iter<I: IntoIterator<Item = (S, Protocol, u16)>>(iter: I) -> Self {
        let mut named = NamedPorts::new();
        for (name, protocol, port) in iter {
            named.insert(name, protocol, port);
        }
        named
    }
}

/// What the compiler knows about one pod identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityInfo {
    /// The number, in `POD_FIRST..=POD_LAST`.
    pub id: u32,
    /// The label set the number stands for (namespace selectors are decided
    /// from its `namespace_labels`).
    pub labels: SecurityLabels,
    /// The union of the named container ports of the pods with this identity.
    pub named_ports: NamedPorts,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::map;

    fn labels(ns: &str, ns_labels: &[(&str, &str)], pod: &[(&str, &str)]) -> SecurityLabels {
        SecurityLabels::new(ns, map(ns_labels), map(pod))
    }

    fn payments() -> SecurityLabels {
        labels(
            "payments",
            &[
                ("kubernetes.io/metadata.name", "payments"),
                ("team", "payments"),
            ],
            &[("app", "checkout"), ("tier", "backend")],
        )
    }

    /// Golden values: these numbers are part of every cluster's state (0005).
    /// If this test fails, the change renumbers identities; revert it.
    /// (Computed independently of this code from the documented encoding.)
    #[test]
    fn stable_hash_and_preferred_identity_never_change() {
        let cases = [
            (labels("", &[], &[]), 0x81d2_3fd7_003c_2305, 15_066_373),
            (
                labels(
                    "default",
                    &[("kubernetes.io/metadata.name", "default")],
                    &[],
                ),
                0x84ff_b825_2162_fe64,
                8_936_804,
            ),
            (payments(), 0x60b5_0619_f25e_c62e, 3_022_894),
            (
                labels(
                    "kube-system",
                    &[("kubernetes.io/metadata.name", "kube-system")],
                    &[("k8s-app", "kube-dns"), ("pod-template-hash", "7db6d8ff4d")],
                ),
                0xa6c9_4ffc_be2a_23ff,
                15_784_191,
            ),
            // Lengths count UTF-8 bytes, not characters.
            (
                labels("é", &[], &[("ключ", "v")]),
                0xada4_9a00_9dd9_e227,
                8_374_311,
            ),
        ];
        for (l, hash, id) in cases {
            assert_eq!(l.stable_hash(), hash, "{l}");
            assert_eq!(preferred_identity(&l), id, "{l}");
        }
    }

    #[test]
    fn the_hash_depends_on_the_labels_not_on_their_order() {
        let forwards = payments();
        let mut backwards = SecurityLabels::new("payments", BTreeMap::new(), BTreeMap::new());
        for (k, v) in forwards.namespace_labels.iter().rev() {
            backwards.namespace_labels.insert(k.clone(), v.clone());
        }
        for (k, v) in forwards.pod_labels.iter().rev() {
            backwards.pod_labels.insert(k.clone(), v.clone());
        }
        assert_eq!(forwards.stable_hash(), backwards.stable_hash());
        assert_eq!(forwards.stable_hash(), payments().stable_hash());
    }

    #[test]
    fn every_part_of_the_label_set_counts() {
        let base = labels("a", &[("k", "v")], &[("k", "v")]);
        let variants = [
            // The same label on the namespace or on the pod differs.
            labels("a", &[], &[("k", "v"), ("x", "y")]),
            labels("a", &[("k", "v"), ("x", "y")], &[("k", "v")]),
            labels("a", &[("k", "v")], &[("k", "v"), ("x", "y")]),
            // Lengths are written, so moving bytes across a boundary differs.
            labels("ak", &[], &[("k", "v")]),
            labels("a", &[("kv", "")], &[("k", "v")]),
            labels("a", &[("k", "v")], &[("k", "vv")]),
            labels("b", &[("k", "v")], &[("k", "v")]),
        ];
        let mut seen = BTreeSet::from([base.stable_hash()]);
        for v in &variants {
            assert!(seen.insert(v.stable_hash()), "{v:?} collides");
        }
    }

    #[test]
    fn distinct_label_sets_mostly_get_distinct_ids() {
        // 20,000 label sets in 16.7 million ids: about 12 pairs collide by
        // chance (n² / 2N); far more would mean a badly spread hash.
        let n = 20_000;
        let ids: BTreeSet<u32> = (0..n)
            .map(|i| {
                let app = format!("app-{i}");
                let l = labels(&format!("ns-{}", i % 7), &[], &[("app", app.as_str())]);
                let id = preferred_identity(&l);
                assert!((POD_FIRST..=POD_LAST).contains(&id), "{id}");
                id
            })
            .collect();
        let collisions = n - ids.len();
        assert!(
            collisions <= 40,
            "{collisions} collisions among {n} label sets"
        );
    }

    #[test]
    fn allocate_takes_the_preferred_id_when_free_or_already_ours() {
        let l = payments();
        let preferred = preferred_identity(&l);
        assert_eq!(allocate(&l, |_| None::<&SecurityLabels>), Ok(preferred));
        let same = payments();
        assert_eq!(
            allocate(&l, |id| (id == preferred).then_some(&same)),
            Ok(preferred)
        );
    }

    #[test]
    fn allocate_probes_past_other_label_sets() {
        let l = payments();
        let preferred = preferred_identity(&l);
        let other = labels("payments", &[], &[("app", "other")]);
        // The next two ids hold other labels, the third holds ours: ours wins
        // even though a free id would come later.
        let ours = payments();
        let taken = |id: u32| match id - preferred {
            0 | 1 => Some(&other),
            2 => Some(&ours),
            _ => None,
        };
        assert_eq!(allocate(&l, taken), Ok(preferred + 2));
        // Without ours on the path, the first free id.
        let taken = |id: u32| (id - preferred < 2).then_some(&other);
        assert_eq!(allocate(&l, taken), Ok(preferred + 2));
    }

    #[test]
    fn probing_wraps_around_inside_the_range() {
        let l = payments();
        let other = labels("x", &[], &[]);
        // In 256..=263 the payments labels prefer 256 + hash mod 8 = 262.
        let range = 256..=263;
        assert_eq!(preferred_in(l.stable_hash(), &range), 262);
        let inside = |id: u32| assert!(range.contains(&id), "probed {id} outside the range");
        // 262 and 263 are taken: the probe goes on at 256, never past 263.
        let taken = |id: u32| {
            inside(id);
            (id >= 262).then_some(&other)
        };
        assert_eq!(allocate_in(&l, range.clone(), taken), Ok(256));
        // Only 261, the id before the preferred one, is free.
        let taken = |id: u32| {
            inside(id);
            (id != 261).then_some(&other)
        };
        assert_eq!(allocate_in(&l, range.clone(), taken), Ok(261));
        // The real range: everything from the preferred id up to POD_LAST is
        // taken, so the label set gets POD_FIRST.
        let preferred = preferred_identity(&l);
        let taken = |id: u32| {
            assert!((POD_FIRST..=POD_LAST).contains(&id), "probed {id}");
            (id >= preferred).then_some(&other)
        };
        assert_eq!(allocate(&l, taken), Ok(POD_FIRST));
    }

    #[test]
    fn a_full_range_is_an_error_not_a_loop() {
        let l = payments();
        let other = labels("x", &[], &[]);
        let range = 1000..=1015;
        let probed = std::cell::Cell::new(0u32);
        let taken = |_| {
            probed.set(probed.get() + 1);
            Some(&other)
        };
        assert_eq!(
            allocate_in(&l, range, taken),
            Err(IdentitySpaceFull {
                first: 1000,
                last: 1015
            })
        );
        assert_eq!(probed.get(), 16, "every id is probed exactly once");
        // One id holding our labels is found wherever it is.
        let ours = payments();
        for at in 1000..=1015 {
            let taken = |id: u32| Some(if id == at { &ours } else { &other });
            assert_eq!(allocate_in(&l, 1000..=1015, taken), Ok(at));
        }
    }

    #[test]
    fn pod_range_matches_the_api() {
        assert_eq!(POD_FIRST, trellis_api::v1alpha1::POD_IDENTITY_FIRST);
        assert_eq!(POD_LAST, trellis_api::v1alpha1::POD_IDENTITY_LAST);
    }

    #[test]
    fn kinds_follow_0004() {
        let cases = [
            (ANY, IdentityKind::Reserved),
            (HOST, IdentityKind::Reserved),
            (WORLD, IdentityKind::Reserved),
            (255, IdentityKind::Reserved),
            (256, IdentityKind::Pod),
            (0x00ff_ffff, IdentityKind::Pod),
            (0x0100_0000, IdentityKind::Cidr),
            (u32::MAX, IdentityKind::Cidr),
        ];
        for (id, want) in cases {
            assert_eq!(IdentityKind::of(id), want, "{id:#x}");
        }
    }

    #[test]
    fn named_ports_resolve_by_name_and_protocol() {
        let named: NamedPorts = [
            ("http", Protocol::Tcp, 8080),
            ("http", Protocol::Tcp, 80),
            ("dns", Protocol::Udp, 53),
            ("dns", Protocol::Tcp, 53),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            named.resolve("http", Protocol::Tcp).collect::<Vec<_>>(),
            [80, 8080]
        );
        assert_eq!(named.resolve("http", Protocol::Udp).count(), 0);
        assert_eq!(
            named.resolve("dns", Protocol::Udp).collect::<Vec<_>>(),
            [53]
        );
        assert_eq!(named.resolve("nope", Protocol::Tcp).count(), 0);
    }

    #[test]
    fn container_ports_skip_what_the_apiserver_refuses() {
        let port = |name: Option<&str>, number: i32, protocol: Option<&str>| ContainerPort {
            name: name.map(str::to_owned),
            container_port: number,
            protocol: protocol.map(str::to_owned),
            ..Default::default()
        };
        let ports = [
            port(Some("http"), 80, None),
            port(Some("dns"), 53, Some("UDP")),
            port(None, 9000, None),
            port(Some("bad"), 0, None),
            port(Some("big"), 70_000, None),
            port(Some("weird"), 1, Some("ICMP")),
        ];
        let named = NamedPorts::from_container_ports(&ports);
        let got: Vec<_> = named.iter().collect();
        assert_eq!(
            got,
            [("dns", Protocol::Udp, 53), ("http", Protocol::Tcp, 80)]
        );
    }
}
