//! Ordering `resourceVersion`s: what both daemons need to tell their own
//! writes, coming back through a watch, from newer changes.

/// Whether a cache (or watch event) holding `have` reflects a write that
/// returned `want`.
/// The apiserver's resource versions are etcd revisions, so numeric order is
/// write order (Kubernetes 1.33's own list/watch cache relies on the same);
/// anything that is not a number only counts when equal.
pub fn resource_version_reached(have: &str, want: &str) -> bool {
    match (have.parse::<u64>(), want.parse::<u64>()) {
        (Ok(have), Ok(want)) => have >= want,
        _ => have == want,
    }
}

#[cfg(test)]
mod tests {
    use super::resource_version_reached;

    #[test]
    fn resource_versions_compare_as_numbers_when_they_are_numbers() {
        assert!(resource_version_reached("100", "99"));
        assert!(resource_version_reached("99", "99"));
        assert!(!resource_version_reached("99", "100"));
        assert!(resource_version_reached("abc", "abc"));
        assert!(!resource_version_reached("abd", "abc"));
    }
}
