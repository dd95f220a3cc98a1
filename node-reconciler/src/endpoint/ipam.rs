//! Which address a new endpoint gets. Pure: the store calls it with the
//! node's blocks, the addresses allocated and where the last allocation of
//! each family ended.
//!
//! ```text
//!  blocks (NodeNetwork spec.podCIDRs) ─┐
//!  allocated (the store's files) ──────┼─▶ choose ─▶ one address per family with a block
//!  cursors (last allocated) ───────────┘            or Exhausted { family, blocks }
//! ```
//!
//! Usable addresses exclude each block's network address (the node's VTEP
//! address) and, for IPv4, its broadcast address. The search starts after
//! the last address allocated (round robin), so an address just released is
//! not handed to the next pod while the old one's peers may still send to
//! it. Only the blocks given are searched: an address of a block the node
//! no longer has is never handed out.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Where the last allocation of each family ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
}

impl Cursors {
    pub fn get(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.ipv4.map(IpAddr::V4),
            Family::V6 => self.ipv6.map(IpAddr::V6),
        }
    }

    pub fn set(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.ipv4 = Some(a),
            IpAddr::V6(a) => self.ipv6 = Some(a),
        }
    }
}

/// No free address of `family` in the node's blocks of that family.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free {family} address in {}", list(blocks))]
pub struct Exhausted {
    pub family: Family,
    pub blocks: Vec<IpNet>,
}

fn list(blocks: &[IpNet]) -> String {
    blocks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One free address for each family the node has a block of (IPv4 first),
/// each the next free one after that family's cursor.
pub fn choose(
    blocks: &[IpNet],
    allocated: &BTreeSet<IpAddr>,
    cursors: &Cursors,
) -> Result<Vec<IpAddr>, Exhausted> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        out.extend(choose_family(
            blocks,
            family,
            allocated,
            cursors.get(family),
        )?);
    }
    Ok(out)
}

/// The next free address of `family` after `last`; `None` when the node
/// has no block of that family.
pub fn choose_family(
    blocks: &[IpNet],
    family: Family,
    allocated: &BTreeSet<IpAddr>,
    last: Option<IpAddr>,
) -> Result<Option<IpAddr>, Exhausted> {
    let of_family: Vec<IpNet> = blocks
        .iter()
        .filter(|b| Family::of(&b.addr()) == family)
        .map(IpNet::trunc)
        .collect();
    if of_family.is_empty() {
        return Ok(None);
    }
    match next_free(&of_family, allocated, last) {
        Some(ip) => Ok(Some(ip)),
        None => Err(Exhausted {
            family,
            blocks: of_family,
        }),
    }
}

/// The first and last address of `block` handed out to pods, as numbers;
/// `None` when it has none (an IPv4 /31 or /32, an IPv6 /128).
pub fn usable(block: &IpNet) -> Option<(u128, u128)> {
    let (network, last) = match block.trunc() {
        IpNet::V4(b) => {
            let broadcast = u128::from(u32::from(b.broadcast()));
            (
                u128::from(u32::from(b.network())),
                broadcast.checked_sub(1)?,
            )
        }
        IpNet::V6(b) => (
            u128::from(b.network()),
            u128::from(b.network()) | u128::from(b.hostmask()),
        ),
    };
    let first = network.checked_add(1)?;
    (first <= last).then_some((first, last))
}

/// The next free address of `blocks` (all of one family, in the order
/// given) after `last`, wrapping around; from the first block's start when
/// `last` is in none of them.
pub fn next_free(
    blocks: &[IpNet],
    allocated: &BTreeSet<IpAddr>,
    last: Option<IpAddr>,
) -> Option<IpAddr> {
    let family = Family::of(&blocks.first()?.addr());
    let ranges: Vec<(u128, u128)> = blocks.iter().filter_map(usable).collect();
    let in_range = |n: u128| ranges.iter().position(|&(lo, hi)| lo <= n && n <= hi);
    let start = last
        .filter(|l| Family::of(l) == family)
        .map(number)
        .and_then(|l| Some((in_range(l)?, l)));
    let free = |lo, hi| first_free(allocated, family, lo, hi);
    let found = match start {
        None => ranges.iter().find_map(|&(lo, hi)| free(lo, hi)),
        Some((i, l)) => {
            let (lo, hi) = ranges[i];
            let after = if l < hi { free(l + 1, hi) } else { None };
            after
                .or_else(|| {
                    (1..ranges.len()).find_map(|k| {
                        let (lo, hi) = ranges[(i + k) % ranges.len()];
                        free(lo, hi)
                    })
                })
                .or_else(|| free(lo, l))
        }
    };
    found.map(|n| address(family, n))
}

/// The lowest number in `lo..=hi` whose address is not allocated.
fn first_free(allocated: &BTreeSet<IpAddr>, family: Family, lo: u128, hi: u128) -> Option<u128> {
    let mut candidate = lo;
    for taken in allocated.range(address(family, lo)..=address(family, hi)) {
        if number(*taken) != candidate {
            break;
        }
        if candidate == hi {
            return None;
        }
        candidate += 1;
    }
    Some(candidate)
}

