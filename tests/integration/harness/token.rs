//! The token issuer behind the token-auth upstream, served in-process.
//!
//! It speaks the Docker registry token protocol the way Docker Hub does:
//! `GET /token?service=…&scope=repository:NAME:ACTIONS` answers
//! `{"token", "access_token", "expires_in": 300}` with an RS256 JWT whose
//! header carries the issuer's self-signed certificate (`x5c`), which the
//! registry trusts through its `rootcertbundle`. The key and certificate are
//! made with the `openssl` CLI.
//!
//! Policy: one user ([`TokenIssuer::user`]) gets every action it asks for,
//! which the harness uses to push fixtures. Anonymous callers get `pull`,
//! except on repositories under [`PRIVATE_NAMESPACE`], where they get
//! nothing, so only a mirror configured with the user's credentials can pull
//! those. Wrong credentials get 401.
//!
//! The issuer records every request and every token it issued, so tests can
//! check that the mirror caches tokens and never leaks them.

use std::io::{Cursor, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tiny_http::{Response, Server};

use super::process::{self, run};
use super::upstream::TokenAuth;
use super::workdir::Scratch;

/// The `service` the registry and the issuer agree on (the JWT audience).
pub const SERVICE: &str = "regmirror-test-registry";
/// The JWT issuer the registry expects.
pub const ISSUER: &str = "regmirror-test-issuer";
/// Repositories under this prefix grant nothing to anonymous callers.
pub const PRIVATE_NAMESPACE: &str = "private/";
/// Lifetime of issued tokens, in seconds.
pub const TOKEN_LIFETIME: u64 = 300;

/// A username and password.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    /// `user:password`, as skopeo's `--creds` flags take it.
    pub fn colon_joined(&self) -> String {
        format!("{}:{}", self.username, self.password)
    }

    /// The base64 part of the Basic `Authorization` header.
    pub fn basic_encoded(&self) -> String {
        BASE64.encode(self.colon_joined())
    }
}

/// One request the issuer answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The authenticated user, `None` for anonymous requests.
    pub user: Option<String>,
    /// The `scope` parameters, e.g. `repository:library/alpine:pull`.
    pub scopes: Vec<String>,
    pub status: u16,
}

impl TokenRequest {
    /// Whether any scope of the request names `repository`.
    pub fn concerns(&self, repository: &str) -> bool {
        self.scopes.iter().any(|scope| parse_scope(scope).is_some_and(|(_, name, _)| name == repository))
    }
}

/// A position in the issuer's request log.
pub struct TokenMark(usize);

/// A running token issuer; its server thread stops when this is dropped.
pub struct TokenIssuer {
    address: SocketAddr,
    server: Arc<Server>,
    state: Arc<State>,
    keys: Scratch,
}

struct State {
    user: Credentials,
    key: EncodingKey,
    /// Base64 DER of the self-signed certificate, for the `x5c` header.
    certificate: String,
    next_token_id: AtomicU64,
    requests: Mutex<Vec<TokenRequest>>,
    issued: Mutex<Vec<String>>,
}

impl TokenIssuer {
    pub fn start() -> Result<TokenIssuer> {
        let keys = Scratch::new("token-keys")?;
        let (key, certificate) = make_key_and_certificate(&keys)?;
        let server = Server::http("127.0.0.1:0").map_err(|error| anyhow!("starting the token issuer: {error}"))?;
        let address = server.server_addr().to_ip().context("token issuer is not on TCP")?;
        let server = Arc::new(server);
        let state = Arc::new(State {
            user: Credentials { username: "pusher".into(), password: format!("pw-{}", random_hex(16)?) },
            key,
            certificate,
            next_token_id: AtomicU64::new(0),
            requests: Mutex::default(),
            issued: Mutex::default(),
        });
        let (serving, shared) = (Arc::clone(&server), Arc::clone(&state));
        thread::Builder::new().name("token-issuer".into()).spawn(move || {
            for request in serving.incoming_requests() {
                let response = shared.answer(&request);
                let _ = request.respond(response);
            }
        })?;
        Ok(TokenIssuer { address, server, state, keys })
    }

    /// The `auth: token` config for a registry that trusts this issuer.
    pub fn registry_auth(&self) -> TokenAuth {
        TokenAuth {
            realm: format!("http://{}/token", self.address),
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_cert_bundle: self.keys.join("cert.pem"),
        }
    }

    /// The user that gets push and pull everywhere.
    pub fn user(&self) -> &Credentials {
        &self.state.user
    }

    pub fn mark(&self) -> TokenMark {
        TokenMark(self.state.requests().len())
    }

    pub fn requests_since(&self, mark: &TokenMark) -> Vec<TokenRequest> {
        self.state.requests()[mark.0..].to_vec()
    }

