//! Image references as operators type them (`alpine`, `alpine:3.20`, `ghcr.io/org/tool:v1`,
//! `docker.io/library/alpine@sha256:…`), for the commands that take images: `seed` and
//! `export`, and `import`, which reads the names an archive carries.
//!
//! The grammar is Docker's: the first path component is a registry host if it contains a
//! `.` or a `:` or is `localhost`, else the name belongs to the default registry. The host
//! picks the configured upstream with that `name`, which is also the directory tag records
//! live under, so `docker.io/library/alpine:3.20` seeded here is what containerd later asks
//! for with `?ns=docker.io`. Docker Hub's official images live under `library/`, and its
//! other spellings (`index.docker.io`, `registry-1.docker.io`) mean `docker.io`.

use std::fmt;

use crate::reference::{Digest, InvalidReference, Reference, RepoName, Tag};

/// The name Docker Hub goes by in references and in the config's `upstreams`.
pub const DOCKER_HUB: &str = "docker.io";

/// Why a reference was refused. Messages quote the input (cut to 120 characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("empty image reference")]
    Empty,
    #[error("invalid image reference {input:?}: {reason}")]
    Invalid { input: String, reason: String },
}

/// A fully qualified image reference: registry, repository, and a tag, a digest or both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// The registry host, as the config's upstream `name` spells it (`docker.io`, `ghcr.io`,
    /// `localhost:5000`).
    pub registry: String,
    /// The repository as cached (`library/alpine` for Docker Hub's `alpine`).
    pub repository: RepoName,
    /// `latest` when neither a tag nor a digest was given.
    pub tag: Option<Tag>,
    /// When given, the digest decides what is fetched, as with Docker (`name:tag@digest`
    /// pulls the digest).
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// Parses `input`; names without a registry host belong to `default_registry`.
    pub fn parse(input: &str, default_registry: &str) -> Result<ImageRef, ImageRefError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ImageRefError::Empty);
        }
        let invalid = |reason: String| ImageRefError::Invalid { input: input.chars().take(120).collect(), reason };

        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => (rest, Some(Digest::parse(digest).map_err(|e| invalid(reason_of(&e, "digest")))?)),
            None => (input, None),
        };
        // A `:` after the last `/` starts the tag; one before it is a registry's port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(Tag::parse(&rest[at + 1..]).map_err(|e| invalid(reason_of(&e, "tag")))?))
            }
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if is_registry_host(first) => (first, path),
            _ => (default_registry, name),
        };
        if !is_valid_host(registry) {
            return Err(invalid(format!("{registry:?} is not a registry host")));
        }
        let registry = canonical_registry(registry);
        let repository = RepoName::parse(path).map_err(|e| invalid(reason_of(&e, "repository name")))?;
        let repository = if registry == DOCKER_HUB && repository.is_single_component() {
            repository.with_prefix("library").map_err(|e| invalid(reason_of(&e, "repository name")))?
        } else {
            repository
        };
        let tag = match (tag, &digest) {
            (None, None) => Some(latest()),
            (tag, _) => tag,
        };
        Ok(ImageRef { registry, repository, tag, digest })
    }

    /// Parses a reference only if it names its registry (`docker.io/library/alpine:3.20`,
    /// never a bare `3.20` or `alpine`): for names found in archives, which carry no default.
    pub fn parse_qualified(input: &str) -> Option<ImageRef> {
        let (first, _) = input.split_once('/')?;
        if !is_registry_host(first) {
            return None;
        }
        ImageRef::parse(input, DOCKER_HUB).ok()
    }

    /// What to ask the registry for: the digest when there is one, else the tag (`latest`
    /// if neither is set, as [`ImageRef::parse`] would have made it).
    pub fn reference(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => Reference::Digest(*digest),
            (None, Some(tag)) => Reference::Tag(tag.clone()),
            (None, None) => Reference::Tag(latest()),
        }
    }

    /// The tag a seed or import records, if the reference is by tag (not pinned by digest).
    pub fn tag_to_record(&self) -> Option<&Tag> {
        if self.digest.is_some() { None } else { self.tag.as_ref() }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn latest() -> Tag {
    Tag::parse("latest").expect("`latest` is a valid tag")
}

fn reason_of(error: &InvalidReference, what: &str) -> String {
    match error {
        InvalidReference::DigestAlgorithm(a) => format!("unsupported digest algorithm {a:?} (only sha256)"),
        InvalidReference::Name(_) => {
            format!("invalid {what} (lowercase letters, digits and . _ - separators, components joined by /)")
        }
        _ => format!("invalid {what}"),
    }
}

/// Docker's rule for whether a name's first component is a registry host.
fn is_registry_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// `host` or `host:port`, as the config accepts for upstream names.
fn is_valid_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    name_ok && port_ok
}

