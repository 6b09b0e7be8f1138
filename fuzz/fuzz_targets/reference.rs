//! `RepoName`, `Tag`, `Digest` and `Reference` parsing on any text.
//!
//! These values become file names in the cache and parts of upstream URLs, and the rest of the
//! crate trusts them once parsed. So beyond not panicking: everything accepted is within its
//! grammar (a name has no `..`, no leading `/`, only lowercase), displays as exactly the text
//! it came from, and parses again to an equal value.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use regmirror::reference::{Digest, Reference, RepoName, Tag};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    text: &'a str,
    prefix: &'a str,
    sha256: [u8; 32],
}

fuzz_target!(|input: Input| {
    name(input.text);
    tag(input.text);
    digest(input.text);
    reference(input.text);
    prefixed(input.text, input.prefix);
    digest_of_bytes(input.sha256);
});

fn name(text: &str) {
    let Ok(name) = RepoName::parse(text) else { return };
    assert_eq!(name.to_string(), text);
    assert_eq!(RepoName::parse(&name.to_string()), Ok(name.clone()));
    assert!(text.len() <= 255, "{text:?}");
    assert!(!text.starts_with('/') && !text.ends_with('/') && !text.contains("//"), "{text:?}");
    assert!(!text.contains(".."), "{text:?}");
    assert!(text.split('/').all(|c| !c.starts_with(['.', '_', '-'])), "{text:?}");
    assert!(text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)), "{text:?}");
    assert_eq!(name.is_single_component(), !text.contains('/'));
}

fn tag(text: &str) {
    let Ok(tag) = Tag::parse(text) else { return };
    assert_eq!(tag.to_string(), text);
    assert_eq!(Tag::parse(tag.as_str()), Ok(tag.clone()));
    assert!(!text.is_empty() && text.len() <= 128, "{text:?}");
    assert!(!text.starts_with(['.', '-']), "{text:?}");
    assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{text:?}");
}

fn digest(text: &str) {
    let Ok(digest) = Digest::parse(text) else { return };
    assert_eq!(digest.to_string(), text);
    assert_eq!(Digest::parse(&digest.to_string()), Ok(digest));
    assert_eq!(text.parse::<Digest>(), Ok(digest));
    assert_eq!(text, format!("sha256:{}", digest.hex()));
}

fn reference(text: &str) {
    let Ok(reference) = Reference::parse(text) else { return };
    assert_eq!(reference.to_string(), text);
    match reference {
        Reference::Digest(digest) => assert_eq!(Digest::parse(text), Ok(digest)),
        Reference::Tag(tag) => assert_eq!(Tag::parse(text), Ok(tag)),
    }
}

/// `with_prefix` (Harbor projects, `library/`) yields `prefix/name` whenever that fits.
fn prefixed(text: &str, prefix: &str) {
    let (Ok(name), Ok(_)) = (RepoName::parse(text), RepoName::parse(prefix)) else { return };
    match name.with_prefix(prefix) {
        Ok(joined) => assert_eq!(joined.as_str(), format!("{prefix}/{text}")),
        Err(_) => assert!(prefix.len() + 1 + text.len() > 255, "{prefix:?} + {text:?}"),
    }
}

/// Every sha256 value round-trips, and only its lowercase spelling is accepted.
fn digest_of_bytes(sha256: [u8; 32]) {
    let digest = Digest::from_sha256(sha256);
    let text = digest.to_string();
    assert_eq!(Digest::parse(&text), Ok(digest));
    assert_eq!(digest.hex().len(), 64);
    let upper = format!("sha256:{}", digest.hex().to_ascii_uppercase());
    assert_eq!(Digest::parse(&upper).is_ok(), upper == text, "{upper}");
}
