//! OCI descriptors and the two shapes a manifest can have, with the fields `seed`, `export`
//! and `import` need and [`crate::manifest`] leaves out: media types, sizes, platforms and
//! annotations. Serving never uses this: it passes manifest bytes through untouched.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::reference::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor, as in indexes, manifests and an OCI layout's `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    /// Kept as text: a descriptor with another algorithm is reported, not a parse failure.
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The digest, if it is one we can address (sha256).
    pub fn sha256(&self) -> Result<Digest, ShapeError> {
        Digest::parse(&self.digest).map_err(|_| ShapeError::Digest(self.digest.chars().take(80).collect()))
    }
}

/// An index entry's platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// What a manifest is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// An OCI index or Docker manifest list: per-platform child manifests.
    Index(Vec<Descriptor>),
    /// An image (or artifact) manifest: a config blob and layer blobs.
    Image { config: Descriptor, layers: Vec<Descriptor> },
}

impl Shape {
    /// For an image, its config and layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        let (config, layers): (Option<&Descriptor>, &[Descriptor]) = match self {
            Shape::Image { config, layers } => (Some(config), layers),
            Shape::Index(_) => (None, &[]),
        };
        config.into_iter().chain(layers)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("not a JSON manifest: {0}")]
    Json(String),
    #[error("Docker schema 1 manifests are not supported")]
    Schema1,
    #[error("neither an index (no `manifests`) nor an image manifest (no `config`)")]
    Unknown,
    #[error("unsupported digest {0:?} (only sha256)")]
    Digest(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Parsed {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The shape of manifest bytes. Every digest in it must be sha256.
pub fn shape(bytes: &[u8]) -> Result<Shape, ShapeError> {
    let parsed: Parsed = serde_json::from_slice(bytes).map_err(|e| ShapeError::Json(e.to_string()))?;
    if parsed.schema_version == Some(1) {
        return Err(ShapeError::Schema1);
    }
    let shape = match (parsed.manifests, parsed.config) {
        (Some(children), None) => Shape::Index(children),
        (None, Some(config)) => Shape::Image { config, layers: parsed.layers },
        _ => return Err(ShapeError::Unknown),
    };
    match &shape {
        Shape::Index(children) => children.iter().try_for_each(|d| d.sha256().map(drop))?,
        image => image.blobs().try_for_each(|d| d.sha256().map(drop))?,
    }
    Ok(shape)
}

/// The media type of manifest bytes: `declared` (a descriptor's or the cache's) when it is
/// given, else the `mediaType` field, else a guess from the shape (OCI manifests may omit
/// the field).
pub fn media_type(declared: Option<&str>, bytes: &[u8], shape: &Shape) -> String {
    if let Some(declared) = declared.filter(|d| !d.is_empty()) {
        return declared.to_owned();
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Typed {
        media_type: Option<String>,
    }
    match serde_json::from_slice::<Typed>(bytes).ok().and_then(|t| t.media_type) {
        Some(field) if !field.is_empty() => field,
        _ => match shape {
            Shape::Index(_) => OCI_INDEX.to_owned(),
            Shape::Image { .. } => OCI_MANIFEST.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn images_and_indexes_are_told_apart() {
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"{}","size":3}},"layers":[{{"digest":"{}","size":5}}]}}"#,
            d('c'),
            d('1')
        );
        let parsed = shape(image.as_bytes()).unwrap();
        let blobs: Vec<_> = parsed.blobs().map(|b| (b.digest.clone(), b.size)).collect();
        assert_eq!(blobs, vec![(d('c'), 3), (d('1'), 5)]);
        assert_eq!(media_type(None, image.as_bytes(), &parsed), OCI_MANIFEST);

        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            d('a')
        );
        let parsed = shape(index.as_bytes()).unwrap();
        let Shape::Index(children) = &parsed else { panic!("an index") };
        assert_eq!(children[0].platform.as_ref().unwrap().to_string(), "linux/arm64/v8");
        assert_eq!(media_type(None, index.as_bytes(), &parsed), DOCKER_LIST);
        assert_eq!(media_type(Some(OCI_INDEX), index.as_bytes(), &parsed), OCI_INDEX);
    }

    #[test]
    fn unsupported_manifests_are_refused() {
        assert_eq!(shape(br#"{"schemaVersion":1,"fsLayers":[]}"#), Err(ShapeError::Schema1));
        assert_eq!(shape(br#"{"schemaVersion":2}"#), Err(ShapeError::Unknown));
        assert!(matches!(shape(b"nope"), Err(ShapeError::Json(_))));
        let sha512 = format!(r#"{{"config":{{"digest":"sha512:{}","size":1}}}}"#, "a".repeat(128));
        assert!(matches!(shape(sha512.as_bytes()), Err(ShapeError::Digest(_))));
    }
}
