//! The crate's request error and its one conversion into an OCI error response.
//!
//! Modules report what went wrong in their own terms (`UpstreamError`, `FillError`,
//! `RouteError`, ...); this is the only place that decides which HTTP status and OCI error code
//! a client sees. The rule of thumb, from pingora: the *source* picks the class. A bad
//! request is the client's 4xx, an upstream's refusal is passed on as what it means (404 stays
//! 404, 429 stays 429 with its `Retry-After`), an upstream failure is a 502, and our own
//! storage trouble is a 500. Messages name no credentials: upstream errors never carry them.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use crate::fetch::FillError;
use crate::metrics::Kind;
use crate::reference::InvalidReference;
use crate::routes::RouteError;
use crate::upstream::{BodyError, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Reference(#[from] InvalidReference),
    #[error("no upstream named {0:?} is configured")]
    UnknownUpstream(String),
    /// The upstream said so recently (remembered for `negative_ttl`).
    #[error("manifest unknown to upstream {upstream}")]
    ManifestUnknown { upstream: String },
    /// An upstream answer for a manifest, blob, tag list or referrers request.
    #[error("{error}")]
    Upstream { kind: Kind, error: UpstreamError },
    #[error(transparent)]
    Fill(Arc<FillError>),
    #[error("manifest from upstream {upstream} refused: {reason}")]
    ManifestInvalid { upstream: String, reason: String },
    #[error("upstream {upstream} sent a manifest whose digest is {actual}, not {expected}")]
    ManifestDigestMismatch { upstream: String, expected: String, actual: String },
    #[error("access denied from this network")]
    Denied,
    #[error("authentication required")]
    Unauthorized,
    #[error("request bodies are not accepted")]
    BodyNotAllowed,
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("cache storage error: {0}")]
    Storage(#[from] std::io::Error),
}

/// Codes from the distribution spec, plus distribution's own `UNAVAILABLE`.
fn code_for_upstream_status(kind: Kind, status: StatusCode) -> (StatusCode, &'static str) {
    match status {
        StatusCode::NOT_FOUND => (
            StatusCode::NOT_FOUND,
            match kind {
                Kind::Blob => "BLOB_UNKNOWN",
                Kind::Manifest => "MANIFEST_UNKNOWN",
                _ => "NAME_UNKNOWN",
            },
        ),
        // The mirror could not get access: the client cannot fix that by authenticating to us.
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (StatusCode::FORBIDDEN, "DENIED"),
        StatusCode::TOO_MANY_REQUESTS => (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
        _ => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
    }
}

fn upstream_error_class(kind: Kind, error: &UpstreamError) -> (StatusCode, &'static str) {
    match error {
        UpstreamError::Status { status, .. } => code_for_upstream_status(kind, *status),
        UpstreamError::Unreachable { source, .. } if source.is_timeout() => {
            (StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE")
        }
        UpstreamError::Auth { .. } => (StatusCode::BAD_GATEWAY, "DENIED"),
        UpstreamError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        _ => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
    }
}

impl Error {
    pub fn upstream(kind: Kind, error: UpstreamError) -> Self {
        Error::Upstream { kind, error }
    }

    pub fn manifest_body(upstream: &str, error: BodyError) -> Self {
        Error::ManifestInvalid { upstream: upstream.to_owned(), reason: error.to_string() }
    }

    /// The status and OCI error code a client sees.
    pub fn class(&self) -> (StatusCode, &'static str) {
        match self {
            Error::Route(RouteError::NotFound) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            Error::Route(RouteError::Unsupported(_)) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            Error::Route(RouteError::MethodNotAllowed(_)) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            Error::Route(RouteError::Invalid(e)) | Error::Reference(e) => match e {
                InvalidReference::Name(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
                InvalidReference::Tag(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
                InvalidReference::Digest(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
                InvalidReference::DigestAlgorithm(_) => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
            },
            Error::UnknownUpstream(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            Error::ManifestUnknown { .. } => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            Error::Upstream { kind, error } => upstream_error_class(*kind, error),
            Error::Fill(e) => match &**e {
                FillError::Upstream(error) => upstream_error_class(Kind::Blob, error),
                FillError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
                _ => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
            },
            Error::ManifestInvalid { .. } | Error::ManifestDigestMismatch { .. } => {
                (StatusCode::BAD_GATEWAY, "MANIFEST_INVALID")
            }
            Error::RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
            Error::Denied => (StatusCode::FORBIDDEN, "DENIED"),
            Error::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            Error::BodyNotAllowed => (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
            Error::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        }
    }

    /// Extra headers: `Retry-After` on 429, `Content-Range` on 416, `Allow` on 405.
    fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        let upstream_retry = |e: &UpstreamError| match e {
            UpstreamError::Status { retry_after: Some(v), .. } => vec![(header::RETRY_AFTER, v.clone())],
            _ => vec![],
        };
        match self {
            Error::Upstream { error, .. } => upstream_retry(error),
            Error::Fill(e) => match &**e {
                FillError::Upstream(error) => upstream_retry(error),
                _ => vec![],
            },
            Error::RangeNotSatisfiable { size } => {
                vec![(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"))]
            }
            Error::Unauthorized => {
                vec![(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"regmirror\""))]
            }
            Error::Route(RouteError::Unsupported(_) | RouteError::MethodNotAllowed(_)) => {
                vec![(header::ALLOW, HeaderValue::from_static("GET, HEAD"))]
            }
            _ => vec![],
        }
    }

    /// The OCI error response: status, headers and `{"errors":[{code,message,detail}]}`.
    pub fn to_response_parts(&self) -> (StatusCode, Vec<(header::HeaderName, HeaderValue)>, Bytes) {
        let (status, code) = self.class();
        let message = match (status, self) {
            // Our own failures: the log has the details, the client gets a plain sentence.
            (StatusCode::INTERNAL_SERVER_ERROR, _) => "internal error in the mirror's cache".to_owned(),
            _ => self.to_string(),
        };
        (status, self.headers(), error_body(code, &message))
    }
}

/// `{"errors":[{"code":…,"message":…,"detail":null}]}`.
pub fn error_body(code: &str, message: &str) -> Bytes {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
    Bytes::from(serde_json::to_vec(&body).expect("json serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_error(status: StatusCode) -> UpstreamError {
        UpstreamError::Status {
            upstream: "docker.io".into(),
            status,
            retry_after: Some(HeaderValue::from_static("30")),
        }
    }

    #[test]
    fn upstream_answers_map_to_what_they_mean() {
        let not_found = Error::upstream(Kind::Manifest, status_error(StatusCode::NOT_FOUND));
        assert_eq!(not_found.class(), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));
        let blob = Error::Fill(Arc::new(FillError::Upstream(status_error(StatusCode::NOT_FOUND))));
        assert_eq!(blob.class(), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
        let limited = Error::upstream(Kind::Manifest, status_error(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(limited.class(), (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"));
        assert_eq!(limited.headers()[0].0, header::RETRY_AFTER);
        let broken = Error::upstream(Kind::Blob, status_error(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(broken.class(), (StatusCode::BAD_GATEWAY, "UNAVAILABLE"));
    }

    #[test]
    fn bodies_are_oci_error_json() {
        let e = Error::Route(RouteError::Unsupported(http::Method::PUT));
        let (status, headers, body) = e.to_response_parts();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[0].0, header::ALLOW);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["errors"][0]["code"], "UNSUPPORTED");
        assert!(json["errors"][0]["message"].is_string());
    }

    #[test]
    fn internal_errors_hide_their_details() {
        let e = Error::Storage(std::io::Error::other("/var/lib/regmirror/blobs: disk on fire"));
        let (status, _, body) = e.to_response_parts();
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!String::from_utf8_lossy(&body).contains("disk on fire"));
    }
}
