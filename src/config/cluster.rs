//! The `[storage]` and `[cluster]` sections: where replicas share their cache (an
//! S3-compatible object store) and how they find each other.
//!
//! Both are optional. Without them a mirror is one process with its cache on local disk, as
//! before; with them, several replicas act as one cache (see `crate::cluster` and
//! `crate::shared`). Each scalar key can also be set from the environment as
//! `REGMIRROR_STORAGE_<KEY>` or `REGMIRROR_CLUSTER_<KEY>`, which is how a Kubernetes pod
//! passes its own address (`REGMIRROR_CLUSTER_ADVERTISE=http://$(POD_IP):5000`).

use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::{ConfigError, Credentials, PasswordSource, invalid, parse_duration, parse_size};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileStorage {
    backend: Option<String>,
    endpoint: Option<String>,
    bucket: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    prefix: Option<String>,
    access_key_id_env: Option<String>,
    access_key_id_file: Option<PathBuf>,
    secret_access_key_env: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    /// Refused with a clear message: secrets never live inline in the file.
    secret_access_key: Option<toml::Value>,
    shared_max_size: Option<String>,
    maintenance_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    advertise: Option<String>,
    #[serde(default)]
    replicas: Vec<String>,
    replicas_dns: Option<String>,
    /// Basic auth for requests to other replicas, when they require it (`htpasswd_file`).
    username: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
}

/// The object store the replicas share. Every replica keeps its own local tier (the cache
/// directory, bounded by `max_cache_size`) in front of it.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: Url,
    pub bucket: String,
    pub region: String,
    /// `http://host/bucket/key` rather than `http://bucket.host/key`: what MinIO, Garage,
    /// Ceph and most self-hosted stores expect.
    pub path_style: bool,
    /// Prepended to every key, so one bucket can hold several caches. Empty or ends in `/`.
    pub prefix: String,
    pub access_key_id: PasswordSource,
    pub secret_access_key: PasswordSource,
    /// Bound of the shared tier, enforced by one replica at a time; `None`: unbounded.
    pub shared_max_size: Option<u64>,
    /// How often this replica writes its access record and, when it is the keeper, trims
    /// the shared tier to its bound.
    pub maintenance_interval: std::time::Duration,
}

/// How replicas find each other. Each blob has one owner among the live replicas
/// (rendezvous hashing), which downloads it from the upstream; the others stream from it.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How the other replicas reach this one; must be one of the replicas.
    pub advertise: Url,
    /// A static replica list (this replica included).
    pub replicas: Vec<Url>,
    /// `host:port` whose A/AAAA records are the replicas (a Kubernetes headless Service),
    /// re-resolved periodically; each address becomes `http://IP:PORT`.
    pub replicas_dns: Option<String>,
    /// Sent to the other replicas when their `htpasswd_file` requires Basic auth.
    pub credentials: Option<Credentials>,
}

impl PasswordSource {
    /// Reads the secret from its source, each time (a rotated file takes effect).
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            PasswordSource::Env(var) => std::env::var(var).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("environment variable {var} is not set"))
            }),
            PasswordSource::File(path) => Ok(std::fs::read_to_string(path)?.trim_end_matches(['\r', '\n']).to_owned()),
        }
    }
}

