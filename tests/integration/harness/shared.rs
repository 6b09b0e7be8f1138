//! Fixtures shared by every test, each started once per test binary on first
//! use: the OCI layout, the plain upstream and the token-auth upstream, each
//! with the fixtures pushed. (The containerd and dockerd daemons are shared
//! the same way from their client modules.)
//!
//! If starting one fails, every test that needs it fails with the first
//! error instead of retrying.

use std::sync::OnceLock;

use anyhow::{Result, anyhow};

use super::images::OciLayout;
use super::registry::{Fixtures, Registry};

/// A shared registry and the fixtures pushed to it.
pub struct Shared {
    pub registry: Registry,
    pub fixtures: Fixtures,
}

/// The OCI layout every push copies from.
pub fn layout() -> Result<&'static OciLayout> {
    static LAYOUT: OnceLock<Result<OciLayout, String>> = OnceLock::new();
    once(&LAYOUT, OciLayout::build)
}

/// The plain upstream, with every fixture pushed.
pub fn plain() -> Result<&'static Shared> {
    static PLAIN: OnceLock<Result<Shared, String>> = OnceLock::new();
    once(&PLAIN, || with_fixtures(Registry::plain("shared-upstream")?))
}

/// The token-auth upstream (anonymous pull allowed outside `private/`), with
/// every fixture pushed.
pub fn token_auth() -> Result<&'static Shared> {
    static TOKEN_AUTH: OnceLock<Result<Shared, String>> = OnceLock::new();
    once(&TOKEN_AUTH, || with_fixtures(Registry::token_auth("shared-token-upstream")?))
}

fn with_fixtures(registry: Registry) -> Result<Shared> {
    let fixtures = registry.push_fixtures()?;
    Ok(Shared { registry, fixtures })
}

/// Initialises `cell` on first use; later callers get the same value or the
/// same error.
pub fn once<T>(cell: &'static OnceLock<Result<T, String>>, init: impl FnOnce() -> Result<T>) -> Result<&'static T> {
    cell.get_or_init(|| init().map_err(|error| format!("{error:#}")))
        .as_ref()
        .map_err(|error| anyhow!("a shared fixture failed to start: {error}"))
}
