//! Unit tests of the mock APNs's request helpers.

use super::validate::*;
use super::*;

#[test]
fn canonical_uuid() {
    assert!(is_canonical_uuid("eabeae54-14a8-11e5-b60b-1697f925ec7b"));
    assert!(!is_canonical_uuid("EABEAE54-14A8-11E5-B60B-1697F925EC7B"));
    assert!(!is_canonical_uuid("eabeae5414a811e5b60b1697f925ec7b"));
    assert!(!is_canonical_uuid("eabeae54-14a8-11e5-b60b-1697f925ec7"));
    assert!(!is_canonical_uuid("eabeae54_14a8-11e5-b60b-1697f925ec7b"));
}

#[test]
fn reason_table_matches_the_enum() {
    assert_eq!(
        REASON_NAMES.len(),
        ApnsReason::BadRequestPayload as usize + 1
    );
    assert_eq!(ApnsReason::Unregistered.as_str(), "Unregistered");
    assert_eq!(ApnsReason::Unregistered.status(), 410);
    assert_eq!(
        ApnsReason::BadEnvironmentKeyInToken.as_str(),
        "BadEnvironmentKeyInToken"
    );
    assert_eq!(ApnsReason::TooManyProviderTokenUpdates.status(), 429);
    assert_eq!(ApnsReason::Shutdown.status(), 503);
}