    /// Every token issued so far.
    pub fn tokens_issued(&self) -> Vec<String> {
        lock(&self.state.issued).clone()
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

type Reply = Response<Cursor<Vec<u8>>>;

impl State {
    fn requests(&self) -> MutexGuard<'_, Vec<TokenRequest>> {
        lock(&self.requests)
    }

    fn answer(&self, request: &tiny_http::Request) -> Reply {
        let (path, query) = request.url().split_once('?').unwrap_or((request.url(), ""));
        if *request.method() != tiny_http::Method::Get || path != "/token" {
            return json_reply(404, &json!({"error": "not found"}));
        }
        let scopes: Vec<String> = form_urlencoded::parse(query.as_bytes())
            .filter(|(key, _)| key == "scope")
            .map(|(_, value)| value.into_owned())
            .collect();
        let user = match basic_credentials(request) {
            None => None,
            Some((username, password)) if username == self.user.username => {
                if password != self.user.password {
                    return self.record(None, scopes, json_reply(401, &json!({"error": "bad password"})));
                }
                Some(username)
            }
            Some(_) => {
                return self.record(None, scopes, json_reply(401, &json!({"error": "unknown user"})));
            }
        };
        let reply = match self.issue(user.as_deref(), &scopes) {
            Ok(token) => json_reply(200, &json!({"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME})),
            Err(error) => json_reply(500, &json!({"error": format!("{error:#}")})),
        };
        self.record(user, scopes, reply)
    }

    fn record(&self, user: Option<String>, scopes: Vec<String>, reply: Reply) -> Reply {
        self.requests().push(TokenRequest { user, scopes, status: reply.status_code().0 });
        reply
    }

    fn issue(&self, user: Option<&str>, scopes: &[String]) -> Result<String> {
        let access: Vec<Value> = scopes
            .iter()
            .filter_map(|scope| parse_scope(scope))
            .map(|(kind, name, actions)| {
                let granted: Vec<&str> =
                    actions.split(',').filter(|&action| user.is_some() || allowed_anonymously(name, action)).collect();
                json!({"type": kind, "name": name, "actions": granted})
            })
            .collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let id = self.next_token_id.fetch_add(1, Ordering::Relaxed);
        let claims = json!({
            "iss": ISSUER,
            "aud": SERVICE,
            "sub": user.unwrap_or(""),
            "iat": now,
            "nbf": now - 5,
            "exp": now + TOKEN_LIFETIME,
            "jti": format!("{}-{id}", std::process::id()),
            "access": access,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.x5c = Some(vec![self.certificate.clone()]);
        let token = jsonwebtoken::encode(&header, &claims, &self.key)?;
        lock(&self.issued).push(token.clone());
        Ok(token)
    }
}

fn allowed_anonymously(repository: &str, action: &str) -> bool {
    action == "pull" && !repository.starts_with(PRIVATE_NAMESPACE)
}

/// Splits `repository:library/alpine:pull,push` into its three parts.
fn parse_scope(scope: &str) -> Option<(&str, &str, &str)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((kind, name, actions))
}

fn basic_credentials(request: &tiny_http::Request) -> Option<(String, String)> {
    let header = request.headers().iter().find(|header| header.field.equiv("Authorization"))?;
    let encoded = header.value.as_str().strip_prefix("Basic ")?;
    let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some((username.to_owned(), password.to_owned()))
}

fn json_reply(status: u16, body: &Value) -> Reply {
    let content_type =
        tiny_http::Header::from_bytes("Content-Type", "application/json").expect("a valid static header");
    Response::from_string(body.to_string()).with_status_code(status).with_header(content_type)
}

/// An RSA key and a self-signed certificate for it, made with openssl in
/// `dir`; returns the signing key and the certificate's base64 DER.
fn make_key_and_certificate(dir: &Scratch) -> Result<(EncodingKey, String)> {
    let (key, cert, der) = (dir.join("key.pem"), dir.join("cert.pem"), dir.join("cert.der"));
    run(process::tool("openssl")?
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7"])
        .args(["-subj", &format!("/CN={ISSUER}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert))?;
    run(process::tool("openssl")?.args(["x509", "-outform", "DER", "-in"]).arg(&cert).arg("-out").arg(&der))?;
    let signing_key = EncodingKey::from_rsa_pem(&std::fs::read(&key)?).context("loading the issuer's key")?;
    Ok((signing_key, BASE64.encode(std::fs::read(&der)?)))
}

/// `bytes` random bytes from the kernel, hex-encoded.
fn random_hex(bytes: usize) -> Result<String> {
    let mut buffer = vec![0; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buffer)?;
    Ok(hex::encode(buffer))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_split_into_kind_name_and_actions() {
        assert_eq!(
            parse_scope("repository:private/alpine:pull,push"),
            Some(("repository", "private/alpine", "pull,push"))
        );
        assert!(allowed_anonymously("library/alpine", "pull"));
        assert!(!allowed_anonymously("library/alpine", "push"));
        assert!(!allowed_anonymously("private/alpine", "pull"));
    }
}