/// The `[storage]` section: `None` for the filesystem backend.
pub(super) fn storage(
    file: Option<FileStorage>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<S3Config>, ConfigError> {
    let file = file.unwrap_or_default();
    let pick =
        |key: &str, value: Option<String>| env(&format!("REGMIRROR_STORAGE_{}", key.to_ascii_uppercase())).or(value);
    let backend = pick("backend", file.backend).unwrap_or_else(|| "filesystem".to_owned());
    match backend.as_str() {
        "filesystem" => return Ok(None),
        "s3" => {}
        other => return Err(invalid("storage.backend", format!("{other:?}: expected \"filesystem\" or \"s3\""))),
    }
    if file.secret_access_key.is_some() {
        return Err(invalid("storage", "inline secrets are refused: use secret_access_key_env or _file"));
    }
    let endpoint = pick("endpoint", file.endpoint).ok_or_else(|| invalid("storage.endpoint", "required for s3"))?;
    let endpoint = Url::parse(&endpoint).map_err(|e| invalid("storage.endpoint", format!("{endpoint:?}: {e}")))?;
    if !matches!(endpoint.scheme(), "http" | "https") || !endpoint.username().is_empty() {
        return Err(invalid("storage.endpoint", "an http:// or https:// URL without credentials"));
    }
    let bucket = pick("bucket", file.bucket).ok_or_else(|| invalid("storage.bucket", "required for s3"))?;
    let region = pick("region", file.region).unwrap_or_else(|| "us-east-1".to_owned());
    let path_style = match pick("path_style", file.path_style.map(|b| b.to_string())) {
        Some(s) => s.parse().map_err(|_| invalid("storage.path_style", "expected true or false"))?,
        None => true,
    };
    let mut prefix = pick("prefix", file.prefix).unwrap_or_default();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    if prefix.split('/').any(|part| part == ".." || part == ".") || prefix.starts_with('/') {
        return Err(invalid("storage.prefix", "a relative key prefix such as \"mirror/\""));
    }
    let secret = |key: &str, var: Option<String>, path: Option<PathBuf>, default_var: &str| {
        let var = pick(&format!("{key}_env"), var);
        let path = pick(&format!("{key}_file"), path.map(|p| p.display().to_string()));
        match (var, path) {
            (Some(_), Some(_)) => Err(invalid(&format!("storage.{key}"), "set _env or _file, not both")),
            (None, Some(path)) => Ok(PasswordSource::File(path.into())),
            (var, None) => Ok(PasswordSource::Env(var.unwrap_or_else(|| default_var.to_owned()))),
        }
    };
    let access_key_id = secret("access_key_id", file.access_key_id_env, file.access_key_id_file, "AWS_ACCESS_KEY_ID")?;
    let secret_access_key =
        secret("secret_access_key", file.secret_access_key_env, file.secret_access_key_file, "AWS_SECRET_ACCESS_KEY")?;
    let shared_max_size = pick("shared_max_size", file.shared_max_size)
        .map(|s| parse_size(&s).map_err(|e| invalid("storage.shared_max_size", e)))
        .transpose()?;
    let maintenance_interval = match pick("maintenance_interval", file.maintenance_interval) {
        Some(s) => parse_duration(&s).map_err(|e| invalid("storage.maintenance_interval", e))?,
        None => std::time::Duration::from_secs(60),
    }
    .max(std::time::Duration::from_secs(1));
    Ok(Some(S3Config {
        endpoint,
        bucket,
        region,
        path_style,
        prefix,
        access_key_id,
        secret_access_key,
        shared_max_size,
        maintenance_interval,
    }))
}

/// The `[cluster]` section: `None` when absent (a single mirror).
pub(super) fn cluster(
    file: Option<FileCluster>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let pick =
        |key: &str, value: Option<String>| env(&format!("REGMIRROR_CLUSTER_{}", key.to_ascii_uppercase())).or(value);
    let replicas = match env("REGMIRROR_CLUSTER_REPLICAS") {
        Some(list) => list.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
        None => file.replicas,
    };
    let replicas_dns = pick("replicas_dns", file.replicas_dns);
    let advertise = pick("advertise", file.advertise);
    let Some(advertise) = advertise else {
        if replicas.is_empty() && replicas_dns.is_none() {
            return Ok(None);
        }
        return Err(invalid("cluster.advertise", "required with replicas or replicas_dns: this replica's URL"));
    };
    let advertise = replica_url("cluster.advertise", &advertise)?;
    let mut replicas = replicas.iter().map(|r| replica_url("cluster.replicas", r)).collect::<Result<Vec<_>, _>>()?;
    if let Some(dns) = &replicas_dns {
        let valid = dns.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(invalid("cluster.replicas_dns", format!("{dns:?}: expected host:port")));
        }
    } else if !replicas.contains(&advertise) {
        replicas.push(advertise.clone());
    }
    replicas.sort();
    replicas.dedup();
    let password = match (pick("password_env", file.password_env), file.password_file) {
        (Some(var), None) => Some(PasswordSource::Env(var)),
        (None, Some(path)) => Some(PasswordSource::File(path)),
        (None, None) => None,
        (Some(_), Some(_)) => return Err(invalid("cluster", "set password_env or password_file, not both")),
    };
    let credentials = match (pick("username", file.username), password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (None, None) => None,
        _ => return Err(invalid("cluster", "username needs a password_env or password_file, and vice versa")),
    };
    Ok(Some(ClusterConfig { advertise, replicas, replicas_dns, credentials }))
}

/// `http://10.0.0.5:5000` (a trailing path is refused: replicas are origins).
fn replica_url(key: &str, s: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(s).map_err(|e| invalid(key, format!("{s:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || url.path() != "/" {
        return Err(invalid(key, format!("{s:?}: expected an origin such as http://10.0.0.5:5000")));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn filesystem_is_the_default() {
        assert!(storage(None, &no_env).unwrap().is_none());
        assert!(cluster(None, &no_env).unwrap().is_none());
    }

    #[test]
    fn s3_settings_with_defaults() {
        let file: FileStorage =
            toml::from_str("backend = \"s3\"\nendpoint = \"http://127.0.0.1:3900\"\nbucket = \"b\"\nprefix = \"m\"")
                .unwrap();
        let s3 = storage(Some(file), &no_env).unwrap().unwrap();
        assert_eq!(s3.region, "us-east-1");
        assert!(s3.path_style);
        assert_eq!(s3.prefix, "m/");
        assert!(matches!(s3.access_key_id, PasswordSource::Env(ref v) if v == "AWS_ACCESS_KEY_ID"));
        let inline: FileStorage = toml::from_str("backend = \"s3\"\nsecret_access_key = \"x\"").unwrap();
        assert!(storage(Some(inline), &no_env).unwrap_err().to_string().contains("inline"));
        let env = |k: &str| (k == "REGMIRROR_STORAGE_BACKEND").then(|| "tape".to_owned());
        assert!(storage(None, &env).is_err());
    }

    #[test]
    fn cluster_needs_its_own_address() {
        let file: FileCluster = toml::from_str("replicas = [\"http://a:5000\", \"http://b:5000\"]").unwrap();
        assert!(cluster(Some(file), &no_env).is_err());
        let env = |k: &str| match k {
            "REGMIRROR_CLUSTER_ADVERTISE" => Some("http://c:5000".to_owned()),
            "REGMIRROR_CLUSTER_REPLICAS" => Some("http://a:5000, http://b:5000".to_owned()),
            _ => None,
        };
        let config = cluster(None, &env).unwrap().unwrap();
        assert_eq!(config.replicas.len(), 3, "advertise joins the static list");
        let bad: FileCluster = toml::from_str("advertise = \"http://a:5000/x\"").unwrap();
        assert!(cluster(Some(bad), &no_env).is_err());
    }
}
