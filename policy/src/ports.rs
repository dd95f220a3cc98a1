//! Protocols and port prefixes (0004 §4): a port range becomes the fewest
//! aligned prefixes `(port, plen)` that cover it exactly, as in a routing
//! table, so the datapath finds a range with at most 17 hash lookups.

use std::fmt;

/// A protocol a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// IANA 6.
    Tcp,
    /// IANA 17.
    Udp,
    /// IANA 132.
    Sctp,
}

impl Protocol {
    /// Every protocol, in IANA order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IANA protocol number, as in the IP header and the policy key.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol with IANA number `n`, when it has ports.
    pub fn from_number(n: u8) -> Option<Self> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    /// Kubernetes' spelling (case-sensitive, as the apiserver validates it);
    /// unset means TCP. `None` for anything else.
    pub fn from_k8s(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }

    /// Kubernetes' spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl From<trellis_api::v1alpha1::Protocol> for Protocol {
    fn from(p: trellis_api::v1alpha1::Protocol) -> Self {
        use trellis_api::v1alpha1::Protocol as Api;
        match p {
            Api::Tcp => Protocol::Tcp,
            Api::Udp => Protocol::Udp,
            Api::Sctp => Protocol::Sctp,
        }
    }
}

impl From<Protocol> for trellis_api::v1alpha1::Protocol {
    fn from(p: Protocol) -> Self {
        use trellis_api::v1alpha1::Protocol as Api;
        match p {
            Protocol::Tcp => Api::Tcp,
            Protocol::Udp => Api::Udp,
            Protocol::Sctp => Api::Sctp,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An aligned block of ports: the `plen` high bits of `port` are fixed, the
/// other `16 − plen` bits are free (and zero in `port`). `plen` 16 is one
/// port, `plen` 0 every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    /// The first port of the block (its low `16 − plen` bits are zero).
    pub port: u16,
    /// How many high bits are fixed, 0 to 16.
    pub plen: u8,
}

impl PortPrefix {
    /// The first port of the block.
    pub fn first(self) -> u16 {
        self.port
    }

    /// The last port of the block.
    pub fn last(self) -> u16 {
        self.port | !mask(self.plen)
    }

    /// Whether `port` is in the block.
    pub fn contains(self, port: u16) -> bool {
        port & mask(self.plen) == self.port
    }
}

/// The mask of the `plen` high bits of a port (`plen` above 16 counts as 16).
/// This is 0004's `port >> (16 − n) << (16 − n)`, written without a shift by
/// 16, which C defines for `int` but Rust does not for `u16`.
pub fn mask(plen: u8) -> u16 {
    match plen {
        0 => 0,
        n if n >= 16 => u16::MAX,
        n => u16::MAX << (16 - u32::from(n)),
    }
}

/// The fewest aligned prefixes whose union is exactly `first..=last`, in
/// ascending order; empty when `first > last`.
///
/// Greedy from the bottom: take the largest block that starts at the next
/// uncovered port (so is aligned there) and does not pass `last`. The blocks
/// taken are exactly the maximal aligned blocks inside the range, and every
/// exact cover needs at least one block inside each of those, so none is
/// smaller. At most 30 prefixes (for `1..=65534`).
pub fn port_prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut next, last) = (u32::from(first), u32::from(last));
    while next <= last {
        // Largest k with next aligned to 2^k and next + 2^k − 1 ≤ last.
        let mut k = if next == 0 {
            16
        } else {
            next.trailing_zeros().min(16)
        };
        while next + (1 << k) - 1 > last {
            k -= 1;
        }
        out.push(PortPrefix {
            // `next` ≤ `last` ≤ 65535 here, and `k` ≤ 16.
            port: next as u16,
            plen: (16 - k) as u8,
        });
        next += 1 << k;
    }
    out
}

