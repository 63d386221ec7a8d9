//! The OAuth `state` of an account connection. The Mapillary side (consent URL, code exchange,
//! `/me`) is `shared::mapillary::app::MapillaryApp`'s.

use base64::Engine;

/// A fresh `state`: 32 random bytes from the OS-seeded CSPRNG, base64url without padding
/// (43 characters).
pub fn new_state() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_long_url_safe_and_distinct() {
        let a = new_state();
        let b = new_state();
        assert_eq!(a.len(), crate::validate::STATE_LEN);
        assert!(crate::validate::state(&a).is_ok());
        assert_ne!(a, b);
    }
}
