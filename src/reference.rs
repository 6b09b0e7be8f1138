//! Repository names, tags and digests, validated once at the edge and trusted after.
//!
//! Every value here ends up in a filesystem path or an upstream URL, so the grammar of the
//! OCI distribution spec is enforced before anything else sees it: a `RepoName` can never
//! contain `..`, a leading `/` or a `%`, and a `Digest` is always `sha256:` plus 64 lowercase
//! hex characters.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// Why a name, tag or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReference {
    #[error("invalid repository name: {0:?}")]
    Name(String),
    #[error("invalid tag: {0:?}")]
    Tag(String),
    #[error("invalid digest: {0:?}")]
    Digest(String),
    #[error("unsupported digest algorithm: {0:?}")]
    DigestAlgorithm(String),
}

/// A repository name such as `library/alpine`: lowercase path components separated by `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

/// Docker refuses names longer than this; so do we.
const MAX_NAME_LEN: usize = 255;

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, InvalidReference> {
        let valid = !s.is_empty() && s.len() <= MAX_NAME_LEN && s.split('/').all(is_path_component);
        if valid { Ok(RepoName(s.to_owned())) } else { Err(InvalidReference::Name(truncate(s))) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name with `prefix/` in front, for upstreams that keep proxied repositories under a
    /// project (Harbor) or a repository key (Artifactory), and for Docker Hub's `library/`.
    pub fn with_prefix(&self, prefix: &str) -> Result<Self, InvalidReference> {
        RepoName::parse(&format!("{prefix}/{}", self.0))
    }

    /// Whether the name is a single component (`alpine`), which Docker Hub keeps under `library/`.
    pub fn is_single_component(&self) -> bool {
        !self.0.contains('/')
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: separators never lead, trail or touch each other
/// (except `__` and runs of `-`), so `.` and `..` are impossible.
fn is_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or one or more `-`, followed by an alphanumeric.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        match &c[start..i] {
            "." | "_" | "__" => {}
            sep if sep.bytes().all(|b| b == b'-') => {}
            _ => return false,
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, InvalidReference> {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let bytes = s.as_bytes();
        let valid = matches!(bytes.first(), Some(&b) if word(b))
            && bytes.len() <= 128
            && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
        if valid { Ok(Tag(s.to_owned())) } else { Err(InvalidReference::Tag(truncate(s))) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `sha256:<64 lowercase hex>` content digest. Other algorithms are refused: sha256 is the
/// one every registry and client uses, and one algorithm keeps the store's layout single.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, InvalidReference> {
        let Some((algorithm, encoded)) = s.split_once(':') else {
            return Err(InvalidReference::Digest(truncate(s)));
        };
        if algorithm != "sha256" {
            let known = ["sha384", "sha512"].contains(&algorithm);
            return Err(if known {
                InvalidReference::DigestAlgorithm(algorithm.to_owned())
            } else {
                InvalidReference::Digest(truncate(s))
            });
        }
        let lower_hex =
            encoded.len() == 64 && encoded.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !lower_hex {
            return Err(InvalidReference::Digest(truncate(s)));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(encoded, &mut bytes).map_err(|_| InvalidReference::Digest(truncate(s)))?;
        Ok(Digest(bytes))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    pub fn from_sha256(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The 64 hex characters, without the algorithm: what the store names files after.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = InvalidReference;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, InvalidReference> {
        if s.contains(':') { Digest::parse(s).map(Reference::Digest) } else { Tag::parse(s).map(Reference::Tag) }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Hostile input can be megabytes long; error messages carry only its start.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_distribution_grammar() {
        for ok in ["alpine", "library/alpine", "a/b/c", "my-org/my_tool", "a__b", "a--b", "x.y/z9"] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/alpine", "alpine/", "a//b", "..", "a/../b", ".a", "a.", "A", "a b", "a%2fb", "a/./b", "a___b",
            "a.-b", "-a", "a_", "a\\b",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags_follow_the_distribution_grammar() {
        for ok in ["latest", "3.20", "v1.2.3-rc_1", "_x", &"a".repeat(128)] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "..", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_are_sha256_lowercase_hex() {
        let hex = "a".repeat(64);
        let d = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        assert_eq!(d.hex(), hex);
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}/../x", "a".repeat(60)),
            "sha256:".to_owned(),
            hex.clone(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            Digest::parse(&format!("sha512:{}", "a".repeat(128))),
            Err(InvalidReference::DigestAlgorithm("sha512".into()))
        );
    }

    #[test]
    fn digest_of_empty_input_is_the_well_known_one() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert_eq!(Reference::parse("3.20").unwrap(), Reference::Tag(Tag::parse("3.20").unwrap()));
        assert!(matches!(Reference::parse(&format!("sha256:{}", "0".repeat(64))).unwrap(), Reference::Digest(_)));
        assert!(Reference::parse("sha256:nothex").is_err());
    }
}
