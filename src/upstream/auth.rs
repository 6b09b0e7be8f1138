//! Registry authentication as Docker Hub does it: the upstream answers 401 with a
//! `WWW-Authenticate` challenge, we ask the named token realm for a Bearer token for the
//! scope, cache it per scope until shortly before it expires, and retry. `Basic` challenges
//! are answered with the configured credentials directly.
//!
//! Tokens and passwords live only in memory and in `Authorization` headers; nothing here
//! implements `Debug` in a way that could print them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use tokio::time::Instant;

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    Basic,
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`. Parameter values may
/// be quoted (with `\` escapes, and commas inside, as in `scope="repository:a:pull,push"`) or
/// bare tokens. Returns `None` for schemes we cannot answer.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    let params = parse_params(rest);
    let get = |key: &str| params.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.clone());
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer { realm: get("realm")?, service: get("service"), scope: get("scope") })
    } else if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else {
        None
    }
}

fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            return params;
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
        }
        params.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

/// The body of a token endpoint's answer. Docker Hub sends both `token` and `access_token`.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // The spec's default lifetime when the server does not say.
        let lifetime = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        Some((token, lifetime))
    }
}

/// Bearer tokens by scope, each dropped shortly before its expiry.
#[derive(Default)]
pub struct TokenCache {
    /// A std Mutex: nothing awaits while it is held.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// Renew this long before a token expires, so a request never arrives with a dead one.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().expect("token cache poisoned");
        let (token, expires) = tokens.get(scope)?;
        (Instant::now() < *expires).then(|| token.clone())
    }

    pub fn insert(&self, scope: &str, token: String, lifetime: Duration) {
        let usable = lifetime.saturating_sub(EXPIRY_MARGIN.min(lifetime / 2));
        let mut tokens = self.tokens.lock().expect("token cache poisoned");
        let now = Instant::now();
        tokens.retain(|_, (_, expires)| *expires > now);
        tokens.insert(scope.to_owned(), (token, now + usable));
    }

    pub fn remove(&self, scope: &str) {
        self.tokens.lock().expect("token cache poisoned").remove(scope);
    }
}

/// The value of a `Basic` Authorization header.
pub fn basic_header(username: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    format!("Basic {encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            parse_challenge(h),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
    }

    #[test]
    fn commas_and_escapes_inside_quotes_and_bare_values() {
        let h = r#"bearer realm=http://a/token, scope="repository:x:pull,push", service="s\"q""#;
        assert_eq!(
            parse_challenge(h),
            Some(Challenge::Bearer {
                realm: "http://a/token".into(),
                service: Some("s\"q".into()),
                scope: Some("repository:x:pull,push".into()),
            })
        );
    }

    #[test]
    fn other_schemes_and_broken_headers() {
        assert_eq!(parse_challenge(r#"Basic realm="registry""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None, "no realm");
        assert_eq!(parse_challenge(""), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), parse_challenge(r#"Bearer realm="unterminated""#));
    }

    #[test]
    fn token_response_prefers_token_and_defaults_lifetime() {
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(r.into_token(), Some(("a".into(), Duration::from_secs(60))));
        let r: TokenResponse = serde_json::from_str(r#"{"token":"t","access_token":"a","expires_in":300}"#).unwrap();
        assert_eq!(r.into_token(), Some(("t".into(), Duration::from_secs(300))));
        let r: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(r.into_token(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire_before_their_lifetime_ends() {
        let cache = TokenCache::default();
        cache.insert("repository:a:pull", "t".into(), Duration::from_secs(300));
        assert_eq!(cache.get("repository:a:pull").as_deref(), Some("t"));
        assert_eq!(cache.get("repository:b:pull"), None);
        tokio::time::advance(Duration::from_secs(289)).await;
        assert_eq!(cache.get("repository:a:pull").as_deref(), Some("t"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.get("repository:a:pull"), None);
    }

    #[test]
    fn basic_header_encodes_credentials() {
        assert_eq!(basic_header("user", "pass"), "Basic dXNlcjpwYXNz");
    }
}