/// Docker Hub's other names mean `docker.io`; registry hosts are case-insensitive.
fn canonical_registry(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ImageRef {
        ImageRef::parse(s, DOCKER_HUB).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn short_docker_hub_names_are_qualified() {
        assert_eq!(parse("alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(parse("alpine:3.20").to_string(), "docker.io/library/alpine:3.20");
        assert_eq!(parse("bitnami/redis:7").to_string(), "docker.io/bitnami/redis:7");
        assert_eq!(parse("docker.io/alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(parse("index.docker.io/library/alpine:1").to_string(), "docker.io/library/alpine:1");
        let r = parse("alpine");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository.as_str(), "library/alpine");
        assert_eq!(r.reference(), Reference::Tag(Tag::parse("latest").unwrap()));
    }

    #[test]
    fn registries_are_named_by_their_first_component() {
        let r = parse("ghcr.io/org/tool:v1");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("ghcr.io", "org/tool"));
        assert_eq!(r.tag.unwrap().as_str(), "v1");

        let r = parse("localhost:5000/x");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost:5000", "x"));
        assert_eq!(r.to_string(), "localhost:5000/x:latest");

        let r = parse("localhost/x/y:2");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost", "x/y"));
        // A single-component name on another registry gets no `library/`.
        assert_eq!(parse("quay.io/x").repository.as_str(), "x");
        // A name without a registry goes to the default, whatever it is.
        let r = ImageRef::parse("tool:v1", "ghcr.io").unwrap();
        assert_eq!(r.to_string(), "ghcr.io/tool:v1");
    }

    #[test]
    fn digests_pin_and_tags_are_kept_for_display() {
        let hex = "a".repeat(64);
        let r = parse(&format!("docker.io/library/alpine@sha256:{hex}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), Reference::Digest(Digest::parse(&format!("sha256:{hex}")).unwrap()));
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@sha256:{hex}"));
        assert_eq!(r.tag_to_record(), None);

        let r = parse(&format!("alpine:3.20@sha256:{hex}"));
        assert_eq!(r.tag.as_ref().unwrap().as_str(), "3.20");
        assert!(matches!(r.reference(), Reference::Digest(_)));
        assert_eq!(r.tag_to_record(), None);
        assert_eq!(r.to_string(), format!("docker.io/library/alpine:3.20@sha256:{hex}"));

        let r = parse(&format!("localhost:5000/a/b@sha256:{hex}"));
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost:5000", "a/b"));
    }

    #[test]
    fn bad_references_are_refused_with_a_reason() {
        assert_eq!(ImageRef::parse("  ", DOCKER_HUB), Err(ImageRefError::Empty));
        for bad in [
            "Alpine",
            "alpine:",
            "alpine:a:b",
            "alpine@sha256:short",
            "alpine@md5:abc",
            "-x/y",
            "ghcr.io/",
            "a b",
            "ghcr.io:port/x",
            "/alpine",
            "alpine/",
        ] {
            let error = ImageRef::parse(bad, DOCKER_HUB).unwrap_err().to_string();
            assert!(error.contains("invalid image reference"), "{bad}: {error}");
        }
        let error = ImageRef::parse(&format!("x@sha512:{}", "a".repeat(128)), DOCKER_HUB).unwrap_err();
        assert!(error.to_string().contains("only sha256"), "{error}");
    }

    #[test]
    fn qualified_names_need_a_registry() {
        assert_eq!(
            ImageRef::parse_qualified("docker.io/library/alpine:3.20").unwrap().to_string(),
            "docker.io/library/alpine:3.20"
        );
        assert_eq!(ImageRef::parse_qualified("localhost:5000/x:1").unwrap().registry, "localhost:5000");
        assert_eq!(ImageRef::parse_qualified("3.20"), None);
        assert_eq!(ImageRef::parse_qualified("alpine:3.20"), None);
        assert_eq!(ImageRef::parse_qualified("library/alpine:3.20"), None);
        assert_eq!(ImageRef::parse_qualified("docker.io/Bad"), None);
    }
}
