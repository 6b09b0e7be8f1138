//! A pure parse of method + path into a [`Route`], so every URL the mirror answers is listed
//! in one place and unit-tested without a server.
//!
//! Repository names contain slashes, so `/v2/<name>/<kind>/<ref>` is parsed from the right:
//! the last two segments say what is asked for and everything before them is the name.
//! Names, tags and digests are validated here; handlers receive only valid values.

use http::Method;

use crate::reference::{Digest, InvalidReference, Reference, RepoName};

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: the API version check every client starts with.
    ApiBase,
    /// `GET /v2/_catalog`: the repositories the cache holds.
    Catalog,
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    Blob {
        name: RepoName,
        digest: Digest,
    },
    TagsList {
        name: RepoName,
    },
    Referrers {
        name: RepoName,
        digest: Digest,
    },
    Metrics,
    Healthz,
    Readyz,
}

impl Route {
    /// A short fixed label for metrics and logs (never the repository: unbounded cardinality).
    pub fn label(&self) -> &'static str {
        match self {
            Route::ApiBase => "base",
            Route::Catalog => "catalog",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::TagsList { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Metrics => "metrics",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
        }
    }
}

/// Why a request has no route.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint")]
    NotFound,
    /// A push, delete or upload: this is a read-only mirror.
    #[error("{0} is not supported: this registry is a read-only mirror")]
    Unsupported(Method),
    /// A known read endpoint with a method other than GET/HEAD.
    #[error("method {0} not allowed")]
    MethodNotAllowed(Method),
    #[error(transparent)]
    Invalid(#[from] InvalidReference),
}

/// Parses a request line. `path` is the URL path without the query string.
pub fn parse(method: &Method, path: &str) -> Result<Route, RouteError> {
    let route = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/v2" | "/v2/" => Route::ApiBase,
        "/v2/_catalog" => Route::Catalog,
        _ => {
            let rest = path.strip_prefix("/v2/").ok_or(RouteError::NotFound)?;
            parse_repository_path(method, rest)?
        }
    };
    if *method == Method::GET || *method == Method::HEAD {
        Ok(route)
    } else if matches!(route, Route::Manifest { .. } | Route::Blob { .. }) {
        Err(RouteError::Unsupported(method.clone()))
    } else {
        Err(RouteError::MethodNotAllowed(method.clone()))
    }
}

/// Parses `<name>/manifests/<ref>`, `<name>/blobs/<digest>`, `<name>/tags/list`,
/// `<name>/referrers/<digest>` and the upload endpoints (always unsupported).
fn parse_repository_path(method: &Method, rest: &str) -> Result<Route, RouteError> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Route::TagsList { name: RepoName::parse(name)? });
    }
    if let Some(name) = upload_repository(rest) {
        RepoName::parse(name)?;
        return Err(RouteError::Unsupported(method.clone()));
    }
    let (head, last) = rest.rsplit_once('/').ok_or(RouteError::NotFound)?;
    let (name, kind) = head.rsplit_once('/').ok_or(RouteError::NotFound)?;
    let name = RepoName::parse(name)?;
    match kind {
        "manifests" => Ok(Route::Manifest { name, reference: Reference::parse(last)? }),
        "blobs" => Ok(Route::Blob { name, digest: Digest::parse(last)? }),
        "referrers" => Ok(Route::Referrers { name, digest: Digest::parse(last)? }),
        _ => Err(RouteError::NotFound),
    }
}

