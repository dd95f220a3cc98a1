//! Compiled tables and the datapath's lookup (0004 "Maps" and "Per packet").
//!
//! ```text
//!  packet (remote id, cidr_id, proto, port)
//!     │  for ident in [id, cidr_id, ANY] (repeats skipped):
//!     │     TCP/UDP/SCTP: n = 16 … 0 with bit n set
//!     │                               → (ident, proto, n, port & mask(n))
//!     │     any-protocol bit set?      → (ident, 0, 0, 0)
//!     ▼  first entry found decides; none → no match (the datapath drops)
//! ```
//!
//! Within one identity the most specific entry comes first: an exact port,
//! then shorter port prefixes, then every protocol. That lets one identity
//! say "everything, except TCP 22" with two entries, which ordered policy
//! (`Deny` under an `Allow`, design 0006) needs; with only allows, as
//! NetworkPolicy has, the order within an identity changes no verdict.
//!
//! Keep [`lookup`] in sync with `node-reconciler/bpf/` (`endpoint.bpf.c`):
//! the BPF tests check the programs against it on synthetic packets.

use std::collections::BTreeMap;

use crate::identity::ANY;
use crate::ports::{PortPrefix, Protocol, mask};

/// Bit of [`DirectionTable::plens`] that says the table has any-protocol
/// entries (bits 0–16 are port prefix lengths).
pub const PLENS_ANY_PROTOCOL: u32 = 1 << 17;

/// The two directions of a pod's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// What the pod receives.
    Ingress,
    /// What the pod sends.
    Egress,
}

impl Direction {
    /// The NetworkPolicy spelling (`policyTypes`).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }
}

/// A policy map key, without the table's `policy` id (0004
/// `trellis_policy`). Any-protocol keys are `(identity, 0, 0, 0)`; otherwise
/// `port` is already masked to `plen` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The remote identity, or [`ANY`].
    pub identity: u32,
    /// IANA protocol number; 0 for any protocol.
    pub proto: u8,
    /// Port prefix length, 0 to 16.
    pub plen: u8,
    /// The port prefix, masked to `plen` bits.
    pub port: u16,
}

impl Key {
    /// Every protocol and port from `identity`.
    pub fn any_protocol(identity: u32) -> Self {
        Key {
            identity,
            proto: 0,
            plen: 0,
            port: 0,
        }
    }

    /// The ports of `prefix` with `protocol` from `identity`.
    pub fn ports(identity: u32, protocol: Protocol, prefix: PortPrefix) -> Self {
        let plen = prefix.plen.min(16);
        Key {
            identity,
            proto: protocol.number(),
            plen,
            port: prefix.port & mask(plen),
        }
    }
}

/// What a matching entry does (0004: `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Action {
    /// Pass (and track the connection).
    Allow = 1,
    /// Drop.
    Deny = 2,
}

/// A policy map value: the provenance of the entry and what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    /// The provenance index (see [`crate::compile::Provenance`]).
    pub rule: u32,
    /// Allow or deny.
    pub action: Action,
}

/// One direction of one endpoint: whether it is isolated, and if so what
/// passes. A table that is not isolated has no entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirectionTable {
    /// Whether policy applies in this direction (0004 endpoint `flags`).
    pub isolated: bool,
    /// The entries, by key.
    pub entries: BTreeMap<Key, Entry>,
}

impl DirectionTable {
    /// The prefix-length mask the datapath keeps next to the table: bit `n`
    /// for entries with port prefix length `n` (0–16), bit 17
    /// ([`PLENS_ANY_PROTOCOL`]) for any-protocol entries.
    pub fn plens(&self) -> u32 {
        self.entries.keys().fold(0, |bits, k| {
            if k.proto == 0 {
                bits | PLENS_ANY_PROTOCOL
            } else if k.plen <= 16 {
                bits | 1 << k.plen
            } else {
                bits
            }
        })
    }

    /// The datapath's verdict after connection tracking (0004 steps 3–4): a
    /// direction that is not isolated passes everything; otherwise what
    /// [`lookup`] finds, and nothing found is a drop.
    pub fn permits(&self, id: u32, cidr_id: u32, proto: u8, port: u16) -> bool {
        !self.isolated
            || matches!(
                lookup(self, id, cidr_id, proto, port),
                Decision::Allow { .. }
            )
    }
}

/// Both directions of one endpoint. Endpoints whose compiled policies (and
/// provenance) are equal can share one `policy` id: equal values compare and
/// hash equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointPolicy {
    /// What the endpoint receives.
    pub ingress: DirectionTable,
    /// What the endpoint sends.
    pub egress: DirectionTable,
}

