//! Names derived from an attachment: the host veth, the peer's temporary
//! name, the record's file name. Pure.
//!
//! The host veth name is [`HOST_VETH_PREFIX`] and 8 hex digits of a hash of
//! `(containerID, ifname)` that never changes between versions (FNV-1a, not
//! std's hasher, whose output is not promised to stay the same), so a DEL
//! after a crash finds the link of an attachment whose record never made it
//! to disk.

use trellis_cni::proto::{Attachment, HOST_VETH_PREFIX};

/// Longest interface name the kernel takes (IFNAMSIZ without the NUL).
pub const MAX_IFNAME: usize = 15;
/// Longest container ID accepted: the record's file name must stay under
/// the 255 bytes a file name can have.
pub const MAX_CONTAINER_ID: usize = 200;
/// Prefix of the pod side's temporary name in the node's namespace, as
/// earlier versions made the pair (the pod side is now created directly in
/// the pod's namespace): leftovers of a crash are still recognised and
/// collected.
const TEMP_PREFIX: &str = "trltmp";

/// The host side of the attachment's veth pair, e.g. `trellis1f2e3d4c`.
pub fn host_ifname(a: &Attachment) -> String {
    format!("{HOST_VETH_PREFIX}{:08x}", hash(a))
}

/// The pod side's temporary name in earlier versions, between its creation
/// in the node's namespace and its move into the pod's namespace.
pub fn temp_ifname(a: &Attachment) -> String {
    format!("{TEMP_PREFIX}{:08x}", hash(a))
}

/// Whether `name` is a host veth as [`host_ifname`] makes them (prefix and
/// exactly 8 lowercase hex digits), so `trellis-vxlan` and the like are not.
pub fn is_host_veth(name: &str) -> bool {
    name.strip_prefix(HOST_VETH_PREFIX).is_some_and(|rest| {
        rest.len() == 8
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether `name` is a pod side an earlier version left in the node's
/// namespace by a crash between creating the pair and moving it.
pub fn is_temp_peer(name: &str) -> bool {
    name.strip_prefix(TEMP_PREFIX)
        .is_some_and(|rest| rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The record's file name: `<containerID>_<ifname>.json`. Two attachments
/// can share it (an `_` in either part); the record holds its attachment,
/// so the store notices and refuses the second.
pub fn record_file_name(a: &Attachment) -> String {
    format!("{}_{}.json", a.container_id, a.ifname)
}

/// Refuses what the CNI spec does not allow in `CNI_CONTAINERID` and
/// `CNI_IFNAME`, and so anything that could leave the state directory
/// through the record's file name.
pub fn validate(a: &Attachment) -> Result<(), String> {
    let id = &a.container_id;
    let id_ok = !id.is_empty()
        && id.len() <= MAX_CONTAINER_ID
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !id_ok {
        return Err(format!(
            "CNI_CONTAINERID {id:?} must be 1 to {MAX_CONTAINER_ID} characters: a letter or digit, \
             then letters, digits, '_', '.' or '-'"
        ));
    }
    let name = &a.ifname;
    let name_ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !name_ok {
        return Err(format!(
            "CNI_IFNAME {name:?} is no valid interface name (1 to {MAX_IFNAME} printable \
             characters, no '/', ':' or whitespace, not '.' or '..')"
        ));
    }
    Ok(())
}

/// FNV-1a (64 bit) over container ID, a NUL and interface name, folded to
/// 32 bits.
fn hash(a: &Attachment) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = a
        .container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(a.ifname.bytes());
    let h = bytes.fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    // The upper half is folded into the lower one, then cut off.
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn mk(id: &str, ifname: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: ifname.into(),
        }
    }

    #[test]
    fn host_names_are_stable_fit_ifnamsiz_and_are_recognised() {
        let a = mk("0123456789abcdef", "eth0");
        let name = host_ifname(&a);
        // Pinned: a change here would orphan every existing pod's veth.
        assert_eq!(name, "trellis3807c7d2");
        assert_eq!(host_ifname(&a), name, "same input, same name");
        assert_eq!(name.len(), MAX_IFNAME);
        assert!(temp_ifname(&a).len() <= MAX_IFNAME);
        assert!(is_host_veth(&name));
        assert!(is_temp_peer(&temp_ifname(&a)));
        assert_ne!(host_ifname(&mk("0123456789abcdef", "eth1")), name);
        assert_ne!(host_ifname(&mk("0123456789abcde", "feth0")), name);
        for other in [
            "trellis-vxlan",
            "trellis3807c7d",
            "trellis3807c7d2f",
            "trellis3807C7D2",
            "trellisxyzxyzxy",
            "eth0",
            "trltmp3807c7d2",
        ] {
            assert!(!is_host_veth(other), "{other}");
        }
    }

    #[test]
    fn attachments_are_validated_as_the_spec_says() {
        assert!(validate(&mk("abc-1.2_3", "eth0")).is_ok());
        assert!(validate(&mk("a", "net1@x")).is_ok());
        for (id, ifname) in [
            ("", "eth0"),
            ("-abc", "eth0"),
            ("../etc", "eth0"),
            ("a/b", "eth0"),
            ("a b", "eth0"),
            (&"a".repeat(MAX_CONTAINER_ID + 1), "eth0"),
            ("abc", ""),
            ("abc", "."),
            ("abc", ".."),
            ("abc", "a/b"),
            ("abc", "a b"),
            ("abc", "a:1"),
            ("abc", "sixteen-chars-xx"),
        ] {
            assert!(validate(&mk(id, ifname)).is_err(), "{id:?} {ifname:?}");
        }
        assert_eq!(record_file_name(&mk("abc", "eth0")), "abc_eth0.json");
    }
}