/// `<name>/blobs/uploads/` or `<name>/blobs/uploads/<id>`: the repository of an upload.
fn upload_repository(rest: &str) -> Option<&str> {
    let (name, after) = rest.split_once("/blobs/uploads")?;
    (after.is_empty() || after.starts_with('/')).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Tag;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn get(path: &str) -> Result<Route, RouteError> {
        parse(&Method::GET, path)
    }

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{HEX}")).unwrap()
    }

    #[test]
    fn fixed_paths() {
        assert_eq!(get("/v2/"), Ok(Route::ApiBase));
        assert_eq!(get("/v2"), Ok(Route::ApiBase));
        assert_eq!(get("/v2/_catalog"), Ok(Route::Catalog));
        assert_eq!(get("/metrics"), Ok(Route::Metrics));
        assert_eq!(get("/healthz"), Ok(Route::Healthz));
        assert_eq!(get("/readyz"), Ok(Route::Readyz));
        assert_eq!(get("/"), Err(RouteError::NotFound));
        assert_eq!(get("/v3/"), Err(RouteError::NotFound));
    }

    #[test]
    fn manifests_by_tag_and_digest_with_nested_names() {
        assert_eq!(
            get("/v2/library/alpine/manifests/3.20"),
            Ok(Route::Manifest {
                name: name("library/alpine"),
                reference: Reference::Tag(Tag::parse("3.20").unwrap())
            })
        );
        assert_eq!(
            get(&format!("/v2/a/b/c/manifests/sha256:{HEX}")),
            Ok(Route::Manifest { name: name("a/b/c"), reference: Reference::Digest(digest()) })
        );
        // A repository may itself be called `manifests`.
        assert_eq!(
            get("/v2/org/manifests/manifests/latest"),
            Ok(Route::Manifest {
                name: name("org/manifests"),
                reference: Reference::Tag(Tag::parse("latest").unwrap())
            })
        );
    }

    #[test]
    fn blobs_tags_and_referrers() {
        assert_eq!(
            get(&format!("/v2/alpine/blobs/sha256:{HEX}")),
            Ok(Route::Blob { name: name("alpine"), digest: digest() })
        );
        assert_eq!(get("/v2/library/alpine/tags/list"), Ok(Route::TagsList { name: name("library/alpine") }));
        assert_eq!(
            get(&format!("/v2/alpine/referrers/sha256:{HEX}")),
            Ok(Route::Referrers { name: name("alpine"), digest: digest() })
        );
        assert_eq!(
            parse(&Method::HEAD, &format!("/v2/alpine/blobs/sha256:{HEX}")),
            Ok(Route::Blob { name: name("alpine"), digest: digest() })
        );
    }

    #[test]
    fn invalid_names_and_references_are_refused() {
        assert!(matches!(get("/v2/../etc/manifests/latest"), Err(RouteError::Invalid(_))));
        assert!(matches!(get("/v2/a/../../manifests/latest"), Err(RouteError::Invalid(_))));
        assert!(matches!(get("/v2/Alpine/manifests/latest"), Err(RouteError::Invalid(_))));
        assert!(matches!(get("/v2/alpine/manifests/bad:tag"), Err(RouteError::Invalid(_))));
        assert!(matches!(get("/v2/alpine/blobs/latest"), Err(RouteError::Invalid(_))));
        assert!(matches!(get("/v2/alpine/blobs/sha256:../../x"), Err(RouteError::Invalid(_))));
        assert!(matches!(get("/v2//manifests/latest"), Err(RouteError::Invalid(_))));
        assert_eq!(get("/v2/alpine/unknown/x"), Err(RouteError::NotFound));
        assert_eq!(get("/v2/alpine"), Err(RouteError::NotFound));
    }

    #[test]
    fn writes_are_unsupported() {
        for method in [Method::PUT, Method::DELETE, Method::POST, Method::PATCH] {
            assert_eq!(parse(&method, "/v2/alpine/manifests/latest"), Err(RouteError::Unsupported(method.clone())));
            assert_eq!(
                parse(&method, &format!("/v2/alpine/blobs/sha256:{HEX}")),
                Err(RouteError::Unsupported(method.clone()))
            );
        }
        assert_eq!(
            parse(&Method::POST, "/v2/library/alpine/blobs/uploads/"),
            Err(RouteError::Unsupported(Method::POST))
        );
        assert_eq!(
            parse(&Method::PATCH, "/v2/alpine/blobs/uploads/5f1e-uuid"),
            Err(RouteError::Unsupported(Method::PATCH))
        );
        assert_eq!(parse(&Method::POST, "/v2/_catalog"), Err(RouteError::MethodNotAllowed(Method::POST)));
    }
}
