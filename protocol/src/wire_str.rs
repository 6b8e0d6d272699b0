//! [`WireStr`]: an OS string as it travels in a message.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A program name, argument, path or environment entry on the wire.
///
/// Unix strings are bytes, not UTF-8. A `WireStr` is written as a MessagePack
/// `str` when its bytes are valid UTF-8 (so clients in other languages see an
/// ordinary string) and as `bin` otherwise; it accepts either when read.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WireStr(Vec<u8>);

impl WireStr {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes as an [`OsStr`].
    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    /// Consumes the string, returning its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for WireStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(&self.0), f)
    }
}

impl fmt::Display for WireStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl From<&str> for WireStr {
    fn from(s: &str) -> Self {
        WireStr(s.as_bytes().to_vec())
    }
}

impl From<String> for WireStr {
    fn from(s: String) -> Self {
        WireStr(s.into_bytes())
    }
}

impl From<&OsStr> for WireStr {
    fn from(s: &OsStr) -> Self {
        WireStr(s.as_bytes().to_vec())
    }
}

impl From<OsString> for WireStr {
    fn from(s: OsString) -> Self {
        WireStr(s.into_vec())
    }
}

impl From<Vec<u8>> for WireStr {
    fn from(bytes: Vec<u8>) -> Self {
        WireStr(bytes)
    }
}

impl Serialize for WireStr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(s) => serializer.serialize_str(s),
            Err(_) => serializer.serialize_bytes(&self.0),
        }
    }
}

impl<'de> Deserialize<'de> for WireStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WireStrVisitor;

        impl<'de> Visitor<'de> for WireStrVisitor {
            type Value = WireStr;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or binary")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<WireStr, E> {
                Ok(WireStr::from(v))
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<WireStr, E> {
                Ok(WireStr(v.to_vec()))
            }

            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<WireStr, E> {
                Ok(WireStr(v))
            }
        }

        deserializer.deserialize_any(WireStrVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_travels_as_str_and_other_bytes_as_bin() {
        let text = rmp_serde::to_vec(&WireStr::from("hi")).unwrap();
        assert_eq!(text, [0xa2, b'h', b'i']);
        let binary = rmp_serde::to_vec(&WireStr::from(vec![0xff])).unwrap();
        assert_eq!(binary, [0xc4, 1, 0xff]);
        for encoded in [text, binary] {
            let back: WireStr = rmp_serde::from_slice(&encoded).unwrap();
            assert_eq!(rmp_serde::to_vec(&back).unwrap(), encoded);
        }
    }
}
