//! A minimal HTTP client for the harness's own requests (metrics scrapes,
//! access-log sync requests). Never goes through a proxy: everything the
//! tests talk to is on 127.0.0.1.

use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Context, Result};

/// A response's status and body.
pub struct Response {
    pub status: u16,
    pub body: String,
}

pub fn get(url: &str) -> Result<Response> {
    let mut response = AGENT.get(url).call().with_context(|| format!("GET {url}"))?;
    let body = response.body_mut().read_to_string().with_context(|| format!("reading the body of GET {url}"))?;
    Ok(Response { status: response.status().as_u16(), body })
}

static AGENT: LazyLock<ureq::Agent> = LazyLock::new(|| {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
});

/// GET a binary body; fails on a non-200 status or a broken transfer.
pub fn get_bytes(url: &str) -> Result<Vec<u8>> {
    let mut response = AGENT.get(url).call().with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(response.status() == 200, "GET {url} answered {}", response.status());
    response.body_mut().with_config().limit(u64::MAX).read_to_vec().with_context(|| format!("reading GET {url}"))
}
