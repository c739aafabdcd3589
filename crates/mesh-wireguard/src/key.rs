//! Curve25519 keys as WireGuard uses them: 32 bytes, base64 in configs and the Kubernetes API,
//! lowercase hex on the UAPI socket.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// A key could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not valid base64, or not 32 bytes once decoded.
    #[error("not a WireGuard key: expected 44 characters of base64 encoding 32 bytes, got {0:?}")]
    Base64(String),
    /// Not 64 hex digits.
    #[error("not a WireGuard key: expected 64 hex digits, got {0:?}")]
    Hex(String),
}

/// A public (or preshared) key: 32 bytes, printed as base64.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key([u8; 32]);

impl Key {
    /// The key with these bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Decodes the base64 form used by `wg`, wg-quick and the MeshNode API.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Base64(text.to_owned()))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Base64(text.to_owned()))?;
        Ok(Self(bytes))
    }

    /// The base64 form.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Decodes the lowercase or uppercase hex form of the UAPI protocol.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let err = || KeyError::Hex(text.to_owned());
        // Hex digits only: `u8::from_str_radix` alone would also take a sign ("+f" as 0x0f).
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Self(bytes))
    }

    /// The lowercase hex form of the UAPI protocol.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.to_base64())
    }
}

/// A private key. It is never printed: `Debug` and `Display` are redacted, and the only ways to
/// its bytes are [`PrivateKey::to_base64`] (for the key file) and [`PrivateKey::to_hex`] (for
/// the UAPI socket).
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the operating system's random source, clamped as Curve25519 requires.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(Self::from_bytes(bytes))
    }

    /// The key with these bytes, clamped.
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }

    /// Decodes the base64 form (the key file, `wg genkey`).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Key::from_base64(text).map(|k| Self::from_bytes(k.0))
    }

    /// Decodes the hex form (UAPI `private_key=`).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        Key::from_hex(text).map(|k| Self::from_bytes(k.0))
    }

    /// The base64 form, for the node's own key file only.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The hex form, for the node's own UAPI socket only.
    pub fn to_hex(&self) -> String {
        Key(self.0).to_hex()
    }

    /// The raw key, for a WireGuard that runs in this process (`meshctl connect`); never
    /// write, log or send it.
    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public key that goes with this private key.
    pub fn public_key(&self) -> Key {
        Key(x25519_dalek::x25519(self.0, x25519_dalek::X25519_BASEPOINT_BYTES))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn public_key_matches_wg_pubkey() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey` (the example key of
        // the WireGuard documentation).
        let private = PrivateKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(private.public_key().to_base64(), "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=");
    }

    #[test]
    fn private_key_is_never_printed() {
        let private = PrivateKey::generate().unwrap();
        let printed = format!("{private:?}");
        assert_eq!(printed, "PrivateKey(redacted)");
        assert!(!printed.contains(&private.to_base64()));
    }

    #[test]
    fn generated_keys_differ_and_are_clamped() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(PrivateKey::from_base64(&a.to_base64()).unwrap(), a);
    }

    #[test]
    fn malformed_keys_are_refused_with_the_input() {
        assert_eq!(Key::from_base64("abc"), Err(KeyError::Base64("abc".into())));
        assert!(Key::from_base64("AAAA").is_err());
        assert!(Key::from_hex(&"g".repeat(64)).is_err());
        assert!(Key::from_hex("00").is_err());
        assert!(Key::from_hex(&"é".repeat(32)).is_err());
    }

    proptest! {
        #[test]
        fn base64_and_hex_round_trip(bytes in proptest::array::uniform32(any::<u8>())) {
            let key = Key::from_bytes(bytes);
            prop_assert_eq!(Key::from_base64(&key.to_base64()).unwrap(), key);
            prop_assert_eq!(Key::from_hex(&key.to_hex()).unwrap(), key);
            prop_assert_eq!(Key::from_hex(&key.to_hex().to_uppercase()).unwrap(), key);
        }

        #[test]
        fn decoding_arbitrary_text_never_panics(text in ".{0,80}") {
            let _ = Key::from_base64(&text);
            let _ = Key::from_hex(&text);
        }
    }
}