impl EndpointPolicy {
    /// The table of `direction`.
    pub fn table(&self, direction: Direction) -> &DirectionTable {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// What the lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Decision {
    /// An allow entry, from `rule`.
    Allow {
        /// Its provenance index.
        rule: u32,
    },
    /// A deny entry, from `rule`.
    Deny {
        /// Its provenance index.
        rule: u32,
    },
    /// No entry: an isolated direction drops.
    NoMatch,
}

/// 0004 step 4, exactly: for each of `id`, `cidr_id`, [`ANY`] in that order,
/// skipping repeats, look up — for TCP, UDP and SCTP only — each prefix
/// length the table uses from 16 down to 0, then the any-protocol key when
/// the table has any-protocol entries; the first entry found decides.
/// Isolation is not looked at (that is step 3, see
/// [`DirectionTable::permits`]).
pub fn lookup(table: &DirectionTable, id: u32, cidr_id: u32, proto: u8, port: u16) -> Decision {
    let plens = table.plens();
    let has_ports = Protocol::from_number(proto).is_some();
    let idents = [id, cidr_id, ANY];
    for (i, &identity) in idents.iter().enumerate() {
        if idents[..i].contains(&identity) {
            continue;
        }
        let probe = |key: Key| table.entries.get(&key).copied();
        let mut found = None;
        if has_ports {
            found = (0..=16u8)
                .rev()
                .filter(|n| plens & (1 << n) != 0)
                .find_map(|n| {
                    probe(Key {
                        identity,
                        proto,
                        plen: n,
                        port: port & mask(n),
                    })
                });
        }
        if found.is_none() && plens & PLENS_ANY_PROTOCOL != 0 {
            found = probe(Key::any_protocol(identity));
        }
        if let Some(entry) = found {
            return match entry.action {
                Action::Allow => Decision::Allow { rule: entry.rule },
                Action::Deny => Decision::Deny { rule: entry.rule },
            };
        }
    }
    Decision::NoMatch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{HOST, WORLD};

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMP: u8 = 1;

    fn table(entries: &[(Key, u32, Action)]) -> DirectionTable {
        DirectionTable {
            isolated: true,
            entries: entries
                .iter()
                .map(|(k, rule, action)| {
                    (
                        *k,
                        Entry {
                            rule: *rule,
                            action: *action,
                        },
                    )
                })
                .collect(),
        }
    }

    fn key(identity: u32, proto: u8, plen: u8, port: u16) -> Key {
        Key {
            identity,
            proto,
            plen,
            port,
        }
    }

    #[test]
    fn plens_mask() {
        let t = table(&[
            (key(300, TCP, 16, 80), 1, Action::Allow),
            (key(300, UDP, 0, 0), 2, Action::Allow),
            (key(300, TCP, 13, 8080), 3, Action::Allow),
        ]);
        assert_eq!(t.plens(), 1 << 16 | 1 | 1 << 13);
        let t = table(&[(Key::any_protocol(ANY), 1, Action::Allow)]);
        assert_eq!(t.plens(), PLENS_ANY_PROTOCOL);
        assert_eq!(DirectionTable::default().plens(), 0);
    }

    /// The order of 0004 step 4: identity before CIDR identity before ANY;
    /// within one identity, longer port prefixes first, any-protocol last.
    #[test]
    fn lookup_order() {
        use Action::*;
        let t = table(&[
            (key(300, TCP, 16, 80), 1, Deny),
            (key(300, TCP, 0, 0), 2, Allow),
            (Key::any_protocol(0x0100_0000), 3, Deny),
            (key(ANY, TCP, 13, 8080), 4, Allow),
            (key(ANY, UDP, 16, 53), 5, Allow),
            (Key::any_protocol(HOST), 6, Allow),
            (key(301, TCP, 16, 443), 7, Allow),
            (Key::any_protocol(301), 8, Deny),
        ]);
        let cidr = 0x0100_0000;
        let cases = [
            // (id, cidr_id, proto, port) → decision
            ((300, WORLD, TCP, 80), Decision::Deny { rule: 1 }),
            ((300, WORLD, TCP, 81), Decision::Allow { rule: 2 }),
            ((300, cidr, TCP, 81), Decision::Allow { rule: 2 }),
            ((300, cidr, UDP, 53), Decision::Deny { rule: 3 }),
            ((300, WORLD, UDP, 53), Decision::Allow { rule: 5 }),
            ((300, WORLD, UDP, 54), Decision::NoMatch),
            ((WORLD, WORLD, TCP, 8087), Decision::Allow { rule: 4 }),
            ((WORLD, WORLD, TCP, 8088), Decision::NoMatch),
            ((HOST, WORLD, ICMP, 0), Decision::Allow { rule: 6 }),
            ((WORLD, WORLD, ICMP, 0), Decision::NoMatch),
            // Ports are looked at before any-protocol for the same identity.
            ((301, WORLD, TCP, 443), Decision::Allow { rule: 7 }),
            ((301, WORLD, TCP, 444), Decision::Deny { rule: 8 }),
            ((301, WORLD, ICMP, 0), Decision::Deny { rule: 8 }),
            // Protocols without ports see only any-protocol entries.
            ((300, WORLD, ICMP, 80), Decision::NoMatch),
        ];
        for ((id, cidr_id, proto, port), want) in cases {
            assert_eq!(
                lookup(&t, id, cidr_id, proto, port),
                want,
                "id {id} cidr {cidr_id:#x} proto {proto} port {port}"
            );
        }
    }

    #[test]
    fn repeats_are_skipped_and_any_is_last() {
        let t = table(&[(key(ANY, TCP, 16, 80), 9, Action::Allow)]);
        assert_eq!(lookup(&t, ANY, ANY, TCP, 80), Decision::Allow { rule: 9 });
        assert_eq!(lookup(&t, 300, 300, TCP, 80), Decision::Allow { rule: 9 });
    }

    #[test]
    fn permits_follows_isolation() {
        let open = DirectionTable::default();
        assert!(open.permits(WORLD, WORLD, TCP, 1));
        let closed = DirectionTable {
            isolated: true,
            ..Default::default()
        };
        assert!(!closed.permits(WORLD, WORLD, TCP, 1));
        let deny = table(&[(Key::any_protocol(ANY), 1, Action::Deny)]);
        assert!(!deny.permits(WORLD, WORLD, TCP, 1));
    }

    #[test]
    fn keys_are_masked() {
        let k = Key::ports(
            300,
            Protocol::Udp,
            PortPrefix {
                port: 8095,
                plen: 13,
            },
        );
        assert_eq!(k, key(300, UDP, 13, 8088));
        let k = Key::ports(300, Protocol::Tcp, PortPrefix { port: 1, plen: 0 });
        assert_eq!(k, key(300, TCP, 0, 0));
    }
}
