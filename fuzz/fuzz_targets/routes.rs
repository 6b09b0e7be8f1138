//! `routes::parse` on any method and path.
//!
//! Beyond not panicking: only GET and HEAD are ever routed, and every route rebuilds into
//! exactly the path it was parsed from. So nothing in a path is dropped or reinterpreted on the
//! way from the router to the store and the upstream URL (a `..` or `%2f` cannot hide in a
//! name that the store then joins onto the cache directory).

#![no_main]

use http::Method;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use regmirror::reference::RepoName;
use regmirror::routes::{self, Route, RouteError};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    method: Verb<'a>,
    path: Path<'a>,
}

#[derive(Debug, Arbitrary)]
enum Verb<'a> {
    Get,
    Head,
    Put,
    Post,
    Patch,
    Delete,
    Other(&'a [u8]),
}

/// Raw paths find the odd corners; built ones reach the deep branches, which random bytes
/// would rarely spell out (`/manifests/`, a 64-hex digest).
#[derive(Debug, Arbitrary)]
enum Path<'a> {
    Raw(&'a str),
    Built { name: Vec<&'a str>, kind: Kind<'a>, last: Last<'a> },
}

#[derive(Debug, Arbitrary)]
enum Kind<'a> {
    Manifests,
    Blobs,
    BlobUploads,
    Referrers,
    Tags,
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Last<'a> {
    Text(&'a str),
    Digest([u8; 32]),
}

impl Verb<'_> {
    fn method(&self) -> Option<Method> {
        Some(match self {
            Verb::Get => Method::GET,
            Verb::Head => Method::HEAD,
            Verb::Put => Method::PUT,
            Verb::Post => Method::POST,
            Verb::Patch => Method::PATCH,
            Verb::Delete => Method::DELETE,
            Verb::Other(bytes) => Method::from_bytes(bytes).ok()?,
        })
    }
}

impl Path<'_> {
    fn render(&self) -> String {
        match self {
            Path::Raw(path) => (*path).to_owned(),
            Path::Built { name, kind, last } => {
                let kind = match kind {
                    Kind::Manifests => "manifests",
                    Kind::Blobs => "blobs",
                    Kind::BlobUploads => "blobs/uploads",
                    Kind::Referrers => "referrers",
                    Kind::Tags => "tags",
                    Kind::Other(kind) => kind,
                };
                let last = match last {
                    Last::Text(text) => (*text).to_owned(),
                    Last::Digest(bytes) => regmirror::reference::Digest::from_sha256(*bytes).to_string(),
                };
                format!("/v2/{}/{kind}/{last}", name.join("/"))
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let Some(method) = input.method.method() else { return };
    let path = input.path.render();
    match routes::parse(&method, &path) {
        Ok(route) => check_route(&method, &path, &route),
        Err(RouteError::NotFound) => {}
        Err(RouteError::Unsupported(refused) | RouteError::MethodNotAllowed(refused)) => assert_eq!(refused, method),
        Err(RouteError::Invalid(_)) => assert!(path.starts_with("/v2/"), "{path:?} refused as an invalid reference"),
    }
});

fn check_route(method: &Method, path: &str, route: &Route) {
    assert!(*method == Method::GET || *method == Method::HEAD, "{method} {path:?} was routed to {route:?}");
    let rebuilt = match route {
        Route::ApiBase => return assert!(path == "/v2" || path == "/v2/", "{path:?} routed to the API base"),
        Route::Catalog => "/v2/_catalog".to_owned(),
        Route::Metrics => "/metrics".to_owned(),
        Route::Healthz => "/healthz".to_owned(),
        Route::Readyz => "/readyz".to_owned(),
        Route::Manifest { name, reference } => format!("/v2/{}/manifests/{reference}", checked(name)),
        Route::Blob { name, digest } => format!("/v2/{}/blobs/{digest}", checked(name)),
        Route::TagsList { name } => format!("/v2/{}/tags/list", checked(name)),
        Route::Referrers { name, digest } => format!("/v2/{}/referrers/{digest}", checked(name)),
    };
    assert_eq!(rebuilt, path, "{route:?}");
}

/// A routed name is safe to join onto a directory.
fn checked(name: &RepoName) -> &str {
    let name = name.as_str();
    assert!(!name.is_empty() && !name.starts_with('/') && !name.ends_with('/'), "{name:?}");
    assert!(name.split('/').all(|c| !c.is_empty() && !c.starts_with('.')), "{name:?}");
    assert!(!name.contains("..") && !name.contains('%') && !name.contains('\\'), "{name:?}");
    name
}