/// The fewest port-prefix entries whose longest-prefix match gives each
/// port its value: `runs` are `(first, last, value)` in ascending order,
/// contiguous from 0 to 65535. A port whose run is `None` must be covered
/// by no entry (it falls through to `background`, whatever that is for the
/// caller); a port with `Some(v)` must be covered by an entry of value `v`,
/// or by none when `background` is `Some(v)`. Returns the entries in
/// ascending (port, length) order.
///
/// A dynamic program over the binary trie of port prefixes (as in optimal
/// routing-table compression): at each aligned block, either no entry
/// (both halves inherit what covers the block) or one entry whose value is
/// one of the values inside the block (another value would be overridden
/// everywhere below, so it can be dropped). Only blocks that hold more than
/// one run are split, so the work grows with the number of runs, not with
/// 65,536.
pub fn lpm_cover<L: Copy + Eq + std::hash::Hash + Ord>(
    runs: &[(u16, u16, Option<L>)],
    background: Option<L>,
) -> Vec<(PortPrefix, L)> {
    let mut cover = Cover {
        runs,
        background,
        memo: std::collections::HashMap::new(),
    };
    let root = PortPrefix { port: 0, plen: 0 };
    cover.cost(root, None);
    let mut out = Vec::new();
    cover.collect(root, None, &mut out);
    out.sort_by_key(|(p, _)| (p.port, p.plen));
    out
}

/// "No entry can do it": large enough never to win, small enough to add.
const INFEASIBLE: u32 = u32::MAX / 4;

struct Cover<'a, L> {
    runs: &'a [(u16, u16, Option<L>)],
    background: Option<L>,
    /// (block, what covers it from above) → (cost, the entry placed at the block).
    memo: std::collections::HashMap<(PortPrefix, Option<L>), (u32, Option<L>)>,
}

/// The values of the runs inside a block.
enum Inside<L> {
    /// One run covers the block.
    One(Option<L>),
    /// Several: their distinct values, and whether one is `None`.
    Many(Vec<L>, bool),
}

