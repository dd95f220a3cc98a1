//! Helpers shared by the unit tests of this crate.

use std::collections::BTreeMap;

/// A label map from `(key, value)` pairs.
pub(crate) fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
