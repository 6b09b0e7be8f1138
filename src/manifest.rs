//! What a manifest points at: its config and layers (blobs), or for an index / manifest list,
//! its per-platform manifests. Used to walk an image's content for `ls`, pinning and export;
//! serving never re-serialises a manifest.

use serde::Deserialize;

use crate::reference::Digest;

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

/// An index entry's platform.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Deserialize)]
struct Parsed {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// The digests a manifest references.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    /// Config and layers.
    pub blobs: Vec<Digest>,
    /// Child manifests of an index, with their platform when given.
    pub manifests: Vec<(Digest, Option<Platform>)>,
}

/// Parses the references out of manifest bytes. Descriptors with digests we cannot address
/// (another algorithm) are skipped; a body that is not a manifest yields nothing.
pub fn references(bytes: &[u8]) -> References {
    let Ok(parsed) = serde_json::from_slice::<Parsed>(bytes) else { return References::default() };
    let digest = |d: &Descriptor| Digest::parse(&d.digest).ok();
    References {
        blobs: parsed.config.iter().chain(&parsed.layers).filter_map(digest).collect(),
        manifests: parsed.manifests.iter().filter_map(|d| Some((digest(d)?, d.platform.clone()))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_manifests_reference_config_and_layers() {
        let c = format!("sha256:{}", "c".repeat(64));
        let l = format!("sha256:{}", "1".repeat(64));
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{c}","size":1}},"layers":[{{"digest":"{l}","size":2}}]}}"#
        );
        let refs = references(json.as_bytes());
        assert_eq!(refs.blobs, vec![Digest::parse(&c).unwrap(), Digest::parse(&l).unwrap()]);
        assert!(refs.manifests.is_empty());
    }

    #[test]
    fn indexes_reference_platform_manifests() {
        let a = format!("sha256:{}", "a".repeat(64));
        let json = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{a}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},{{"digest":"sha512:zz"}}]}}"#
        );
        let refs = references(json.as_bytes());
        assert_eq!(refs.manifests.len(), 1);
        assert_eq!(refs.manifests[0].1.as_ref().unwrap().architecture, "arm64");
        assert_eq!(references(b"garbage"), References::default());
    }
}
