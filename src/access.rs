//! Who may use the mirror. A LAN mirror spends its operator's upstream credentials, rate limit
//! and bandwidth, so two optional gates stand in front of every registry request:
//!
//! - an allow-list of client networks (`allow_cidrs`), checked against the peer address;
//! - HTTP Basic auth against an htpasswd file of bcrypt hashes (`htpasswd_file`), which is
//!   what `docker login`, `skopeo --creds` and containerd's host credentials speak.
//!
//! `/healthz`, `/readyz` and `/metrics` stay open to the allowed networks without a password,
//! for probes and Prometheus. bcrypt is deliberately slow (tens of milliseconds), and a pull
//! makes dozens of requests, so a successful check is remembered for a few minutes by a hash
//! of the credentials; the htpasswd file is re-read when it changes.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

/// A network such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid network {0:?}: expected ADDRESS/PREFIX such as 10.0.0.0/8")]
pub struct InvalidCidr(String);

impl FromStr for Cidr {
    type Err = InvalidCidr;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidCidr(s.to_owned());
        let (address, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| invalid())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(invalid)?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => same_prefix(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn same_prefix(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (whole, rest) = ((prefix / 8) as usize, prefix % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

/// Why a request is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client's address is outside every allowed network.
    Network,
    /// No or wrong credentials.
    Credentials,
}

/// The gates, as configured. The default lets everyone in.
#[derive(Default)]
pub struct Access {
    allowed: Vec<Cidr>,
    htpasswd: Option<Htpasswd>,
}

impl Access {
    pub fn new(allowed: Vec<Cidr>, htpasswd_file: Option<PathBuf>) -> Result<Access, std::io::Error> {
        let htpasswd = htpasswd_file.map(Htpasswd::load).transpose()?;
        Ok(Access { allowed, htpasswd })
    }

    /// Whether a client at `peer` may connect at all.
    pub fn allows_peer(&self, peer: IpAddr) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|c| c.contains(peer))
    }

    /// Checks one request. `open` marks the probe and metrics endpoints.
    pub fn check(&self, peer: IpAddr, open: bool, authorization: Option<&str>) -> Result<(), Refusal> {
        if !self.allows_peer(peer) {
            return Err(Refusal::Network);
        }
        match &self.htpasswd {
            Some(htpasswd) if !open && !htpasswd.verify(authorization) => Err(Refusal::Credentials),
            _ => Ok(()),
        }
    }
}

/// An htpasswd file of `user:bcrypt-hash` lines.
struct Htpasswd {
    path: PathBuf,
    /// A std Mutex: nothing awaits while it is held (bcrypt runs outside it).
    state: Mutex<HtpasswdState>,
}

struct HtpasswdState {
    users: HashMap<String, String>,
    modified: Option<SystemTime>,
    /// sha256 of `user:password` pairs that verified, and until when that holds.
    verified: HashMap<[u8; 32], Instant>,
}

/// How long a verified password is trusted without running bcrypt again.
const VERIFIED_FOR: Duration = Duration::from_secs(300);

impl Htpasswd {
    fn load(path: PathBuf) -> Result<Htpasswd, std::io::Error> {
        let (users, modified) = read_htpasswd(&path)?;
        let state = HtpasswdState { users, modified, verified: HashMap::new() };
        Ok(Htpasswd { path, state: Mutex::new(state) })
    }

    fn verify(&self, authorization: Option<&str>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else { return false };
        let fingerprint: [u8; 32] = Sha256::digest(format!("{user}:{password}")).into();
        let hash = {
            let mut state = self.state.lock().expect("htpasswd poisoned");
            self.reload_if_changed(&mut state);
            let now = Instant::now();
            if state.verified.get(&fingerprint).is_some_and(|until| *until > now) {
                return true;
            }
            match state.users.get(&user) {
                Some(hash) => hash.clone(),
                None => return false,
            }
        };
        if !bcrypt::verify(&password, &hash).unwrap_or(false) {
            return false;
        }
        let mut state = self.state.lock().expect("htpasswd poisoned");
        let now = Instant::now();
        state.verified.retain(|_, until| *until > now);
        state.verified.insert(fingerprint, now + VERIFIED_FOR);
        true
    }

    /// Re-reads the file when its mtime changed; a removed user loses access at once.
    fn reload_if_changed(&self, state: &mut HtpasswdState) {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified == state.modified {
            return;
        }
        match read_htpasswd(&self.path) {
            Ok((users, modified)) => {
                *state = HtpasswdState { users, modified, verified: HashMap::new() };
                tracing::info!(path = %self.path.display(), "htpasswd file reloaded");
            }
            Err(error) => tracing::warn!(path = %self.path.display(), %error, "cannot reload htpasswd file"),
        }
    }
}

fn read_htpasswd(path: &Path) -> Result<(HashMap<String, String>, Option<SystemTime>), std::io::Error> {
    let text = std::fs::read_to_string(path)?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let users = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .filter(|(_, hash)| hash.starts_with("$2"))
        .map(|(user, hash)| (user.to_owned(), hash.to_owned()))
        .collect();
    Ok((users, modified))
}

/// `Basic base64(user:password)` -> (user, password).
fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (user, password) =
        String::from_utf8(decoded).ok()?.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned()))?;
    Some((user, password))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses() {
        let lan: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(lan.contains(ip("10.1.2.3")));
        assert!(!lan.contains(ip("11.0.0.1")));
        assert!(lan.contains(ip("::ffff:10.9.9.9")), "v4-mapped addresses count as v4");
        let odd: Cidr = "192.168.4.0/22".parse().unwrap();
        assert!(odd.contains(ip("192.168.7.255")));
        assert!(!odd.contains(ip("192.168.8.0")));
        let host: Cidr = "127.0.0.1".parse().unwrap();
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_allow_list_refuses_other_networks() {
        let access = Access::new(vec!["10.0.0.0/8".parse().unwrap()], None).unwrap();
        assert_eq!(access.check(ip("10.0.0.1"), false, None), Ok(()));
        assert_eq!(access.check(ip("127.0.0.1"), true, None), Err(Refusal::Network));
        assert!(Access::default().allows_peer(ip("203.0.113.9")));
    }

    #[test]
    fn basic_auth_checks_bcrypt_hashes_and_rereads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        std::fs::write(&path, format!("# users\nalice:{hash}\n")).unwrap();
        let access = Access::new(vec![], Some(path.clone())).unwrap();
        let basic = |user: &str, password: &str| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
        };
        let local = ip("127.0.0.1");
        assert_eq!(access.check(local, false, Some(&basic("alice", "s3cret"))), Ok(()));
        assert_eq!(access.check(local, false, Some(&basic("alice", "s3cret"))), Ok(()), "cached");
        assert_eq!(access.check(local, false, Some(&basic("alice", "wrong"))), Err(Refusal::Credentials));
        assert_eq!(access.check(local, false, Some(&basic("bob", "s3cret"))), Err(Refusal::Credentials));
        assert_eq!(access.check(local, false, None), Err(Refusal::Credentials));
        assert_eq!(access.check(local, true, None), Ok(()), "probes and metrics stay open");

        // Removing the user takes effect without a restart.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "# nobody\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert_eq!(access.check(local, false, Some(&basic("alice", "s3cret"))), Err(Refusal::Credentials));
    }
}