impl<L: Copy + Eq + std::hash::Hash + Ord> Cover<'_, L> {
    fn inside(&self, block: PortPrefix) -> Inside<L> {
        let (first, last) = (block.first(), block.last());
        // The first run that ends at or after `first`.
        let start = self.runs.partition_point(|r| r.1 < first);
        let mut values = Vec::new();
        let mut uncovered = false;
        let mut count = 0;
        for r in self.runs[start..].iter().take_while(|r| r.0 <= last) {
            count += 1;
            match r.2 {
                Some(v) => values.push(v),
                None => uncovered = true,
            }
        }
        // A single port is one run (runs do not overlap); `count` 0 would
        // be runs that leave a gap: no entry goes there.
        if count <= 1 || block.plen >= 16 {
            return Inside::One(values.first().copied());
        }
        values.sort();
        values.dedup();
        Inside::Many(values, uncovered)
    }

    fn halves(block: PortPrefix) -> [PortPrefix; 2] {
        let plen = block.plen + 1;
        let high = PortPrefix {
            port: block.port | (1 << (16 - u32::from(plen))),
            plen,
        };
        [
            PortPrefix {
                port: block.port,
                plen,
            },
            high,
        ]
    }

    /// The fewest entries inside `block` when `above` is the value of the
    /// entry covering it (`None`: no entry does).
    fn cost(&mut self, block: PortPrefix, above: Option<L>) -> u32 {
        if let Some((c, _)) = self.memo.get(&(block, above)) {
            return *c;
        }
        let seen = above.or(self.background);
        let result = match self.inside(block) {
            Inside::One(None) if above.is_some() => (INFEASIBLE, None),
            Inside::One(None) => (0, None),
            Inside::One(Some(v)) if seen == Some(v) => (0, None),
            Inside::One(Some(v)) => (1, Some(v)),
            Inside::Many(values, uncovered) => {
                let [lo, hi] = Self::halves(block);
                let mut best = (self.cost(lo, above) + self.cost(hi, above), None);
                if !uncovered {
                    for v in values {
                        if above == Some(v) {
                            continue;
                        }
                        let c = 1 + self.cost(lo, Some(v)) + self.cost(hi, Some(v));
                        if c < best.0 {
                            best = (c, Some(v));
                        }
                    }
                }
                best
            }
        };
        self.memo.insert((block, above), result);
        result.0
    }

    fn collect(&mut self, block: PortPrefix, above: Option<L>, out: &mut Vec<(PortPrefix, L)>) {
        self.cost(block, above);
        let Some(&(_, placed)) = self.memo.get(&(block, above)) else {
            return;
        };
        if let Some(v) = placed {
            out.push((block, v));
        }
        if let Inside::Many(..) = self.inside(block) {
            let below = placed.or(above);
            for half in Self::halves(block) {
                self.collect(half, below, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cover(first: u16, last: u16) -> Vec<(u16, u8)> {
        port_prefixes(first, last)
            .into_iter()
            .map(|p| (p.port, p.plen))
            .collect()
    }

    #[test]
    fn known_covers() {
        type Case = (u16, u16, &'static [(u16, u8)]);
        let cases: &[Case] = &[
            (80, 80, &[(80, 16)]),
            (0, 65535, &[(0, 0)]),
            (
                1,
                65535,
                &[
                    (1, 16),
                    (2, 15),
                    (4, 14),
                    (8, 13),
                    (16, 12),
                    (32, 11),
                    (64, 10),
                    (128, 9),
                    (256, 8),
                    (512, 7),
                    (1024, 6),
                    (2048, 5),
                    (4096, 4),
                    (8192, 3),
                    (16384, 2),
                    (32768, 1),
                ],
            ),
            (8080, 8090, &[(8080, 13), (8088, 15), (8090, 16)]),
            (32768, 65535, &[(32768, 1)]),
            (65535, 65535, &[(65535, 16)]),
            (10, 9, &[]),
        ];
        for (first, last, want) in cases {
            assert_eq!(cover(*first, *last), *want, "{first}..={last}");
        }
    }

    #[test]
    fn the_worst_case_is_thirty() {
        assert_eq!(port_prefixes(1, 65534).len(), 30);
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0), 0);
        assert_eq!(mask(1), 0x8000);
        assert_eq!(mask(15), 0xfffe);
        assert_eq!(mask(16), 0xffff);
        assert_eq!(mask(200), 0xffff);
    }

    #[test]
    fn protocols_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_number(p.number()), Some(p));
            assert_eq!(Protocol::from_k8s(Some(p.as_str())), Some(p));
        }
        assert_eq!(Protocol::from_k8s(None), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("tcp")), None);
        assert_eq!(Protocol::from_k8s(Some("ICMP")), None);
        assert_eq!(Protocol::from_number(1), None);
        assert_eq!(
            Protocol::ALL.map(Protocol::number),
            [6, 17, 132],
            "IANA numbers"
        );
    }

    /// What a longest-prefix match over `entries` gives `port`, or
    /// `background` when no entry covers it.
    fn lpm(entries: &[(PortPrefix, u32)], background: Option<u32>, port: u16) -> Option<u32> {
        entries
            .iter()
            .filter(|(p, _)| p.contains(port))
            .max_by_key(|(p, _)| p.plen)
            .map(|(_, v)| *v)
            .or(background)
    }

    #[test]
    fn lpm_cover_known_cases() {
        // Everything but 22: one entry over the background, one under it.
        let runs = [(0, 21, Some(1)), (22, 22, Some(2)), (23, 65535, Some(1))];
        let got = lpm_cover(&runs, Some(1));
        assert_eq!(got, [(PortPrefix { port: 22, plen: 16 }, 2)]);
        let got = lpm_cover(&runs, None);
        assert_eq!(
            got,
            [
                (PortPrefix { port: 0, plen: 0 }, 1),
                (PortPrefix { port: 22, plen: 16 }, 2)
            ]
        );
        // A hole that must fall through cannot sit under an entry.
        let runs = [(0, 79, Some(1)), (80, 80, None), (81, 65535, Some(1))];
        let got = lpm_cover(&runs, None);
        assert!(got.iter().all(|(p, _)| !p.contains(80)), "{got:?}");
        assert_eq!(
            got.len(),
            port_prefixes(0, 79).len() + port_prefixes(81, 65535).len()
        );
        // Nothing to say: no entries.
        assert!(lpm_cover::<u32>(&[(0, 65535, None)], None).is_empty());
        assert!(lpm_cover(&[(0, 65535, Some(3))], Some(3)).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Random piecewise functions over the ports: the cover gives every
        /// port its value, covers no port that must fall through, and is
        /// never larger than covering each run on its own.
        #[test]
        fn lpm_cover_is_exact_and_small(
            cuts in proptest::collection::btree_set(1u16..=65535, 0..12),
            values in proptest::collection::vec(proptest::option::of(0u32..4), 13),
            background in proptest::option::of(0u32..4),
            probes in proptest::collection::vec(any::<u16>(), 64),
        ) {
            let mut starts: Vec<u16> = std::iter::once(0).chain(cuts).collect();
            starts.dedup();
            let runs: Vec<(u16, u16, Option<u32>)> = starts
                .iter()
                .enumerate()
                .map(|(i, first)| {
                    let last = starts.get(i + 1).map_or(u16::MAX, |n| n - 1);
                    (*first, last, values[i])
                })
                .collect();
            let got = lpm_cover(&runs, background);
            let want_at = |port: u16| {
                runs.iter().find(|r| r.0 <= port && port <= r.1).and_then(|r| r.2)
            };
            let mut ports: Vec<u16> = probes;
            for r in &runs {
                ports.extend([r.0, r.1]);
            }
            for port in ports {
                match want_at(port) {
                    Some(v) => prop_assert_eq!(lpm(&got, background, port), Some(v), "port {}", port),
                    None => prop_assert!(
                        got.iter().all(|(p, _)| !p.contains(port)),
                        "port {} must stay uncovered: {:?}", port, got
                    ),
                }
            }
            let naive: usize = runs
                .iter()
                .filter(|r| r.2.is_some() && r.2 != background)
                .map(|r| port_prefixes(r.0, r.1).len())
                .sum();
            prop_assert!(got.len() <= naive, "{} entries, {} by runs", got.len(), naive);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Exact, aligned, disjoint and minimal. Minimal is checked without
        /// trusting the algorithm: an exact cover by aligned blocks is minimal
        /// iff no block's parent (the aligned block twice its size that holds
        /// it) lies inside the range, i.e. every block is maximal.
        #[test]
        fn cover_is_exact_aligned_and_minimal(a in any::<u16>(), b in any::<u16>()) {
            let (first, last) = (a.min(b), a.max(b));
            let prefixes = port_prefixes(first, last);
            let mut expect = u32::from(first);
            for p in &prefixes {
                prop_assert!(p.plen <= 16);
                prop_assert_eq!(p.port & !mask(p.plen), 0, "aligned: {:?}", p);
                // Ascending and contiguous: together with the ends this is
                // "union == range" and "disjoint".
                prop_assert_eq!(u32::from(p.first()), expect, "contiguous: {:?}", p);
                expect = u32::from(p.last()) + 1;
                if p.plen > 0 {
                    let parent = PortPrefix { port: p.port & mask(p.plen - 1), plen: p.plen - 1 };
                    prop_assert!(
                        parent.first() < first || parent.last() > last,
                        "{:?} could merge into {:?} inside {}..={}", p, parent, first, last
                    );
                }
            }
            prop_assert_eq!(expect, u32::from(last) + 1);
        }

        /// Membership agrees with the range for every port near the ends.
        #[test]
        fn membership_matches_range(a in any::<u16>(), b in any::<u16>(), probe in any::<u16>()) {
            let (first, last) = (a.min(b), a.max(b));
            let prefixes = port_prefixes(first, last);
            for port in [probe, first, last, first.wrapping_sub(1), last.wrapping_add(1)] {
                let inside = (first..=last).contains(&port);
                let covered = prefixes.iter().filter(|p| p.contains(port)).count();
                prop_assert_eq!(covered, usize::from(inside), "port {}", port);
            }
        }
    }
}
