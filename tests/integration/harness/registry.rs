//! An upstream registry together with what is needed to push to it: the
//! plain one takes anonymous pushes, the token-auth one has an issuer whose
//! user the harness pushes as.

use anyhow::{Context, Result};

use super::images::{Fixture, PushedImage};
use super::shared;
use super::token::TokenIssuer;
use super::upstream::Upstream;

pub struct Registry {
    pub upstream: Upstream,
    /// Set for a token-auth registry.
    pub issuer: Option<TokenIssuer>,
}

impl Registry {
    /// A registry without auth; `name` names its logs.
    pub fn plain(name: &str) -> Result<Registry> {
        Ok(Registry { upstream: Upstream::start(name, None)?, issuer: None })
    }

    /// A registry with `auth: token`, backed by a fresh [`TokenIssuer`].
    pub fn token_auth(name: &str) -> Result<Registry> {
        let issuer = TokenIssuer::start()?;
        Ok(Registry { upstream: Upstream::start(name, Some(&issuer.registry_auth()))?, issuer: Some(issuer) })
    }

    /// The token issuer of a token-auth registry.
    pub fn issuer(&self) -> Result<&TokenIssuer> {
        self.issuer.as_ref().context("not a token-auth registry")
    }

    /// Pushes `fixture` as `repository:TAG` (tests that count upstream
    /// requests push to a repository of their own so parallel tests pulling
    /// the shared fixtures do not show up in their counts).
    pub fn push(&self, fixture: Fixture, repository: &str) -> Result<PushedImage> {
        let credentials = self.issuer.as_ref().map(TokenIssuer::user);
        shared::layout()?.push(fixture, self.upstream.host(), repository, credentials)
    }

    /// Pushes every fixture to its usual repository.
    pub fn push_fixtures(&self) -> Result<Fixtures> {
        let push = |fixture: Fixture| self.push(fixture, fixture.repository());
        Ok(Fixtures { alpine: push(Fixture::Alpine)?, busybox: push(Fixture::Busybox)?, multi: push(Fixture::Multi)? })
    }
}

/// The fixtures as pushed to one registry.
pub struct Fixtures {
    pub alpine: PushedImage,
    pub busybox: PushedImage,
    pub multi: PushedImage,
}

impl Fixtures {
    pub fn all(&self) -> [&PushedImage; 3] {
        [&self.alpine, &self.busybox, &self.multi]
    }
}