fn number(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address numbered `n` (in range for the family by construction: it
/// lies inside a block of that family).
fn address(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| ip(s)).collect()
    }

    #[test]
    fn usable_addresses_skip_network_and_ipv4_broadcast() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("10.244.1.0/24", Some(("10.244.1.1", "10.244.1.254"))),
            ("10.244.1.0/30", Some(("10.244.1.1", "10.244.1.2"))),
            ("10.244.1.7/30", Some(("10.244.1.5", "10.244.1.6"))),
            ("10.244.1.0/31", None),
            ("10.244.1.0/32", None),
            ("fd00::/120", Some(("fd00::1", "fd00::ff"))),
            ("fd00::/127", Some(("fd00::1", "fd00::1"))),
            ("fd00::/128", None),
            ("fd00::/64", Some(("fd00::1", "fd00::ffff:ffff:ffff:ffff"))),
        ];
        for (block, want) in cases {
            let got = usable(&net(block));
            let want = want.map(|(a, b)| (number(ip(a)), number(ip(b))));
            assert_eq!(got, want, "{block}");
        }
    }

    #[test]
    fn allocation_is_round_robin_after_the_cursor() {
        let blocks = [net("10.244.1.0/29")];
        // Fresh: the first usable address.
        assert_eq!(next_free(&blocks, &set(&[]), None), Some(ip("10.244.1.1")));
        // After .1 (still allocated): .2.
        let taken = set(&["10.244.1.1"]);
        let last = Some(ip("10.244.1.1"));
        assert_eq!(next_free(&blocks, &taken, last), Some(ip("10.244.1.2")));
        // .1 released right after: not reused while others are free.
        assert_eq!(
            next_free(&blocks, &set(&[]), last),
            Some(ip("10.244.1.2")),
            "a released address is not handed out at once"
        );
        // Skips allocated ones, wraps around at the end of the block.
        let taken = set(&["10.244.1.2", "10.244.1.3", "10.244.1.6"]);
        assert_eq!(
            next_free(&blocks, &taken, Some(ip("10.244.1.5"))),
            Some(ip("10.244.1.1")),
            "wraps past .6 (allocated) and .7 (broadcast)"
        );
        // The cursor itself comes last.
        let all_but_last = set(&["10.244.1.1", "10.244.1.2", "10.244.1.3", "10.244.1.4"]);
        let all_but_last: BTreeSet<IpAddr> =
            all_but_last.into_iter().chain([ip("10.244.1.6")]).collect();
        assert_eq!(
            next_free(&blocks, &all_but_last, Some(ip("10.244.1.5"))),
            Some(ip("10.244.1.5"))
        );
    }

    #[test]
    fn several_blocks_are_walked_in_order_and_a_removed_block_is_not_used() {
        let blocks = [net("10.244.1.0/30"), net("10.244.9.0/30")];
        let taken = set(&["10.244.1.2"]);
        assert_eq!(
            next_free(&blocks, &taken, Some(ip("10.244.1.2"))),
            Some(ip("10.244.9.1")),
            "the next block after the cursor's"
        );
        assert_eq!(
            next_free(
                &blocks,
                &set(&["10.244.9.1", "10.244.9.2"]),
                Some(ip("10.244.9.2"))
            ),
            Some(ip("10.244.1.1")),
            "wraps to the first block"
        );
        // The cursor is in a block the node no longer has: start over in
        // the blocks it has, never in the old one.
        let only = [net("10.244.9.0/30")];
        assert_eq!(
            next_free(&only, &set(&[]), Some(ip("10.244.1.1"))),
            Some(ip("10.244.9.1"))
        );
    }

    #[test]
    fn choose_gives_one_address_per_family_or_names_the_full_block() {
        let blocks = [net("10.244.1.0/30"), net("fd00:10:244:1::/64")];
        let mut cursors = Cursors::default();
        let got = choose(&blocks, &set(&[]), &cursors).unwrap();
        assert_eq!(got, vec![ip("10.244.1.1"), ip("fd00:10:244:1::1")]);
        cursors.set(got[0]);
        cursors.set(got[1]);
        let taken: BTreeSet<IpAddr> = got.into_iter().collect();
        let got = choose(&blocks, &taken, &cursors).unwrap();
        assert_eq!(got, vec![ip("10.244.1.2"), ip("fd00:10:244:1::2")]);

        let full = set(&["10.244.1.1", "10.244.1.2"]);
        let err = choose(&blocks, &full, &cursors).unwrap_err();
        assert_eq!(err.family, Family::V4);
        assert_eq!(err.to_string(), "no free IPv4 address in 10.244.1.0/30");

        // IPv6 only.
        let got = choose(&[net("fd00::/120")], &set(&[]), &Cursors::default()).unwrap();
        assert_eq!(got, vec![ip("fd00::1")]);
        // No block: nothing to choose (the caller refuses earlier).
        assert!(
            choose(&[], &set(&[]), &Cursors::default())
                .unwrap()
                .is_empty()
        );
        // A block with no usable address is exhausted from the start.
        let err = choose(&[net("10.244.1.0/31")], &set(&[]), &Cursors::default()).unwrap_err();
        assert_eq!(err.to_string(), "no free IPv4 address in 10.244.1.0/31");
    }

    #[test]
    fn huge_ipv6_blocks_cost_what_is_allocated_not_their_size() {
        let blocks = [net("fd00::/64")];
        let taken: BTreeSet<IpAddr> = (1..=1000u128)
            .map(|n| IpAddr::V6(Ipv6Addr::from(0xfd00_u128 << 112 | n)))
            .collect();
        assert_eq!(next_free(&blocks, &taken, None), Some(ip("fd00::3e9")));
        let last = Some(ip("fd00::ffff:ffff:ffff:ffff"));
        assert_eq!(next_free(&blocks, &taken, last), Some(ip("fd00::3e9")));
    }
}
